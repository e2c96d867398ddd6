"""Exported pictures carry the model, what the map shows and the disclaimer."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cxr_core.explain.export import Provenance, labelled_png, with_banner
from cxr_core.inference import DISCLAIMER

PROVENANCE = Provenance("densenet121-covid3@1.3.0", "DenseNet121 COVID-19 / normal / viral pneumonia", "Grad-CAM for COVID-19 (p = 0.298)", "7fbfd29360af" + "0" * 52)


def _picture(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_the_banner_goes_below_and_leaves_the_picture_alone() -> None:
    picture = _picture(300, 500)
    out = np.asarray(with_banner(picture, PROVENANCE.lines()))
    assert out.shape[1] == 500 and out.shape[0] > 300
    assert np.array_equal(out[:300], picture)
    strip = out[300:]
    assert (strip < 100).any() and (strip == 255).mean() > 0.7  # dark text on white


def test_the_strip_fits_the_text_at_any_width() -> None:
    """A narrow picture wraps the disclaimer onto more lines instead of cutting it off."""
    narrow, wide = (with_banner(_picture(100, w), PROVENANCE.lines()) for w in (160, 2000))
    assert narrow.height - 100 > wide.height - 100 > 0
    # No text runs past the right edge: the last column of the strip stays white.
    assert (np.asarray(narrow)[100:, -2:] == 255).all() and (np.asarray(wide)[100:, -2:] == 255).all()


def test_labelled_png_carries_the_provenance_in_pixels_and_text() -> None:
    png = Image.open(io.BytesIO(labelled_png(_picture(200, 400), PROVENANCE)))
    assert png.size[0] == 400 and png.size[1] > 200
    assert png.info["cxr:model"] == "densenet121-covid3@1.3.0" and png.info["Disclaimer"] == DISCLAIMER
    assert png.info["cxr:image_sha256"].startswith("7fbfd29360af") and png.info["Description"] == PROVENANCE.shows
    bare = Image.open(io.BytesIO(labelled_png(_picture(200, 400), PROVENANCE, banner=False)))
    assert bare.size == (400, 200) and bare.info["cxr:model"] == "densenet121-covid3@1.3.0"


def test_the_lines_name_model_version_and_disclaimer() -> None:
    first, shows, disclaimer = PROVENANCE.lines()
    assert "densenet121-covid3@1.3.0" in first and "7fbfd29360af" in first and "0" * 20 not in first
    assert shows == PROVENANCE.shows and disclaimer == DISCLAIMER
    assert "image sha256" not in Provenance("m@1", "m", "x").lines()[0]

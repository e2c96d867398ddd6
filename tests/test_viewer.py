"""The Diagnose film viewer: one self-contained document, film and overlay in one view."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from cxr_core.explain.viewer import PRESETS, heat_layer, viewer_html


def _data(html: str) -> dict:
    return json.loads(re.search(r"const D = (\{.*?\});\n", html).group(1))  # type: ignore[union-attr]


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_the_document_carries_the_film_and_overlay_losslessly_and_nothing_external() -> None:
    film = (np.arange(60 * 40).reshape(60, 40) % 256).astype(np.uint8)
    heat = heat_layer(np.full((60, 40, 3), (255, 0, 0), np.uint8), np.linspace(0, 1, 60 * 40).reshape(60, 40), 0.4, threshold=0.5)
    html = viewer_html(film, heat, height=300)
    data = _data(html)
    np.testing.assert_array_equal(_decode(data["film"]), film)
    layer = _decode(data["heat"])
    assert layer.shape == (60, 40, 4) and set(np.unique(layer[..., 3])) == {0, 102}  # 0.4 opacity above the threshold only
    assert data["marks"] is None and data["presets"] == {k: list(v) for k, v in PRESETS.items()}
    assert "height: 300px" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # works offline, in a hospital network


def test_layers_must_match_the_film() -> None:
    film = np.zeros((20, 30), np.uint8)
    with pytest.raises(ValueError, match="does not match the film"):
        viewer_html(film, np.zeros((30, 20, 4), np.uint8))
    with pytest.raises(ValueError, match="does not match the film"):
        viewer_html(film, None, marks=np.zeros((20, 30, 3), np.uint8))
    assert _data(viewer_html(film, None))["heat"] is None

"""Probe a model for shortcuts: does blurring, sharpening or framing a film more tightly change its class?

    python scripts/probe_shortcuts.py [--model ID] [--data ../shared/data/cxr] [--split test] [--per-group 120] [--json OUT]

For each source x label group of the split (up to ``--per-group`` films, fixed order) it
predicts the films as they are, blurred (Gaussian, sigma 1.2 px at 224 px), sharpened
(unsharp mask, amount 1, sigma 1 px), zoomed in (the central 1/1.3 of each side,
resized back: the same chest collimated more tightly) and cropped (10% of the rows off top
and bottom, 15% off the top, 15% off the bottom, resized back: neck or abdomen left out),
given a black frame (8% of the side on each edge) and CLAHE local-contrast processing (clip 2,
8x8 tiles), and reports the predicted-class counts and how many decisions each change flips. A model
that reads disease shrugs these off. The first DenseNet121 turned 39 of 120 validation
normals "viral pneumonia" when blurred, because Kermany's training normals are sharper
than its pneumonias, and 89 of 120 adult validation normals COVID-19 when zoomed in: both
properties of the collections (how sharp, how much neck and abdomen is in the frame), not
of lungs.
``framing_flips`` adds up the four framing changes (zoom and the three crops); with
``--split val --per-group 400`` its sum over the normal groups is the framing figure the
DenseNet121 candidates since 1.5.0 were judged by.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.inference import decide  # noqa: E402
from cxr_core.models.loading import load_model, resolve_model  # noqa: E402
from cxr_core.training.dataset import by_source_and_label, scan_folder  # noqa: E402
from cxr_core.training.trainer import predict_arrays, probabilities  # noqa: E402

BLUR_SIGMA = 1.2
SHARPEN_SIGMA, SHARPEN_AMOUNT = 1.0, 1.0
ZOOM = 1.3
CROP_BOTH, CROP_ONE = 0.10, 0.15  # fraction of rows cut off: top and bottom each / one edge


def blur(film: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(film, (0, 0), BLUR_SIGMA * film.shape[1] / 224)


def sharpen(film: np.ndarray) -> np.ndarray:
    soft = cv2.GaussianBlur(film.astype(np.float32), (0, 0), SHARPEN_SIGMA * film.shape[1] / 224)
    return np.clip(film.astype(np.float32) * (1 + SHARPEN_AMOUNT) - soft * SHARPEN_AMOUNT, 0, 255).astype(np.uint8)


def zoom_in(film: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W): the central 1/ZOOM of each side, resized back."""
    h, w = film.shape
    ch, cw = round(h / ZOOM), round(w / ZOOM)
    y, x = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(film[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_AREA)


def crop_rows(film: np.ndarray, top: float, bottom: float) -> np.ndarray:
    """(H, W) -> (H, W): ``top`` and ``bottom`` fractions of the rows cut off, resized back.

    Collimation that leaves out neck or abdomen, which a centred zoom cannot show: Kermany's
    test normals were right only as framed (with 10% off top and bottom DenseNet121 1.3.0
    called 100 of the 234 viral pneumonia, as framed 26)."""
    h, w = film.shape
    return cv2.resize(film[int(top * h) : h - int(bottom * h)], (w, h), interpolation=cv2.INTER_AREA)


def crop_top_bottom(film: np.ndarray) -> np.ndarray:
    return crop_rows(film, CROP_BOTH, CROP_BOTH)


def crop_top(film: np.ndarray) -> np.ndarray:
    return crop_rows(film, CROP_ONE, 0.0)


def crop_bottom(film: np.ndarray) -> np.ndarray:
    return crop_rows(film, 0.0, CROP_ONE)


FRAME = 0.08  # black frame, fraction of the side on each edge
CLAHE_CLIP, CLAHE_TILES = 2.0, 8


def black_frame(film: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) with a black frame FRAME deep on every edge: collimation or a scanner's
    border. On 1.3.0 it turned 271 of 274 `openist` normals COVID-19 (as read: 122)."""
    out = film.copy()
    h, w = film.shape
    dy, dx = int(FRAME * h), int(FRAME * w)
    out[:dy], out[h - dy :], out[:, :dx], out[:, w - dx :] = 0, 0, 0, 0
    return out


def clahe(film: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) after CLAHE: local-contrast processing some sites apply and others do not."""
    return cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(film)


#: variant name, the change, the report key counting the decisions it flips
VARIANTS = (("blurred", blur, "flipped_by_blur"), ("sharpened", sharpen, "flipped_by_sharpening"), ("zoomed_in", zoom_in, "flipped_by_zoom"),
            ("cropped_top_bottom", crop_top_bottom, "flipped_by_crop_top_bottom"), ("cropped_top", crop_top, "flipped_by_crop_top"),
            ("cropped_bottom", crop_bottom, "flipped_by_crop_bottom"), ("black_frame", black_frame, "flipped_by_frame"),
            ("clahe", clahe, "flipped_by_clahe"))
#: the framing variants, whose flips add up to ``framing_flips`` per group
FRAMING = ("flipped_by_zoom", "flipped_by_crop_top_bottom", "flipped_by_crop_top", "flipped_by_crop_bottom")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default="../shared/data/cxr")
    parser.add_argument("--split", default="test")
    parser.add_argument("--per-group", type=int, default=120)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()

    data = Path(args.data)
    model = load_model(resolve_model(args.model).path)
    manifest = model.manifest
    width, height = manifest.input.size
    report: dict[str, object] = {"model": manifest.key, "split": args.split,
                                 "blur_sigma_px_at_224": BLUR_SIGMA, "sharpen": {"sigma_px_at_224": SHARPEN_SIGMA, "amount": SHARPEN_AMOUNT}, "zoom": ZOOM,
                                 "crop": {"top_and_bottom": CROP_BOTH, "one_edge": CROP_ONE}, "frame": FRAME,
                                 "clahe": {"clip": CLAHE_CLIP, "tiles": CLAHE_TILES}, "groups": {}}
    for group, records in by_source_and_label(scan_folder(data), args.split).items():
        films = [read_image(r.path).to_uint8() for r in records[: args.per_group]]
        films = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in films]
        result: dict[str, object] = {"n": len(films)}
        calls = {}
        for variant, change in (("as_is", None), *((name, change) for name, change, _ in VARIANTS)):
            pixels = np.stack([change(f) if change else f for f in films])
            logits = predict_arrays(model.network, pixels, manifest.input, model.device)
            # The app's decision: calibrated probabilities and the COVID threshold.
            calls[variant] = np.array([decide(p, manifest) for p in probabilities(logits, manifest.head, manifest.temperature)])
            result[variant] = dict(Counter(calls[variant].tolist()))
        for variant, _, key in VARIANTS:
            result[key] = int((calls[variant] != calls["as_is"]).sum())
        result["framing_flips"] = sum(result[key] for key in FRAMING)  # type: ignore[misc]
        report["groups"][group] = result  # type: ignore[index]
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

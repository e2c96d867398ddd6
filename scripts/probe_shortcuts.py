"""Probe a model for shortcuts: does blurring, sharpening or framing a film more tightly change its class?

    python scripts/probe_shortcuts.py [--model ID] [--data ../shared/data/cxr] [--split test] [--per-group 120] [--json OUT]

For each source x label group of the split (up to ``--per-group`` films, fixed order) it
predicts the films as they are, blurred (Gaussian, sigma 1.2 px at 224 px), sharpened
(unsharp mask, amount 1, sigma 1 px) and zoomed in (the central 1/1.3 of each side,
resized back: the same chest collimated more tightly), and reports the predicted-class
counts and how many decisions each change flips. A model that reads disease shrugs these
off. The first DenseNet121 turned 39 of 120 validation normals "viral pneumonia" when
blurred, because Kermany's training normals are sharper than its pneumonias, and 89 of
120 adult validation normals COVID-19 when zoomed in: both properties of the collections
(how sharp, how much neck and abdomen is in the frame), not of lungs.
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

from cxr_core.inference import decide  # noqa: E402
from cxr_core.io import read_image  # noqa: E402
from cxr_core.models import load_model, resolve_model  # noqa: E402
from cxr_core.training.dataset import by_source_and_label, scan_folder  # noqa: E402
from cxr_core.training.trainer import predict_arrays, probabilities  # noqa: E402

BLUR_SIGMA = 1.2
SHARPEN_SIGMA, SHARPEN_AMOUNT = 1.0, 1.0
ZOOM = 1.3


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


#: variant name, the change, the report key counting the decisions it flips
VARIANTS = (("blurred", blur, "flipped_by_blur"), ("sharpened", sharpen, "flipped_by_sharpening"), ("zoomed_in", zoom_in, "flipped_by_zoom"))


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
                                 "blur_sigma_px_at_224": BLUR_SIGMA, "sharpen": {"sigma_px_at_224": SHARPEN_SIGMA, "amount": SHARPEN_AMOUNT}, "zoom": ZOOM, "groups": {}}
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
        report["groups"][group] = result  # type: ignore[index]
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

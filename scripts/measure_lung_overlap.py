"""Measure the lung-overlap figure of the Compare page on real films: how much Grad-CAM mass
falls on the lung field, how often the "mostly outside the lungs" warning fires, and how a
map driven by a burned-in label scores.

    python scripts/measure_lung_overlap.py [--model ID] [--data ../shared/data/cxr] [--per-group 40] [--json OUT]

For a sample of the shared test split (``--per-group`` films of each source x label, chosen
with a fixed seed) it computes the Grad-CAM of the predicted class at the model's input
size and reports, per group and overall: median and 10th percentile share inside the
lungs, and the share of films warned. Two controls put the figure on a scale: a flat map
(scores the lung field's area) and a map concentrated on a corner label (what a shortcut
looks like), and, per film, the same film with a large burned-in text block stamped in a
corner, to show whether the model's map moves onto it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_core.explain.cam import explain  # noqa: E402
from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.io import read_image
from cxr_core.imaging.lungs import WARN_BELOW, lung_field, lung_overlap  # noqa: E402
from cxr_core.models.loading import load_model, resolve_model  # noqa: E402
from cxr_core.training.dataset import by_source_and_label, scan_folder  # noqa: E402


def stamp_label(image: XrayImage) -> XrayImage:
    """The film with a bright text block in its top-left corner (a burned-in annotation)."""
    height, width = image.pixels.shape
    scale = width / 224
    text = np.zeros((height, width), np.uint8)
    for row, word in enumerate(("PORTABLE", "AP SUPINE")):
        cv2.putText(text, word, (int(4 * scale), int((18 + 18 * row) * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.55 * scale, 255, max(1, int(2 * scale)), cv2.LINE_AA)
    pixels = np.maximum(image.pixels, text.astype(np.float32) / 255.0)
    return replace(image, pixels=pixels)


def _summary(shares: list[float]) -> dict[str, float | int]:
    values = np.asarray(shares)
    return {
        "n": int(values.size),
        "median_share": round(float(np.median(values)), 3),
        "p10_share": round(float(np.percentile(values, 10)), 3),
        "warned": round(float(np.mean(values < WARN_BELOW)), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default="../shared/data/cxr")
    parser.add_argument("--per-group", type=int, default=40)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()

    data = Path(args.data)
    model = load_model(resolve_model(args.model).path)
    size = tuple(model.manifest.input.size)
    rng = np.random.default_rng(0)
    shares: dict[str, list[float]] = defaultdict(list)
    stamped: dict[str, list[float]] = defaultdict(list)
    for group, members in by_source_and_label(scan_folder(data), "test").items():
        chosen = rng.choice(len(members), size=min(args.per_group, len(members)), replace=False)
        for index in chosen:
            image = read_image(members[int(index)].path)
            explanation = explain(model, image, size=size)
            target = explanation.prediction.most_probable
            shares[group].append(lung_overlap(explanation.heatmap(target).raw).share)
            again = explain(model, stamp_label(image), targets=[target], size=size)
            stamped[group].append(lung_overlap(again.heatmap(target).raw).share)

    corner = np.zeros(size, np.float32)
    corner[: size[0] // 5, : size[1] // 4] = 1.0
    report = {
        "model": model.manifest.key,
        "method": "gradcam, predicted class, input-size map",
        "warn_below": WARN_BELOW,
        "lung_field_fraction": round(float(lung_field(size).mean()), 3),
        "controls": {"flat_map_share": round(lung_overlap(np.ones(size, np.float32)).share, 3),
                     "corner_label_map_share": round(lung_overlap(corner).share, 3)},
        "films": _summary([s for v in shares.values() for s in v]),
        "films_with_stamped_label": _summary([s for v in stamped.values() for s in v]),
        "by_group": {g: {"films": _summary(shares[g]), "stamped": _summary(stamped[g])} for g in sorted(shares)},
    }
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

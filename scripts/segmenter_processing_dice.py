"""Lung segmenter Dice on films as they are and after another site's processing.

    python scripts/segmenter_processing_dice.py weights/lung-segmenter [OTHER_FOLDER ...] \
        --masks ../shared/data/lung-masks/masks.csv --source openist --held-out

``--held-out`` keeps only the films a segmenter trained on ``--source`` held out to choose its
epoch (the same hash as :func:`cxr_core.training.segmentation.train_segmenter`), so the figure
can decide between candidates; without it every film of the source is scored (for a hospital
the segmenter never saw, a report). Processing as ``scripts/stress_gate.py`` applies it: CLAHE
(clip 3, 8x8 tiles), 96 px resolution, JPEG quality 15; Dice through the app's own path
(:func:`cxr_core.imaging.lungs.segment_lungs`) on the masks' 224 px grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxr_core.imaging.lungs import dice, lung_views, segment_lungs  # noqa: E402
from cxr_core.models.loading import load_segmenter  # noqa: E402
from cxr_core.training.dataset import _bucket  # noqa: E402
from cxr_core.training.segmentation import load_pairs, read_mask_pairs  # noqa: E402

PROCESSING = {
    "as is": lambda a: a,
    "CLAHE": lambda a: cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(a),
    "96 px": lambda a: cv2.resize(cv2.resize(a, (96, 96), interpolation=cv2.INTER_AREA), a.shape[::-1]),
    "JPEG 15": lambda a: cv2.imdecode(cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 15])[1], cv2.IMREAD_GRAYSCALE),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--source", default="jsrt")
    parser.add_argument("--held-out", action="store_true", help="only the films training held out to choose the epoch")
    args = parser.parse_args()
    pairs = read_mask_pairs(args.masks, sources=[args.source])
    if args.held_out:
        pairs = [p for p in pairs if _bucket(p.image.name, "lungs") < 0.1]
    films, truth = load_pairs(pairs)
    films8 = [(f * 255.0 + 0.5).astype(np.uint8) for f in films]
    for folder in args.folders:
        segmenter = load_segmenter(folder, device="cpu")
        row = []
        for name, change in PROCESSING.items():
            changed = [change(f).astype(np.float32) / 255.0 for f in films8]
            scores = [dice(m.mask, t) for m, t in zip(segment_lungs(changed, segmenter), truth)]
            low, high = segmenter.manifest.metrics.get("lung_fraction_range") or (0.0, 1.0)
            odd = sum(not low <= float(v.mean()) <= high for v in lung_views(changed, segmenter))
            row.append(f"{name}: Dice mean {np.mean(scores):.4f}, worst {np.min(scores):.4f}, lung share implausible {odd}")
        print(f"{segmenter.key} on {args.source} ({len(pairs)} films): " + "; ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Lung segmenter Dice on films as they are and after another site's processing.

    python scripts/segmenter_processing_dice.py weights/lung-segmenter [OTHER_FOLDER ...] \
        --masks ../shared/data/lung-masks/masks.csv --source openist --held-out

``--held-out`` keeps only the films a segmenter trained on ``--source`` held out to choose its
epoch (:func:`cxr_core.training.segmentation.held_out_for_epoch`), so the figure
can decide between candidates; without it every film of the source is scored (for a hospital
the segmenter never saw, a report). Processing is ``scripts/stress_gate.py``'s own: CLAHE (clip 3,
8x8 tiles), 96 px resolution, JPEG quality 15; Dice through the app's own path
(:func:`cxr_core.imaging.lungs.segment_lungs`) on the masks' 224 px grid, and how many films the
lung check (:func:`cxr_core.imaging.lungs.implausible_lungs`) objects to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stress_gate  # noqa: E402

from cxr_core.imaging.lungs import dice, implausible_lungs, lung_views, segment_lungs  # noqa: E402
from cxr_core.models.loading import load_segmenter  # noqa: E402
from cxr_core.training.segmentation import held_out_for_epoch, load_pairs, read_mask_pairs  # noqa: E402

PROCESSING = ("as is", "CLAHE", "96 px resolution", "JPEG quality 15")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--source", default="jsrt")
    parser.add_argument("--held-out", action="store_true", help="only the films training held out to choose the epoch")
    args = parser.parse_args()
    pairs = read_mask_pairs(args.masks, sources=[args.source])
    if args.held_out:
        pairs = [p for p in pairs if held_out_for_epoch(p)]
    films, truth = load_pairs(pairs)
    films8 = [(f * 255.0 + 0.5).astype(np.uint8) for f in films]
    for folder in args.folders:
        segmenter = load_segmenter(folder, device="cpu")
        row = []
        for name in PROCESSING:
            changed = [stress_gate.VARIANTS[name](f).astype(np.float32) / 255.0 for f in films8]
            scores = [dice(m.mask, t) for m, t in zip(segment_lungs(changed, segmenter), truth)]
            objected = sum(implausible_lungs(v, segmenter) is not None for v in lung_views(changed, segmenter))
            row.append(f"{name}: Dice mean {np.mean(scores):.4f}, worst {np.min(scores):.4f}, lung check objects to {objected}")
        print(f"{segmenter.key} on {args.source} ({len(pairs)} films): " + "; ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

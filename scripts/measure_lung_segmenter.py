"""Measure the lung segmenter: Dice at a hospital it never trained on, and what its masks
look like on the training films (the range the input check calls plausible).

    python scripts/measure_lung_segmenter.py weights/lung-segmenter \
        --masks ../shared/data/lung-masks/masks.csv --source jsrt \
        --films ../shared/data/cxr:train ../shared/data/cxr-extra:train --per-source 1000 --write

Dice is computed on the masks' own 224 px grid, through the same path the app uses
(cxr_core.imaging.lungs.segment_lungs, post-processing included). With ``--write`` the figures go
into the folder's manifest ``metrics`` (``external_dice``, ``lung_fraction_range``,
``training_films``) and ``measurement.json``; the weights are untouched (their digest is
checked before the manifest is rewritten).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.imaging.lungs import count_regions, dice, lung_box, lung_views, segment_lungs  # noqa: E402
from cxr_core.models.loading import load_segmenter, update_manifest  # noqa: E402
from cxr_core.training.dataset import scan_folder  # noqa: E402
from cxr_core.training.segmentation import load_pairs, read_mask_pairs, segmenter_card  # noqa: E402

#: the share of training films outside each plausible bound (as the exposure check's 0.5th-99.5th percentiles)
OUTSIDE = 0.005


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"n": int(a.size), "mean": round(float(a.mean()), 4), "median": round(float(np.median(a)), 4),
            "p10": round(float(np.quantile(a, 0.1)), 4), "min": round(float(a.min()), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--masks", type=Path, help="masks.csv for Dice at --source (without it: the plausible range only, "
                        "e.g. while a candidate is still to be chosen without reading the external hospital)")
    parser.add_argument("--source", default="jsrt", help="the masks.csv source to measure on (never one it trained on)")
    parser.add_argument("--films", nargs="*", default=[], metavar="FOLDER[:SPLIT]", help="training films for the plausible range")
    parser.add_argument("--per-source", type=int, default=1000, help="films sampled per source of --films")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    segmenter = load_segmenter(args.folder, device="cpu")
    trained_on = set(segmenter.manifest.training.get("sources", []))
    if args.source in trained_on:
        parser.error(f"{segmenter.key} was trained on {args.source}: measure it elsewhere")
    result: dict[str, object] = {"model": segmenter.key}
    if args.masks is not None:
        pairs = read_mask_pairs(args.masks, sources=[args.source])
        films, truth = load_pairs(pairs)
        scores = [dice(m.mask, t) for m, t in zip(segment_lungs(list(films), segmenter), truth)]
        by_label: dict[str, list[float]] = defaultdict(list)
        for pair, score in zip(pairs, scores):
            by_label[pair.image.parent.name].append(score)
        result["external_dice"] = {"source": args.source, **_summary(scores),
                                   "by_label": {k: _summary(v) for k, v in sorted(by_label.items())}}
        print(f"{segmenter.key} on {args.source}: Dice {result['external_dice']}")

    if args.films:
        rng = random.Random(0)
        fractions, regions, widths = [], [], []
        for target in args.films:
            folder, _, split = target.partition(":")
            records = [r for r in scan_folder(folder) if not split or r.split == split]
            by_source: dict[str, list] = defaultdict(list)
            for record in records:
                by_source[record.source or "unknown"].append(record)
            for group in by_source.values():
                sample = rng.sample(group, min(len(group), args.per_source))
                for start in range(0, len(sample), 32):
                    pixels = [read_image(r.path).pixels for r in sample[start : start + 32]]
                    for view in lung_views(pixels, segmenter):
                        regions.append(count_regions(view))
                        fractions.append(float(view.mean()))
                        box = lung_box(view)
                        widths.append(0.0 if box is None else box[3] - box[2])
        low, high = np.quantile(fractions, [OUTSIDE, 1 - OUTSIDE])
        result["training_films"] = {"n": len(fractions), "films": args.films, "two_regions": round(float(np.mean(np.array(regions) == 2)), 4),
                                    "lung_fraction": _summary(fractions)}
        result["lung_fraction_range"] = [round(float(low), 3), round(float(high), 3)]
        result["lung_width_min"] = round(float(np.quantile(widths, OUTSIDE)), 3)
        result["training_films"]["lung_width"] = _summary(widths)  # type: ignore[index]
        print(f"training films: {result['training_films']}; plausible lung fraction {result['lung_fraction_range']}, "
              f"width at least {result['lung_width_min']}")

    if args.write:
        manifest = segmenter.manifest
        metrics = {**manifest.metrics, **{k: v for k, v in result.items() if k != "model"}}
        written = update_manifest(args.folder, replace(manifest, metrics=metrics))
        (args.folder / "README.md").write_text(segmenter_card(written), encoding="utf-8")
        (args.folder / "measurement.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Put the burned-in text detector's boxes in front of a reviewer, and score their verdicts.

    python scripts/review_text_boxes.py sheet [--data ../shared/data/cxr] [--films 48] [--seed 2] [--out reports/text_boxes]
    python scripts/review_text_boxes.py score reports/text_boxes.json

``sheet`` runs the detector on a fixed random sample of the shared test split and writes
``OUT.png`` (one numbered crop per box, the box drawn in green) and ``OUT.json`` (film,
box, and an empty ``"verdict"`` per box). A reviewer fills each verdict with ``"text"``
(burned-in text, a laterality marker, a drawn symbol or line) or ``"other"`` (anatomy,
devices, anything else). ``score`` prints precision = text / boxes, per source and overall.
Recall is measured separately on rendered text at known places (tests/test_trust.py):
nobody has drawn ground-truth boxes on the shared films.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_core.imaging.annotations import detect_burned_in  # noqa: E402
from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.training.dataset import scan_folder  # noqa: E402

CROP = 96


def _crop(film: np.ndarray, box: dict[str, int], index: int) -> np.ndarray:
    half = max(box["width"], box["height"]) // 2 + 12
    cx, cy = box["x"] + box["width"] // 2, box["y"] + box["height"] // 2
    padded = cv2.copyMakeBorder(film, half, half, half, half, cv2.BORDER_CONSTANT, value=0)
    tile = padded[cy : cy + 2 * half, cx : cx + 2 * half]
    scale = CROP / (2 * half)
    tile = cv2.cvtColor(cv2.resize(tile, (CROP, CROP), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
    x0, y0 = int((box["x"] - cx + half) * scale), int((box["y"] - cy + half) * scale)
    cv2.rectangle(tile, (x0, y0), (x0 + int(box["width"] * scale), y0 + int(box["height"] * scale)), (0, 255, 0), 1)
    cv2.putText(tile, str(index), (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1)
    return tile


def sheet(data: Path, films: int, seed: int, out: Path) -> None:
    test = [r for r in scan_folder(data) if r.split == "test"]
    records, tiles = [], []
    for record in random.Random(seed).sample(test, films):
        film = read_image(record.path)
        pixels = (np.clip(film.pixels, 0, 1) * 255).astype(np.uint8)
        for box in detect_burned_in(film.pixels):
            b = {"x": box.x, "y": box.y, "width": box.width, "height": box.height}
            tiles.append(_crop(pixels, b, len(records)))
            records.append({"file": record.path.relative_to(data).as_posix(), "source": record.source, "box": b, "verdict": ""})
    while len(tiles) % 10:
        tiles.append(np.zeros((CROP, CROP, 3), np.uint8))
    out.parent.mkdir(parents=True, exist_ok=True)
    if tiles:
        cv2.imwrite(str(out.with_suffix(".png")), np.vstack([np.hstack(tiles[i : i + 10]) for i in range(0, len(tiles), 10)]))
    summary = {"films": films, "seed": seed, "films_with_boxes": len({r["file"] for r in records}), "boxes": len(records)}
    out.with_suffix(".json").write_text(json.dumps({"sample": summary, "boxes": records}, indent=1))
    print(json.dumps(summary))


def score(path: Path) -> None:
    records = json.loads(path.read_text())["boxes"]
    missing = [i for i, r in enumerate(records) if r["verdict"] not in ("text", "other")]
    if missing:
        sys.exit(f"boxes without a verdict: {missing}")
    result = {}
    for source in sorted({r["source"] for r in records}) + ["all"]:
        chosen = [r for r in records if source in ("all", r["source"])]
        counts = Counter(r["verdict"] for r in chosen)
        result[source] = {"boxes": len(chosen), "text": counts["text"], "precision": round(counts["text"] / len(chosen), 3)}
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sheet")
    s.add_argument("--data", type=Path, default=Path("../shared/data/cxr"))
    s.add_argument("--films", type=int, default=48)
    s.add_argument("--seed", type=int, default=2)
    s.add_argument("--out", type=Path, default=Path("reports/text_boxes"))
    c = sub.add_parser("score")
    c.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.command == "sheet":
        sheet(args.data, args.films, args.seed, args.out)
    else:
        score(args.path)


if __name__ == "__main__":
    main()

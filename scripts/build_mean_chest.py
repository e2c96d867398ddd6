"""Build cxr_core/imaging/assets/mean_chest.png: the mean upright frontal chest film, 64x64.

    python scripts/build_mean_chest.py ../shared/data/cxr

Averages every third training image of the shared data (both sources, all classes),
stretched to 64x64 like the models' input. Used to detect films that are rotated by
90/180 degrees or inverted (bones dark): such a film correlates better with a rotated or
inverted copy of this template than with the template itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "cxr_core" / "imaging" / "assets" / "mean_chest.png"


def main(root: str) -> None:
    files = sorted(Path(root).glob("train/*/*.jpg"))[::3]
    total = np.zeros((64, 64), np.float64)
    for path in files:
        film = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
        total += cv2.resize(film, (64, 64), interpolation=cv2.INTER_AREA)
    mean = total / len(files)
    Image.fromarray(np.round(mean * 255).astype(np.uint8)).save(OUT)
    print(f"{len(files)} films -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])

"""Build cxr_core/imaging/assets/lung_atlas.png from the v7labs lung masks in torchxrayvision's wheel.

    pip download --no-deps torchxrayvision==1.5.7 -d /tmp/xrv
    python scripts/build_lung_atlas.py /tmp/xrv/torchxrayvision-1.5.7-py3-none-any.whl

The wheel ships 517 lung masks (semantic_masks_v7labs_lungs.zip, no images). Masks with
less than 5% lung (unannotated films) are skipped; each remaining mask is stretched to
64x64 (the frame our models see: films are resized without keeping the aspect ratio)
and averaged. The leave-one-out Dice of the thresholded atlas against each mask is
written beside it, so the estimate's quality is stated, not assumed.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SIZE = 64
THRESHOLD = 0.4
OUT = Path(__file__).resolve().parents[1] / "cxr_core" / "imaging" / "assets"


def masks_from(path: Path) -> list[np.ndarray]:
    outer = zipfile.ZipFile(path)
    inner_name = next(n for n in outer.namelist() if n.endswith("semantic_masks_v7labs_lungs.zip"))
    inner = zipfile.ZipFile(io.BytesIO(outer.read(inner_name)))
    masks = []
    for name in sorted(inner.namelist()):
        if name.endswith("/"):
            continue
        mask = np.asarray(Image.open(io.BytesIO(inner.read(name))).convert("L"), dtype=np.float32) / 255 > 0.5
        if mask.mean() < 0.05:
            continue
        masks.append(cv2.resize(mask.astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    return masks


def main(wheel: str) -> None:
    masks = np.stack(masks_from(Path(wheel)))
    total, n = masks.sum(0), len(masks)
    binary = masks > 0.5
    dice = []
    for i in range(n):
        atlas = (total - masks[i]) / (n - 1) > THRESHOLD
        dice.append(2 * (atlas & binary[i]).sum() / (atlas.sum() + binary[i].sum()))
    OUT.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(total / n * 255).astype(np.uint8)).save(OUT / "lung_atlas.png")
    info = {
        "source": "torchxrayvision 1.5.7 wheel, data/semantic_masks_v7labs_lungs.zip (v7labs COVID-19 X-ray lung annotations)",
        "masks_used": int(n),
        "size": SIZE,
        "threshold": THRESHOLD,
        "leave_one_out_dice": {"mean": round(float(np.mean(dice)), 3), "median": round(float(np.median(dice)), 3), "p10": round(float(np.percentile(dice, 10)), 3)},
        "lung_fraction_of_frame": round(float((total / n > THRESHOLD).mean()), 3),
    }
    (OUT / "lung_atlas.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])

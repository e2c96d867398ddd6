"""Measure how bright the training films are, for the exposure check (cxr_core/imaging/quality.py).

    python scripts/measure_exposure.py ../shared/data/cxr [--out cxr_core/imaging/assets/exposure.json]

The statistic is the median grey of the whole film on [0, 1], as the app reads it. The range
kept is the 0.5th to 99.5th percentile over every training film (all labels, both sources);
the share of validation and test films outside it is recorded beside it, since that is how
often the check warns on films like the training ones. The same for local contrast
(cxr_core.imaging.quality.local_contrast, strong CLAHE-type processing): its 99.5th percentile
over the training films, and how many validation and test films are above it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_core.imaging.quality import EXPOSURE_ASSET, exposed_field, local_contrast, median_grey  # noqa: E402

QUANTILES = (0.005, 0.995)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255


def statistics(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Each film's median grey (whole film) and local contrast (its exposed field, as
    cxr_core.imaging.quality.assess_quality measures it), each film read once."""
    pairs = [(median_grey(pixels), local_contrast(exposed_field(pixels))) for pixels in map(_pixels, paths)]
    return np.array([m for m, _ in pairs]), np.array([c for _, c in pairs])


def measure(root: Path) -> dict[str, object]:
    train, train_contrast = statistics(sorted(root.glob("train/*/*.jpg")))
    if train.size == 0:
        raise SystemExit(f"No training films under {root}/train/<label>/*.jpg.")
    lo, hi = (round(float(q), 4) for q in np.quantile(train, QUANTILES))
    upper = round(float(np.quantile(train_contrast, QUANTILES[1])), 4)
    outside, above = {}, {}
    for split in ("val", "test"):
        values, contrast = statistics(sorted(root.glob(f"{split}/*/*.jpg")))
        outside[split] = {"n": int(values.size), "darker": int((values < lo).sum()), "brighter": int((values > hi).sum())}
        above[split] = {"n": int(contrast.size), "above": int((contrast > upper).sum())}
    return {
        "statistic": "median grey of the whole film on [0, 1]",
        "range": [lo, hi],
        "quantiles": list(QUANTILES),
        "measured_on": f"{train.size} training films of the shared data (COVID-19 Radiography Database and Kermany, all labels)",
        "outside_range": outside,
        "local_contrast": {
            "statistic": "mean local standard deviation of the exposed field on [0, 1] (15 px windows, stretched to 256x256)",
            "upper": upper,
            "quantile": QUANTILES[1],
            "above": above,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=EXPOSURE_ASSET)
    args = parser.parse_args(argv)
    text = json.dumps(measure(args.data), indent=1) + "\n"
    args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Build cxr_core/imaging/assets/chest_space.safetensors (see cxr_core/imaging/chest_space.py).

    python scripts/build_chest_space.py ../shared/data/cxr

Principal components from every third training film of the shared data (both sources,
every class), thresholds from every validation film. Prints the validation quantiles.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_core.imaging.chest_space import ASSET, fit_chest_space  # noqa: E402


def _films(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255 for p in paths]


def main(root: str) -> None:
    train = _films(sorted(Path(root).glob("train/*/*.jpg"))[::3])
    val = _films(sorted(Path(root).glob("val/*/*.jpg")))
    space = fit_chest_space(train, val)
    space.save(ASSET)
    print(f"{len(train)} training films, {len(val)} validation films -> {ASSET}: warn above {space.warn:.4f}, reject above {space.reject:.4f}")


if __name__ == "__main__":
    main(sys.argv[1])

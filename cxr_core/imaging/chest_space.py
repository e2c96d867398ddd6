"""How much an image looks like a frontal chest film at all, with no model involved.

"Distance from chest-film space" (Turk & Pentland's distance from face space, 1991): the
image, shrunk to 32x32 and standardised, minus its projection on the first principal
components of real chest films. Chest films are reconstructed well by a handful of
"eigen-chests"; CT slices, photographs, documents and extremity films are not.
Thresholds are quantiles of the validation films' distances. It is the same for every
model (an admin-trained model gets it too) and needs no network pass.

The basis is built by ``scripts/build_chest_space.py`` from the shared training films
(both sources, every class) and stored as safetensors with its thresholds; the
measurement of what it catches is in that script's output and the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from safetensors.numpy import load_file, save_file

from cxr_core.imaging import ASSETS  # noqa: E402

ASSET = ASSETS / "chest_space.safetensors"
SIDE = 32


@dataclass(frozen=True, eq=False)
class ChestSpace:
    mean: np.ndarray  # (SIDE*SIDE,) mean standardised chest film
    components: np.ndarray  # (K, SIDE*SIDE) orthonormal principal axes
    warn: float  # validation 99th percentile
    reject: float  # 1.1 x validation 99.9th percentile

    def distance(self, upright: np.ndarray) -> float:
        """(H, W) float image in [0, 1], already upright -> residual norm (0 .. ~1.4)."""
        d = standardise(upright) - self.mean
        return float(np.linalg.norm(d - (d @ self.components.T) @ self.components))

    def save(self, path: Path) -> None:
        save_file({"mean": self.mean.astype(np.float32), "components": self.components.astype(np.float32),
                   "thresholds": np.array([self.warn, self.reject], np.float64)}, str(path))


def standardise(pixels: np.ndarray) -> np.ndarray:
    """(H, W) -> (SIDE*SIDE,) zero mean, unit norm: brightness and contrast do not count."""
    small = cv2.resize(np.asarray(pixels, np.float32), (SIDE, SIDE), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    small -= small.mean()
    return small / (np.linalg.norm(small) + 1e-9)


def fit_chest_space(train: list[np.ndarray], val: list[np.ndarray], components: int = 10) -> ChestSpace:
    x = np.stack([standardise(p) for p in train])
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    space = ChestSpace(mean, vt[:components], 0.0, 0.0)
    distances = np.array([space.distance(p) for p in val])
    warn = float(np.quantile(distances, 0.99))
    return ChestSpace(mean, vt[:components], warn, max(warn, 1.1 * float(np.quantile(distances, 0.999))))


@lru_cache(maxsize=1)
def chest_space() -> ChestSpace | None:
    """The shipped basis, or None when the asset is absent (then the check is skipped)."""
    if not ASSET.is_file():
        return None
    t = load_file(str(ASSET))
    warn, reject = (float(v) for v in t["thresholds"])
    return ChestSpace(t["mean"].astype(np.float64), t["components"].astype(np.float64), warn, reject)

"""Synthetic labelled films for training tests: each class has a bright blob in its own place."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

BLOB_CENTRES = [(0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3)]


def synthetic_film(label_index: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """uint8 (size, size): noise plus a blob whose position encodes the class."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = BLOB_CENTRES[label_index % len(BLOB_CENTRES)]
    cy += rng.uniform(-0.05, 0.05)
    cx += rng.uniform(-0.05, 0.05)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)
    film = 0.25 + 0.6 * blob + rng.normal(0, 0.05, (size, size))
    return (np.clip(film, 0, 1) * 255).astype(np.uint8)


def make_labelled_folder(
    root: Path,
    classes: Sequence[str] = ("covid", "normal", "viral_pneumonia"),
    per_class: dict[str, int] | None = None,
    splits: bool = True,
    seed: int = 0,
    size: int = 48,
) -> Path:
    """``root/{train,val,test}/<class>/*.png`` (or ``root/<class>/*.png`` when not ``splits``)."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 16, "val": 6, "test": 6}
    for split, n in per_class.items():
        for i, cls in enumerate(classes):
            folder = root / split / cls if splits else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(synthetic_film(i, rng, size)).save(folder / f"{split}-{cls}-{k:03d}.png")
    return root

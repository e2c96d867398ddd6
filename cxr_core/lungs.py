"""Where the lungs are, roughly, and how much of a heatmap falls on them.

The estimate is a probabilistic atlas: the mean of 435 annotated lung masks (v7labs,
shipped in torchxrayvision's wheel; built by scripts/build_lung_atlas.py) in the
stretched square frame our models see, thresholded at 0.4. Against each of those masks,
left out in turn, it scores Dice 0.79 on average (median 0.82, 10th percentile 0.67):
good enough to tell a map on the lungs from one on a corner label, not a segmentation.
It does not adapt to the film: a rotated, cropped or unusually framed film will be
misjudged, which is why the figure is shown with a plain-language caveat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent / "assets"
#: Share of CAM mass in the lungs below which the page warns (most of it lies outside).
WARN_BELOW = 0.5


@dataclass(frozen=True)
class LungOverlap:
    share: float  # of the heatmap's mass inside the lung field, 0..1 (0 for an empty map)
    lung_fraction: float  # of the frame covered by the lung field: what a flat map would score
    empty: bool = False  # the map is zero everywhere: nothing to locate

    @property
    def mostly_outside(self) -> bool:
        return not self.empty and self.share < WARN_BELOW

    def describe(self) -> str:
        if self.empty:
            return "The heatmap is empty (no region supports this class)."
        text = f"{self.share:.0%} of the heatmap lies on the lung fields (a flat map: {self.lung_fraction:.0%})"
        if self.mostly_outside:
            text += ". Most of it lies outside the lungs: check for text, markers or borders driving the result."
        return text


@lru_cache(maxsize=1)
def lung_atlas() -> np.ndarray:
    """(64, 64) float32 in [0, 1]: the probability that a pixel of the stretched frame is lung."""
    return np.asarray(Image.open(ASSETS / "lung_atlas.png").convert("L"), dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def atlas_info() -> dict[str, object]:
    return json.loads((ASSETS / "lung_atlas.json").read_text(encoding="utf-8"))


def lung_field(shape: tuple[int, int], threshold: float = 0.4) -> np.ndarray:
    """(H, W) bool lung field for a film of ``shape``."""
    height, width = shape
    return cv2.resize(lung_atlas(), (width, height), interpolation=cv2.INTER_LINEAR) > threshold


def lung_overlap(heatmap: np.ndarray) -> LungOverlap:
    """Share of a non-negative (H, W) heatmap's mass inside the lung field."""
    mask = lung_field(heatmap.shape)
    weights = np.clip(heatmap, 0, None).astype(np.float64)
    total = weights.sum()
    share = float(weights[mask].sum() / total) if total > 0 else 0.0
    return LungOverlap(share=share, lung_fraction=float(mask.mean()), empty=not total > 0)

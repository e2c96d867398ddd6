"""Heatmap overlays: a greyscale film with a colour-mapped CAM blended on top."""

from __future__ import annotations

import cv2
import numpy as np

COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "hot": cv2.COLORMAP_HOT,
}


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W, 3) uint8 RGB."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    levels = np.clip(heatmap * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)


def colorscale(colormap: str = "jet", steps: int = 11) -> list[tuple[float, str]]:
    """The colormap as a plotly colorscale (``steps`` stops from 0 to 1), for colour bars that
    match the overlays exactly."""
    ramp = colorize(np.linspace(0.0, 1.0, steps, dtype=np.float32).reshape(1, -1), colormap)[0]
    return [(i / (steps - 1), f"rgb({r},{g},{b})") for i, (r, g, b) in enumerate(ramp.tolist())]


def render_overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    *,
    colormap: str = "jet",
    opacity: float = 0.4,
    threshold: float = 0.0,
) -> np.ndarray:
    """Blend a heatmap over a film.

    Args:
        pixels: (H, W) float in [0, 1], the film in display polarity.
        heatmap: (H, W) float in [0, 1], same shape (values outside are clipped).
        opacity: weight of the colour layer, 0 (film only) to 1 (map only).
        threshold: map values below it are left uncoloured, so weak activation
            does not tint the whole film.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if pixels.shape != heatmap.shape:
        raise ValueError(f"film {pixels.shape} and heatmap {heatmap.shape} differ in shape")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be in [0, 1]")
    # uint8 throughout: a 2k film's float32 RGB intermediates would cost ~40 MB each.
    film = cv2.cvtColor(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
    colour = colorize(heatmap, colormap)
    blended = cv2.addWeighted(film, 1.0 - opacity, colour, opacity, 0.0)
    if threshold > 0:
        weak = heatmap < threshold
        blended[weak] = film[weak]
    return blended


def fit_within(array: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink (H, W[, 3]) so its longer side is at most ``max_side`` (area filter); never enlarges."""
    height, width = array.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return array
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)

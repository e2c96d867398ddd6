"""Overlay rendering: opacity, threshold, colormaps, display resizing."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core.explain.overlay import colorize, fit_within, render_overlay


def test_opacity_extremes_and_threshold() -> None:
    film = np.tile(np.linspace(0, 1, 50, dtype=np.float32), (40, 1))
    heat = np.tile(np.linspace(0, 1, 40, dtype=np.float32)[:, None], (1, 50))
    grey = render_overlay(film, heat, opacity=0.0)
    assert grey.dtype == np.uint8 and grey.shape == (40, 50, 3)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and abs(int(grey[0, -1, 0]) - 255) <= 1
    np.testing.assert_array_equal(render_overlay(film, heat, opacity=1.0), colorize(heat))
    half = render_overlay(film, heat, opacity=0.5, threshold=0.5)
    assert np.array_equal(half[:10], grey[:10])  # weak rows (heat < 0.5) left uncoloured
    assert not np.array_equal(half[-10:], grey[-10:])
    with pytest.raises(ValueError):
        render_overlay(film, heat[:10], opacity=0.5)
    with pytest.raises(ValueError):
        render_overlay(film, heat, colormap="rainbow-unicorn")


def test_fit_within_keeps_aspect_and_never_enlarges() -> None:
    assert fit_within(np.zeros((2000, 1000), np.float32), 500).shape == (500, 250)
    assert fit_within(np.zeros((100, 50, 3), np.uint8), 500).shape == (100, 50, 3)

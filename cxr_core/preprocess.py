"""Pixels -> network input, the one place both inference and training use.

Training and inference must share this exactly: any drift (resize filter,
normalisation, channel layout) silently costs accuracy.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from cxr_core.manifest import InputSpec


def resize_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 -> (h, w) float32. Area filter when shrinking (anti-aliased), bilinear when growing."""
    height, width = size
    if pixels.shape == (height, width):
        return np.asarray(pixels, dtype=np.float32)
    shrinking = pixels.shape[0] > height or pixels.shape[1] > width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(np.asarray(pixels, dtype=np.float32), (width, height), interpolation=interpolation)


def mask_burned_in(pixels: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] with detected text and markers inpainted (same shape)."""
    from cxr_core.annotations import detect_burned_in, mask_boxes

    boxes = detect_burned_in(pixels)
    return mask_boxes(pixels, boxes) if boxes else pixels


def to_input(pixels: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """(H, W) float in [0, 1] -> normalised (C, h, w) float32 tensor, C = ``spec.channels``."""
    if spec.mask_burned_in:
        pixels = mask_burned_in(pixels)
    small = resize_pixels(pixels, spec.size)
    # XrayImage pixels are read-only; torch wants a writable buffer even to read it.
    grey = torch.from_numpy(small if small.flags.writeable and small.flags.c_contiguous else np.array(small, order="C"))
    mean = torch.tensor(spec.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[:, None, None]
    # Grey films feed a 3-channel (ImageNet-shaped) stem by repeating the channel.
    return (grey.unsqueeze(0).expand(spec.channels, -1, -1) - mean) / std


def to_batch(pixel_arrays: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """N arrays of shape (H_i, W_i) -> (N, C, h, w)."""
    return torch.stack([to_input(p, spec) for p in pixel_arrays])

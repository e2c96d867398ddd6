"""Pixels -> network input, the one place both inference and training use.

Training and inference must share this exactly: any drift (resize filter,
normalisation, channel layout) silently costs accuracy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from cxr_core.imaging.film import resize_pixels
from cxr_core.models.manifest import CLAHE_CLIP, InputSpec


def mask_burned_in(pixels: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] with detected text and markers inpainted (same shape)."""
    from cxr_core.imaging.annotations import detect_burned_in, mask_boxes

    boxes = detect_burned_in(pixels)
    return mask_boxes(pixels, boxes) if boxes else pixels


#: a lung box as fractions of the film: (top, bottom, left, right)
Box = tuple[float, float, float, float]
WHOLE_FILM: Box = (0.0, 1.0, 0.0, 1.0)


def lung_crop_boxes(films: Sequence[np.ndarray], spec: InputSpec) -> list[Box]:
    """Where in each (H, W) film the network looks: the whole film, or (``spec.crop`` "lungs")
    the lung box of ``spec.crop_segmenter`` with ``spec.crop_margin``.

    A film without lungs the segmenter can find is seen whole (the input check warns about it).
    """
    if spec.crop != "lungs":
        return [WHOLE_FILM] * len(films)
    from cxr_core.imaging.lungs import lung_box, lung_views, segmenter_for

    views = lung_views(films, segmenter_for(spec.crop_segmenter))
    return [lung_box(view, spec.crop_margin) or WHOLE_FILM for view in views]


def box_pixels(box: Box, shape: tuple[int, int], min_side: int = 1) -> tuple[int, int, int, int]:
    """``box`` (fractions) on an image of ``shape`` (H, W): (top, bottom, left, right) in pixels,
    at least ``min_side`` a side, within the image. The crop and its heatmap's place share it."""
    height, width = shape
    top, left = int(box[0] * height), int(box[2] * width)
    bottom = min(height, max(int(round(box[1] * height)), top + min_side))
    right = min(width, max(int(round(box[3] * width)), left + min_side))
    return top, bottom, left, right


def crop_box(pixels: np.ndarray, box: Box) -> np.ndarray:
    """(H, W) -> the part of the film inside ``box`` (at least 8 px a side)."""
    top, bottom, left, right = box_pixels(box, pixels.shape, min_side=8)
    return pixels[top:bottom, left:right]


def standardise_intensity(pixels: np.ndarray) -> np.ndarray:
    """(H, W) -> the film at zero mean and unit spread, placed at 0.5 +/- 0.25 (a film of
    average exposure on the [0, 1] scale the normalisation constants expect)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    return (pixels - pixels.mean()) / (pixels.std() + 1e-6) * 0.25 + 0.5


def clahe_intensity(pixels: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> the same film after CLAHE (clip CLAHE_CLIP, 8x8 tiles), float32 in
    [0, 1]. Quantised to 8 bits first, as the training films are (their cache is uint8), so
    inference and training give the same picture."""
    import cv2

    film = (np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(8, 8)).apply(film).astype(np.float32) / 255.0


def _apply_intensity(small: np.ndarray, mode: str) -> np.ndarray:
    if mode == "standardise":
        return standardise_intensity(small)
    if mode == "clahe":
        return clahe_intensity(small)
    return small


def network_view(pixels: np.ndarray, spec: InputSpec, box: Box | None = None) -> np.ndarray:
    """(H, W) film in [0, 1] -> the (h, w) float32 picture the network is given, before
    normalisation: text masked, cropped to ``box`` (default: :func:`lung_crop_boxes`), resized,
    intensity standardised, as ``spec`` says. Training, inference and CAMs all go through here."""
    if spec.mask_burned_in:
        pixels = mask_burned_in(pixels)
    if spec.crop != "film":
        pixels = crop_box(pixels, box if box is not None else lung_crop_boxes([pixels], spec)[0])
    small = resize_pixels(pixels, spec.size)
    return _apply_intensity(small, spec.intensity)


def to_input(pixels: np.ndarray, spec: InputSpec, box: Box | None = None) -> torch.Tensor:
    """(H, W) float in [0, 1] -> normalised (C, h, w) float32 tensor, C = ``spec.channels``."""
    small = network_view(pixels, spec, box)
    # XrayImage pixels are read-only; torch wants a writable buffer even to read it.
    grey = torch.from_numpy(small if small.flags.writeable and small.flags.c_contiguous else np.array(small, order="C"))
    mean = torch.tensor(spec.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[:, None, None]
    # Grey films feed a 3-channel (ImageNet-shaped) stem by repeating the channel.
    return (grey.unsqueeze(0).expand(spec.channels, -1, -1) - mean) / std


def to_batch(pixel_arrays: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """N arrays of shape (H_i, W_i) -> (N, C, h, w). Lung boxes are found for the batch at once."""
    boxes = lung_crop_boxes(pixel_arrays, spec)
    return torch.stack([to_input(p, spec, box) for p, box in zip(pixel_arrays, boxes)])


def normalise(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(N, S, S) uint8 -> (N, 1, S, S) float in [0, 1]."""
    return batch_uint8.unsqueeze(1).float().div_(255.0)


def to_network_input(pixels01: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """(N, 1, S, S) in [0, 1] -> normalised (N, C, S, S): the same maths as cxr_core.imaging.preprocess.to_input."""
    if spec.intensity == "standardise":
        # cxr_core.imaging.preprocess.standardise_intensity, per film (population spread, as numpy's std)
        mu = pixels01.mean(dim=(2, 3), keepdim=True)
        sigma = pixels01.std(dim=(2, 3), keepdim=True, correction=0)
        pixels01 = (pixels01 - mu) / (sigma + 1e-6) * 0.25 + 0.5
    elif spec.intensity == "clahe":
        # cxr_core.imaging.preprocess.clahe_intensity, per film (OpenCV works on one 8-bit image)
        films = pixels01[:, 0].detach().cpu().numpy()
        pixels01 = torch.from_numpy(np.stack([clahe_intensity(f) for f in films])).unsqueeze(1).to(pixels01.dtype)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels01.expand(-1, spec.channels, -1, -1) - mean) / std

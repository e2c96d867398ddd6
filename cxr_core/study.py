"""What the model is shown of a study: the film as read, optionally turned upright or
re-inverted (when the quality check suggests it and the user agrees) and with burned-in
text masked (when the user asks); and, for comparison, the same film contrast-stretched."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cxr_core.imaging.annotations import Box, detect_burned_in, mask_boxes
from cxr_core.imaging.film import XrayImage, auto_window
from cxr_core.imaging.quality import QualityReport, assess_quality, fix_orientation


@dataclass(frozen=True, eq=False)
class StudyView:
    image: XrayImage  # what the model sees
    quality: QualityReport  # of the film as read
    boxes: tuple[Box, ...]  # burned-in text and markers found (coordinates of ``image``)
    corrected: bool
    masked: bool


def study_view(original: XrayImage, *, correct: bool = False, mask_text: bool = False) -> StudyView:
    quality = assess_quality(original)
    corrected = correct and quality.fixable
    film = fix_orientation(original, quality) if corrected else original
    boxes = detect_burned_in(film.pixels)
    masked = mask_text and bool(boxes)
    if masked:
        pixels = mask_boxes(film.pixels, boxes)
        pixels.setflags(write=False)
        film = replace(film, pixels=pixels, warnings=film.warnings + (f"Burned-in text masked before inference ({len(boxes)} region(s)).",))
    return StudyView(film, quality, boxes, corrected, masked)


STRETCH_NOTE = "Contrast stretched between the film's 0.5th and 99.5th percentiles, for comparison."


def contrast_stretched(image: XrayImage) -> XrayImage:
    """The film with its (H, W) pixels stretched linearly between their 0.5th and 99.5th
    percentiles, as the reader renders a file with no window of its own.

    Predicted beside the film as read when its brightness is outside the training films'
    range: the reader then sees how much the answer hangs on the display window rather
    than being told only that it might.
    """
    pixels, _ = auto_window(image.pixels)
    pixels.setflags(write=False)
    return replace(image, pixels=pixels, warnings=image.warnings + (STRETCH_NOTE,))


def draw_boxes(rgb: np.ndarray, boxes: tuple[Box, ...], scale: float = 1.0, colour: tuple[int, int, int] = (255, 200, 0)) -> np.ndarray:
    """Outline ``boxes`` (film coordinates) on an (h, w, 3) uint8 image shown at ``scale``."""
    import cv2

    out = rgb.copy()
    thickness = max(1, round(max(out.shape[:2]) / 400))
    for b in boxes:
        x0, y0 = round(b.x * scale), round(b.y * scale)
        x1, y1 = round((b.x + b.width) * scale), round((b.y + b.height) * scale)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thickness)
    return out

"""Burned-in text, laterality markers and annotations: find them, and mask them.

Markers and text are small, high-contrast shapes on a smoother background, white on dark
or black on bright, so, for each polarity: white top-hat (bright detail smaller than the kernel), a threshold on both the top-hat
response and absolute brightness, a horizontal closing that joins letters into words,
then connected components filtered by size, fill and shape. Boxes are in the film's own
pixel coordinates. Masking fills each box by inpainting from its surroundings
(OpenCV Telea), so the model sees plausible tissue rather than a black hole.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cxr_core.imaging.lungs import lung_field

WORK_SIDE = 512  # detection runs at this long side, whatever the film's resolution


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height

    def iou(self, other: "Box") -> float:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.width, other.x + other.width)
        y1 = min(self.y + self.height, other.y + other.height)
        inter = max(0, x1 - x0) * max(0, y1 - y0)
        union = self.area + other.area - inter
        return inter / union if union else 0.0


def detect_burned_in(pixels: np.ndarray) -> tuple[Box, ...]:
    """Boxes around burned-in text and markers in an (H, W) film with values in [0, 1].

    Overlays are drawn to be seen: white on the dark field outside the body, and black on a
    bright one (the unexposed border of a CR plate shows white): both polarities are searched.
    """
    height, width = pixels.shape
    scale = WORK_SIDE / max(height, width)
    small = cv2.resize(pixels.astype(np.float32), (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    img = np.clip(small * 255, 0, 255).astype(np.uint8)
    lungs = lung_field(img.shape)
    # On the lung fields a bright, flat-surrounded bar is a rib seen end-on far more often
    # than a marker (on 48 shared test films 56 of 137 boxes were such rib segments, none
    # text): there only strokes drawn at the end of the grey scale count.
    # Off the lungs, a tall thin bar is the chest wall's edge or a rib; letters and words
    # are about as wide as tall or wider, unless drawn saturated.
    found = [b for b, saturated in _bright_marks(img) if saturated or not (_centre_in(b, lungs) or b.height > 2.4 * b.width)]
    # Dark marks only on a flat bright field (a label, the plate's border): inside the body,
    # dark detail between bright ribs and vessels is anatomy.
    found += [b for b, _ in _bright_marks(255 - img, flat_field_only=True) if all(b.iou(other) < 0.3 for other in found)]
    pad = 2
    return tuple(
        Box(
            max(0, int((b.x - pad) / scale)),
            max(0, int((b.y - pad) / scale)),
            min(width, int(np.ceil((b.width + 2 * pad) / scale))),
            min(height, int(np.ceil((b.height + 2 * pad) / scale))),
        )
        for b in found
    )


def _centre_in(box: Box, field: np.ndarray) -> bool:
    return bool(field[box.y + box.height // 2, box.x + box.width // 2])


def _bright_marks(img: np.ndarray, flat_field_only: bool = False) -> list[tuple[Box, bool]]:
    """Bright marks in a uint8 image at the working size, in its coordinates, each with
    whether its strokes are saturated; with ``flat_field_only``, only those on a flat,
    dark surround (in ``img``'s polarity)."""
    # Bright detail thinner than the kernel: letters' strokes, not the spine or the heart.
    tophat = cv2.morphologyEx(img, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (15, 15)))
    mask = (tophat >= 45).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 3)))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes: list[tuple[Box, bool]] = []
    for label, (x, y, w, h, area) in enumerate(stats[1:], start=1):
        if not (5 <= h <= 100 and 3 <= w <= 220) or h > 4 * w or w > 12 * h:
            continue  # too small, too big (a fifth of the side), or a bone edge / line
        if not 0.12 <= area / float(w * h) <= 0.97:
            continue
        ring_pad = 5
        x0, y0 = max(0, x - ring_pad), max(0, y - ring_pad)
        x1, y1 = min(img.shape[1], x + w + ring_pad), min(img.shape[0], y + h + ring_pad)
        region = img[y0:y1, x0:x1].astype(np.float32)
        inner = np.zeros(region.shape, bool)
        inner[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = True
        ring = region[~inner]
        if ring.size == 0:
            continue
        contrast = float(region[inner].max() - np.median(ring))
        strokes = img[y : y + h, x : x + w][labels[y : y + h, x : x + w] == label]
        # Overlays are drawn at the end of the grey scale; anatomy is graded.
        saturated = float(np.mean(strokes >= 250)) >= 0.3
        # Text sits on a flat field (air outside the body, a label), or is saturated, or is
        # near white and far brighter than its surround (a big marker straddling the body's
        # edge, softened by JPEG); ribs are none of these.
        if flat_field_only:
            if not (contrast >= 60 and float(ring.std()) <= 20 and float(np.median(ring)) <= 60):
                continue
        elif not ((contrast >= 60 and float(ring.std()) <= 35) or (saturated and contrast >= 50) or (float(strokes.max()) >= 245 and contrast >= 100)):
            continue
        boxes.append((Box(int(x), int(y), int(w), int(h)), saturated))
    return boxes


def mask_boxes(pixels: np.ndarray, boxes: tuple[Box, ...]) -> np.ndarray:
    """A copy of the film with each box filled from its surroundings (float32, [0, 1])."""
    if not boxes:
        return np.array(pixels, dtype=np.float32)
    mask = np.zeros(pixels.shape, np.uint8)
    for b in boxes:
        mask[b.y : b.y + b.height, b.x : b.x + b.width] = 255
    img = np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8)
    radius = max(3, int(max(pixels.shape) / 200))
    filled = cv2.inpaint(img, mask, radius, cv2.INPAINT_TELEA)
    return filled.astype(np.float32) / 255.0

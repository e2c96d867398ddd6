"""Image quality checks: rotated or inverted films, very low resolution, heavy cropping.

Orientation and polarity: the film (64x64, standardised) is correlated with a mean
upright chest film (scripts/build_mean_chest.py) and its 90/180/270-degree rotations,
each also inverted. A film is flagged when some other hypothesis beats "upright, bones
bright" by more than :data:`ORIENTATION_MARGIN`. Measured on 600 films of the shared test
split: 98.5% of rotated or inverted copies flagged (96.3% with the right correction),
1.2% of untouched films flagged.

Exposure: the film's median grey against the range of the training films
(``assets/exposure.json``, scripts/measure_exposure.py). The appearance and feature checks
standardise brightness away, so a film rendered much brighter or darker than the training
films (a DICOM's own display window, another site's processing) passed them while its
probabilities moved: the only real chest DICOM at hand (RG1, a CR whose window puts its
median grey at 0.81) gets p(COVID-19) 0.30 from DenseNet121 1.3.0 as windowed and 0.43
with a percentile stretch.

Local-contrast processing: the mean local standard deviation of the film (15 px windows at
256x256) against the training films' 99.5th percentile (the same asset). CLAHE-type
processing, which many digital systems apply, turned 165 of 246 non-COVID films into
COVID-19 calls for DenseNet121 1.3.1 and 209 for ResNet50 1.0.1
(docs/experiments/2026-12-05-gate-stress.md), while the appearance and feature checks let
most of those films through: the check names the condition so the reader can weigh the call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cxr_core.imaging import ASSETS  # noqa: E402
from cxr_core.imaging.chest_space import chest_space
from cxr_core.imaging.film import XrayImage, strided_sample

ORIENTATION_MARGIN = 0.1
MIN_SIDE = 192  # px: below this a chest film is too coarse to read
ASPECT_RANGE = (0.6, 1.7)  # width / height of a whole chest film, portrait or landscape detector
EXPOSURE_ASSET = ASSETS / "exposure.json"
#: pixel standard deviation (on [0, 1]) below which a frame is blank; chest films are far above
BLANK_CONTRAST = 0.02


#: a band along the frame's edge flatter than this (pixel SD on [0, 1]) is collimation or
#: padding, not anatomy: a body part, even a shoulder or the abdomen, is never this uniform
FLAT_EDGE_SD = 0.02
#: local contrast is measured on the film stretched to this side, in windows of this many pixels
LOCAL_CONTRAST_SIDE, LOCAL_CONTRAST_WINDOW = 256, 15
#: at most this share of a side is trimmed from each edge
MAX_EDGE_TRIM = 0.3


def exposed_field(pixels: np.ndarray) -> np.ndarray:
    """(H, W) -> the film without flat bands along its edges (a view of ``pixels``).

    A collimated CR shows its unexposed plate white, and an export may pad a film black or
    white to a square; neither is part of the chest, and a white frame made the orientation
    check below call upright films rotated and inverted (scripts/stress_gate.py). The whole
    film when no edge is flat, or when every row or column is (a blank frame).
    """
    height, width = pixels.shape
    step = max(1, max(height, width) // 512)
    small = np.asarray(pixels[::step, ::step], dtype=np.float32)
    rows, cols = small.std(axis=1) < FLAT_EDGE_SD, small.std(axis=0) < FLAT_EDGE_SD
    if rows.all() or cols.all():
        return pixels

    def leading(flat: np.ndarray, side: int) -> int:
        n = len(flat) if flat.all() else int(np.argmin(flat))
        return min(n * step, int(MAX_EDGE_TRIM * side))

    top, bottom = leading(rows, height), leading(rows[::-1], height)
    left, right = leading(cols, width), leading(cols[::-1], width)
    return pixels[top : height - bottom, left : width - right]


def _standardise(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32) - float(a.mean())
    return a / (float(np.linalg.norm(a)) + 1e-6)


@lru_cache(maxsize=1)
def _templates() -> dict[tuple[int, bool], np.ndarray]:
    mean = np.asarray(Image.open(ASSETS / "mean_chest.png").convert("L"), dtype=np.float32) / 255.0
    return {(k, inv): _standardise(np.rot90(1.0 - mean if inv else mean, k)) for k in range(4) for inv in (False, True)}


@dataclass(frozen=True)
class QualityReport:
    #: quarter turns counter-clockwise by which the film appears rotated (np.rot90's k); 0 upright
    rotation: int
    inverted: bool
    margin: float  # how much the best hypothesis beats upright/normal polarity
    chest_likeness: float  # correlation with the mean chest film in its best orientation
    low_resolution: bool
    cropped: bool
    warnings: tuple[str, ...]
    #: distance from chest-film space (cxr_core.imaging.chest_space) as the film is, and once
    #: corrected as suggested above (equal when no correction is suggested); None when the
    #: basis is not installed
    film_distance: float | None = None
    corrected_film_distance: float | None = None
    #: pixel standard deviation on [0, 1]: near 0 is a blank frame
    contrast: float = 1.0
    #: median grey on [0, 1], and "darker" / "brighter" when outside the training films' range
    median_grey: float = 0.5
    exposure: str | None = None
    #: mean local pixel standard deviation (:func:`local_contrast`), and whether it is above
    #: the training films' range (strong local-contrast processing)
    local_contrast: float = 0.0
    processed: bool = False

    @property
    def fixable(self) -> bool:
        return self.rotation != 0 or self.inverted


def shown_apart(value: float, limit: float, digits: int) -> tuple[str, str]:
    """``value`` and ``limit`` as text with ``digits`` decimals, or as many more (up to three) as it
    takes for them to differ: a value just past its limit must not read "0.65; typical films stay
    below 0.65"."""
    for places in range(digits, digits + 4):
        shown = f"{value:.{places}f}", f"{limit:.{places}f}"
        if shown[0] != shown[1]:
            break
    return shown


def median_grey(pixels: np.ndarray) -> float:
    """Median of (H, W) pixels on [0, 1]; every 4th row and column of a large film (16x fewer pixels;
    on pydicom-data's RG1 and RG3, 0.8125 vs 0.8124 and 0.8925 vs 0.8925)."""
    # 1024, not auto_window's 64: the exposure range was fitted on exact medians of 224 px films.
    return float(np.median(strided_sample(pixels, 1024)))


def local_contrast(pixels: np.ndarray) -> float:
    """Mean local standard deviation of (H, W) pixels on [0, 1]: the film stretched to
    LOCAL_CONTRAST_SIDE square, windows of LOCAL_CONTRAST_WINDOW px. CLAHE and similar
    processing raise it (on 300 test films at 224 px: 0.05 as they come, 0.095 after CLAHE clip 3)."""
    side, window = LOCAL_CONTRAST_SIDE, (LOCAL_CONTRAST_WINDOW, LOCAL_CONTRAST_WINDOW)
    small = cv2.resize(np.asarray(pixels, dtype=np.float32), (side, side), interpolation=cv2.INTER_AREA)
    mean, square = cv2.blur(small, window), cv2.blur(small * small, window)
    return float(np.sqrt(np.maximum(square - mean * mean, 0.0)).mean())


@lru_cache(maxsize=1)
def exposure_asset() -> dict[str, Any] | None:
    """The training films' exposure statistics (``assets/exposure.json``, read once per process),
    or None when the asset is absent (the checks that need it are skipped)."""
    if not EXPOSURE_ASSET.is_file():
        return None
    return dict(json.loads(EXPOSURE_ASSET.read_text()))


def local_contrast_limit() -> float | None:
    """The training films' upper local contrast (asset ``local_contrast.upper``), or None when the
    asset does not have it (check skipped)."""
    entry = (exposure_asset() or {}).get("local_contrast")
    return None if entry is None else float(entry["upper"])


def _processing_warning(value: float, contrast: float) -> str | None:
    limit = local_contrast_limit()
    if limit is None or contrast < BLANK_CONTRAST or value <= limit:
        return None
    shown, bound = shown_apart(value, limit, 3)
    return (
        f"The film looks strongly processed for local contrast (local contrast {shown}; 99.5% of the training films stay "
        f"below {bound}), as CLAHE or edge enhancement does. On films processed this way the models called most non-COVID "
        "films COVID-19 in our tests: read a COVID-19 call with particular care."
    )


def exposure_range() -> tuple[float, float] | None:
    """The training films' median-grey range, or None when the asset is absent (check skipped)."""
    asset = exposure_asset()
    if asset is None:
        return None
    lo, hi = asset["range"]
    return float(lo), float(hi)


def _exposure(grey: float, contrast: float, inverted: bool) -> tuple[str | None, str | None]:
    """("darker" | "brighter" | None, the warning) for a film's median grey."""
    bounds = exposure_range()
    if bounds is None or contrast < BLANK_CONTRAST or inverted:
        # A blank frame is rejected as such, and an inverted one is judged once corrected:
        # their brightness says nothing more.
        return None, None
    lo, hi = bounds
    if lo <= grey <= hi:
        return None, None
    side = "darker" if grey < lo else "brighter"
    shown, bound = shown_apart(grey, lo if side == "darker" else hi, 2)
    low, high = (bound, f"{hi:.2f}") if side == "darker" else (f"{lo:.2f}", bound)
    return side, (
        f"The film is {side} overall than 99% of the films the models were trained on (median grey {shown}; "
        f"theirs {low} to {high}). The probabilities can shift with brightness: for a DICOM, its display "
        "window (under the image) may differ from how the training films were exported."
    )


def assess_quality(image: XrayImage) -> QualityReport:
    """Orientation, polarity, exposure and chest-likeness of the exposed field
    (:func:`exposed_field`); resolution and shape of the image as sent. Chest-likeness is of
    the exposed field only when that has a chest film's shape: a limb film's narrow strip,
    its flat surround trimmed, must not pass for a chest."""
    pixels = exposed_field(image.pixels)
    field_aspect = pixels.shape[1] / pixels.shape[0]
    judged = pixels if ASPECT_RANGE[0] <= field_aspect <= ASPECT_RANGE[1] else image.pixels
    small = _standardise(cv2.resize(pixels, (64, 64), interpolation=cv2.INTER_AREA))
    scores = {key: float((small * t).sum()) for key, t in _templates().items()}
    best = max(scores, key=scores.get)  # type: ignore[arg-type]
    margin = scores[best] - scores[(0, False)]
    rotation, inverted = best if margin > ORIENTATION_MARGIN else (0, False)
    height, width = image.pixels.shape
    low = min(height, width) < MIN_SIDE
    aspect = width / height
    cropped = not ASPECT_RANGE[0] <= aspect <= ASPECT_RANGE[1]
    warnings = []
    if rotation:
        warnings.append(f"The film looks rotated by {90 * rotation} degrees; the model expects an upright frontal film.")
    if inverted:
        warnings.append("The film looks inverted (bones dark, air bright); the model expects bones bright.")
    if low:
        warnings.append(f"Very low resolution ({width} x {height} px): fine findings cannot be seen at this size.")
    if cropped:
        warnings.append(f"Unusual shape ({width} x {height} px): the film may be heavily cropped and miss part of the chest.")
    grey, contrast = median_grey(pixels), float(pixels.std())
    exposure, exposure_warning = _exposure(grey, contrast, inverted)
    if exposure_warning:
        warnings.append(exposure_warning)
    texture = local_contrast(pixels)
    processing_warning = _processing_warning(texture, contrast)
    if processing_warning:
        warnings.append(processing_warning)
    space = chest_space()
    distance = corrected = None
    if space is not None:
        # As presented: a rotated film is not what the model reads, so it is judged as it is
        # (chest-likeness under the best of eight orientations would let documents and
        # photos through); the corrected distance tells whether a correction would help.
        distance = corrected = space.distance(judged)
        if rotation or inverted:
            upright = np.rot90(judged, -rotation) if rotation else judged
            corrected = space.distance(1.0 - upright if inverted else upright)
    return QualityReport(rotation, inverted, margin, scores[best], low, cropped, tuple(warnings), distance, corrected, contrast, grey,
                         exposure, texture, processing_warning is not None)


def fix_orientation(image: XrayImage, report: QualityReport) -> XrayImage:
    """The film turned upright and/or re-inverted as the report suggests (a new XrayImage)."""
    pixels = np.rot90(image.pixels, -report.rotation) if report.rotation else image.pixels
    if report.inverted:
        pixels = 1.0 - pixels
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    pixels.setflags(write=False)
    done = []
    if report.rotation:
        done.append(f"rotated back by {90 * report.rotation} degrees")
    if report.inverted:
        done.append("polarity inverted")
    note = f"Corrected by the user: {', '.join(done)}." if done else ""
    metadata = replace(image.metadata, rows=int(pixels.shape[0]), columns=int(pixels.shape[1]))
    return replace(image, pixels=pixels, metadata=metadata, warnings=image.warnings + ((note,) if note else ()))

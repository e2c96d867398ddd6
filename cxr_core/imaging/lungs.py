"""Where the lungs are, and how much of a heatmap falls on them.

Per film, the lung segmenter (a small U-Net trained on one hospital's annotated masks,
``weights/lung-segmenter``, :func:`segment_lungs`) draws both lung fields. Where it is not
installed, or for a quick figure, the fallback is a probabilistic atlas: the mean of 435 annotated lung masks (v7labs,
shipped in torchxrayvision's wheel; built by scripts/build_lung_atlas.py) in the
stretched square frame our models see, thresholded at 0.4. Against each of those masks,
left out in turn, it scores Dice 0.79 on average (median 0.82, 10th percentile 0.67):
good enough to tell a map on the lungs from one on a corner label, not a segmentation.
It does not adapt to the film: a rotated, cropped or unusually framed film will be
misjudged, which is why the figure is shown with a plain-language caveat.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np
from PIL import Image

from cxr_core.models.manifest import InputSpec, Manifest

if TYPE_CHECKING:
    from cxr_core.models.loading import LoadedSegmenter

from cxr_core.imaging import ASSETS  # noqa: E402

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


def lung_overlap(heatmap: np.ndarray, field: np.ndarray | None = None) -> LungOverlap:
    """Share of a non-negative (H, W) heatmap's mass inside the lung field: ``field`` (a bool
    mask of the same film at any size, e.g. the segmenter's view) or, without one, the atlas's."""
    if field is None:
        mask = lung_field(heatmap.shape)
    else:
        mask = cv2.resize(field.astype(np.uint8), (heatmap.shape[1], heatmap.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    weights = np.clip(heatmap, 0, None).astype(np.float64)
    total = weights.sum()
    share = float(weights[mask].sum() / total) if total > 0 else 0.0
    return LungOverlap(share=share, lung_fraction=float(mask.mean()), empty=not total > 0)


# --- The lung segmenter ---------------------------------------------------------------------

#: the segmenter's input side, in pixels: the masks it learns from are drawn at 224 px
SEGMENTER_SIZE = 224
SEGMENTER_ID = "lung-segmenter"


def segmenter_manifest(version: str = "1.0.0") -> Manifest:
    """The manifest a newly trained lung segmenter gets (weights' digest filled in on save)."""
    return Manifest(
        id=SEGMENTER_ID,
        version=version,
        name="Lung fields (U-Net, ResNet-18 encoder)",
        architecture="unet-resnet18",
        classes=("lung", "background"),
        head="sigmoid",
        weights_sha256="0" * 64,
        input=InputSpec(size=(SEGMENTER_SIZE, SEGMENTER_SIZE), channels=1, mean=(0.5,), std=(0.25,), intensity="standardise"),
        class_labels={"lung": "lung field", "background": "outside the lungs"},
        intended_use=(
            "Outlines both lung fields (heart excluded) on frontal adult chest radiographs, to focus "
            "the classifiers and to check that heatmaps fall on the lungs. Not a diagnostic output."
        ),
        task="segmentation",
    )


def postprocess_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: the two largest connected regions (two lungs), holes filled.

    Small islands a network draws in the abdomen or on a label are never lungs; a hole
    (a nodule, a pacemaker lead) inside a lung field is lung field all the same.
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.argsort(areas)[::-1][:2]
    # The second region counts only if it is a lung-sized one (a fifth of the first).
    keep = [k for k in keep if stats[k, cv2.CC_STAT_AREA] >= 0.2 * areas.max()]
    kept = np.isin(labels, keep).astype(np.uint8)
    # Fill holes: what the border cannot reach through the background is inside a lung.
    flood = np.pad(1 - kept, 1, constant_values=1)
    cv2.floodFill(flood, None, (0, 0), 2)
    holes = flood[1:-1, 1:-1] == 1
    return (kept > 0) | holes


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two (H, W) bool masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def segmenter_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W) film in [0, 1] -> (size, size) float32, standardised per film (zero mean, unit spread)."""
    from cxr_core.imaging.film import resize_pixels

    small = resize_pixels(pixels, spec.size)
    return ((small - small.mean()) / (small.std() + 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class LungMask:
    """Both lung fields of one film, at the film's own size."""

    mask: np.ndarray  # (H, W) bool
    model: str  # id@version of the segmenter

    @property
    def lung_fraction(self) -> float:
        """Share of the film covered by lung field (0..1)."""
        return float(self.mask.mean())

    @property
    def regions(self) -> int:
        """Separate lung regions found (two for a usual frontal film)."""
        return count_regions(self.mask)

    def box(self, margin: float = 0.0) -> tuple[float, float, float, float] | None:
        """See :func:`lung_box`."""
        return lung_box(self.mask, margin)


def count_regions(mask: np.ndarray) -> int:
    """Separate (8-connected) regions of an (H, W) bool mask."""
    count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return int(count) - 1


def lung_box(mask: np.ndarray, margin: float = 0.0) -> tuple[float, float, float, float] | None:
    """(top, bottom, left, right) of the lung fields of an (H, W) bool mask, as fractions of
    the film's height and width, widened by ``margin`` of their own size on each side and
    clipped to the film; None when no lung was found. Fractions, so that a box found on the
    segmenter's 224 px view applies to the film at any size."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    height, width = mask.shape
    tight = (float(rows.min() / height), float((rows.max() + 1) / height), float(cols.min() / width), float((cols.max() + 1) / width))
    return widen_box(tight, margin)


def widen_box(box: tuple[float, float, float, float], margin: float) -> tuple[float, float, float, float]:
    """A tight lung box widened by ``margin`` of its own size on each side, clipped to the film
    (the one formula, so that a cached tight box gives exactly the box inference draws)."""
    top, bottom, left, right = box
    dy, dx = margin * (bottom - top), margin * (right - left)
    return (max(0.0, top - dy), min(1.0, bottom + dy), max(0.0, left - dx), min(1.0, right + dx))


_lock = threading.Lock()
_loaded: dict[str, "LoadedSegmenter"] = {}


def segmenter_folder() -> Path | None:
    """The installed lung segmenter's folder (a model folder of task segmentation in the
    weights folder), if any. Looked up once per weights folder: it is asked on every prediction."""
    from cxr_core import config
    return _segmenter_folder(str(config.weights_dir()))


@lru_cache(maxsize=8)
def _segmenter_folder(weights: str) -> Path | None:
    from cxr_core.models.loading import discover_models

    return next((found.path for found in discover_models(Path(weights), task="segmentation") if found.ok), None)


def load_default_segmenter() -> "LoadedSegmenter | None":
    """The installed lung segmenter, loaded once per process and verified; None when not installed."""
    from cxr_core.models.loading import load_segmenter

    folder = segmenter_folder()
    if folder is None:
        return None
    with _lock:
        key = str(folder)
        if key not in _loaded:
            _loaded[key] = load_segmenter(folder, device="cpu")
        return _loaded[key]


def _lung_probabilities(films: Sequence[np.ndarray], segmenter: "LoadedSegmenter") -> np.ndarray:
    """N films (H_i, W_i) in [0, 1] -> (N, S, S) float32 lung probabilities on the segmenter's square view."""
    import torch

    spec = segmenter.manifest.input
    batch = torch.from_numpy(np.stack([segmenter_input(p, spec) for p in films])).unsqueeze(1)
    with torch.inference_mode():
        return torch.sigmoid(segmenter.network(batch.to(segmenter.device)))[:, 0].float().cpu().numpy()


def segment_lungs(films: Sequence[np.ndarray], segmenter: "LoadedSegmenter") -> list[LungMask]:
    """N films (H_i, W_i) in [0, 1] -> their lung masks, each at its film's size."""
    if not films:
        return []
    out = []
    for film, p in zip(films, _lung_probabilities(films, segmenter)):
        height, width = film.shape
        # Resize the probabilities, not the 0/1 mask, so the outline is smooth at the film's size.
        full = cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
        out.append(LungMask(postprocess_mask(full), segmenter.key))
    return out


_views_lock = threading.Lock()
_views: "OrderedDict[tuple[str, str], np.ndarray]" = OrderedDict()
_VIEWS_KEPT = 256


def _pixels_key(pixels: np.ndarray) -> str:
    data = np.ascontiguousarray(pixels)
    return hashlib.blake2b(data.tobytes(), digest_size=16, person=str(data.shape).encode()[:16]).hexdigest()


def lung_views(films: Sequence[np.ndarray], segmenter: "LoadedSegmenter") -> list[np.ndarray]:
    """N films (H_i, W_i) -> their (S, S) bool lung masks on the segmenter's square view.

    Cheap at any film size, and cached by the film's pixels: a prediction's input check,
    its lung crop, its heatmaps and their faithfulness check ask for the same film in turn.
    """
    keys = [(_pixels_key(f), segmenter.key) for f in films]
    with _views_lock:
        views: list[np.ndarray | None] = [_views.get(k) for k in keys]
    missing = [i for i, v in enumerate(views) if v is None]
    if missing:
        found = _lung_probabilities([films[i] for i in missing], segmenter)
        for i, prob in zip(missing, found):
            views[i] = postprocess_mask(prob > 0.5)
    with _views_lock:
        for key, view in zip(keys, views):
            _views[key] = view  # type: ignore[assignment]
            _views.move_to_end(key)
        while len(_views) > _VIEWS_KEPT:
            _views.popitem(last=False)
    return views  # type: ignore[return-value]


def implausible_lungs(view: np.ndarray, segmenter: "LoadedSegmenter") -> str | None:
    """Why a film's lung view (an (S, S) bool mask from :func:`lung_views`) is not a plausible
    pair of lungs, or None when it is: lung field covering a share of the frame, and spanning
    a share of its width, inside what the segmenter finds on 99% of the training films (its
    manifest's ``lung_fraction_range`` and ``lung_width_min``). Two lungs that touch (one
    region) are plausible; one lung alone is too narrow."""
    fraction = float(view.mean())
    box = lung_box(view)
    width = 0.0 if box is None else box[3] - box[2]
    metrics = segmenter.manifest.metrics
    low, high = metrics.get("lung_fraction_range") or (0.0, 1.0)
    narrowest = float(metrics.get("lung_width_min") or 0.0)
    if box is None or not low <= fraction <= high or width < narrowest:
        found = "no lung field" if box is None else f"lung field covering {fraction:.0%} of the film and {width:.0%} of its width"
        return (
            f"The lung segmenter did not find a plausible pair of lungs ({found}; on 99% of the training films: "
            f"{low:.0%}-{high:.0%} of the film, at least {narrowest:.0%} of its width). "
            "Check that this is a whole, upright frontal chest film."
        )
    return None


def film_lung_fields(films: Sequence[np.ndarray]) -> list[np.ndarray | None]:
    """Each film's lung view from the installed segmenter (for :func:`lung_overlap`); Nones without one."""
    segmenter = load_default_segmenter()
    return list(lung_views(films, segmenter)) if segmenter is not None and films else [None] * len(films)


def describe_lung_fields() -> str:
    """One sentence on where the lung share's lung fields come from (the Compare page's caption)."""
    segmenter = load_default_segmenter()
    if segmenter is not None:
        external = segmenter.manifest.metrics.get("external_dice") or {}
        measured = f" (mean Dice {external['mean']} against expert outlines at {external['source']}, a hospital it never trained on)" if external else ""
        return f"Lung share: heatmap mass inside this film's own lung fields, outlined by {segmenter.key}{measured}."
    info = atlas_info()
    return (
        f"Lung share: heatmap mass inside an atlas lung field (mean of {info['masks_used']} annotated masks; leave-one-out Dice "
        f"{info['leave_one_out_dice']['mean']}). The atlas does not adapt to the film."
    )


def segmenter_for(key: str) -> "LoadedSegmenter":
    """The installed segmenter ``id@version``, loaded once; ModelError when another one (or none) is installed.

    A classifier trained on lung crops must see the crops of the segmenter it was trained
    with: another version draws other boxes, and the classifier's inputs would drift.
    """
    from cxr_core.errors import ModelError

    segmenter = load_default_segmenter()
    if segmenter is None or segmenter.key != key:
        found = segmenter.key if segmenter is not None else "none"
        raise ModelError(f"This model reads lung crops drawn by {key}, but the installed lung segmenter is {found}. Install {key}.")
    return segmenter

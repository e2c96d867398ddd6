"""Decode a labelled set once into memory, at training size, and check it.

Every image goes through :func:`cxr_core.imaging.io.read_image` and
:func:`cxr_core.imaging.film.resize_pixels`, the exact path inference uses, so training
and inference see the same pixels. Alongside: the file's sha256 (exact duplicates) and
a normalised 32x32 thumbnail (near duplicates across splits, e.g. the same film
re-encoded, resized or re-windowed).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

from cxr_core.errors import CxrError
from cxr_core.imaging.film import resize_pixels
from cxr_core.imaging.io import read_image
from cxr_core.imaging.preprocess import WHOLE_FILM, crop_box, mask_burned_in
from cxr_core.models.manifest import InputSpec
from cxr_core.training.dataset import Record

log = logging.getLogger(__name__)


THUMB = 32
#: records decoded (and lung-cropped) together
_CHUNK = 64


def thumbnail_signature(pixels: np.ndarray) -> np.ndarray:
    """(THUMB*THUMB,) float32, zero mean and unit norm: dot products are correlations.

    Chest films all look alike to perceptual hashes (on the shared data a 64-bit dHash
    called a third of the films duplicates). Correlation of 32x32 thumbnails separates
    them: measured there, test-to-train maxima have a 95th percentile of 0.959, while
    the re-encoded copies found sit above 0.99.
    """
    small = cv2.resize(np.asarray(pixels, np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    small -= small.mean()
    return (small / (np.linalg.norm(small) + 1e-6)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Readable images of ``records`` (in order), as uint8 (N, S, S), plus what was skipped."""

    records: tuple[Record, ...]
    pixels: np.ndarray  # (N, S, S) uint8
    sha256: tuple[str, ...]
    signature: np.ndarray  # (N, THUMB*THUMB) float16, see thumbnail_signature
    unreadable: tuple[tuple[str, str], ...]  # (path, reason)

    @property
    def size(self) -> int:
        return int(self.pixels.shape[1])

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            records=tuple(self.records[i] for i in idx),
            pixels=self.pixels[idx],
            sha256=tuple(self.sha256[i] for i in idx),
            signature=self.signature[idx],
            unreadable=(),
        )

    @staticmethod
    def concat(parts: Sequence["ImageSet"]) -> "ImageSet":
        return ImageSet(
            records=tuple(r for part in parts for r in part.records),
            pixels=np.concatenate([part.pixels for part in parts]),
            sha256=tuple(d for part in parts for d in part.sha256),
            signature=np.concatenate([part.signature for part in parts]),
            unreadable=tuple(u for part in parts for u in part.unreadable),
        )

    def resized(self, size: int) -> np.ndarray:
        """(N, size, size) uint8 copy (area filter), for lower-resolution training phases."""
        if size == self.size:
            return self.pixels
        return np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in self.pixels])


class LungBoxCache:
    """Tight lung boxes of training films, on disk by the file's sha256, per segmenter version.

    Segmenting every film costs about 70 ms on a 2-core CPU (some 15 minutes for the shared
    data), and the same films are read by every training run: each box is found once. The
    margin is applied afterwards with :func:`cxr_core.imaging.lungs.widen_box`, the formula inference
    uses, so a cached box is exactly the box inference draws. Lines are appended as boxes are
    found, so an interrupted run keeps what it found.
    """

    def __init__(self, segmenter_key: str) -> None:
        from cxr_core import config
        self.segmenter_key = segmenter_key
        self.path = config.var_dir() / "cache" / "lung-boxes" / f"{segmenter_key}.jsonl"
        self.known: dict[str, tuple[float, float, float, float] | None] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.known[row["sha256"]] = tuple(row["box"]) if row["box"] else None  # type: ignore[assignment]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: found again

    def boxes(self, films: Sequence[np.ndarray], digests: Sequence[str], spec: InputSpec) -> list[tuple[float, float, float, float]]:
        """The crop box of each film (``spec``'s margin; the whole film where no lungs were found)."""
        from cxr_core.imaging.lungs import lung_box, lung_views, segmenter_for, widen_box

        missing = [i for i, d in enumerate(digests) if d not in self.known]
        if missing:
            views = lung_views([films[i] for i in missing], segmenter_for(self.segmenter_key))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                for i, view in zip(missing, views):
                    tight = lung_box(view)
                    self.known[digests[i]] = tight
                    handle.write(json.dumps({"sha256": digests[i], "box": tight}) + "\n")
        return [widen_box(tight, spec.crop_margin) if (tight := self.known[d]) is not None else WHOLE_FILM for d in digests]


def load_images(
    records: Sequence[Record],
    size: int,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    mask_text: bool = False,
    crop: InputSpec | None = None,
) -> ImageSet:
    """Decode and resize every record (threads: decoding releases the GIL).

    ``mask_text`` inpaints burned-in text and markers first, exactly as inference does for
    a model trained so (:func:`cxr_core.imaging.preprocess.mask_burned_in`); a ``crop`` spec whose
    ``crop`` is "lungs" keeps the lung box its segmenter finds, as inference does
    (:func:`cxr_core.imaging.preprocess.network_view`). The duplicate signatures are of whole films.
    """

    def one(record: Record) -> tuple[np.ndarray, str, np.ndarray] | str:
        try:
            image = read_image(record.path)
        except CxrError as exc:
            return str(exc)
        pixels = mask_burned_in(image.pixels) if mask_text else image.pixels
        return pixels, image.sha256, thumbnail_signature(image.pixels)

    boxes_cache = LungBoxCache(crop.crop_segmenter) if crop is not None and crop.crop != "film" else None
    kept: list[Record] = []
    arrays: list[np.ndarray] = []
    digests: list[str] = []
    signatures: list[np.ndarray] = []
    unreadable: list[tuple[str, str]] = []
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # In chunks: the lung segmenter runs on a chunk at once, and only a chunk of
        # full-size films is held in memory.
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            results = list(pool.map(one, chunk))
            readable = [(r, res) for r, res in zip(chunk, results) if not isinstance(res, str)]
            unreadable.extend((str(r.path), res) for r, res in zip(chunk, results) if isinstance(res, str))
            films = [res[0] for _, res in readable]
            if boxes_cache is not None and crop is not None and films:
                boxes = boxes_cache.boxes(films, [res[1] for _, res in readable], crop)
            else:
                boxes = [None] * len(films)
            for (record, (pixels, digest, signature)), box in zip(readable, boxes):
                small = resize_pixels(crop_box(pixels, box) if box is not None else pixels, (size, size))
                kept.append(record)
                arrays.append(np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8))
                digests.append(digest)
                signatures.append(signature)
            before, done = done, done + len(chunk)
            if progress is not None and (done // 256 > before // 256 or done == len(records)):
                progress(done, len(records))
    if unreadable:
        log.warning("%d unreadable files skipped", len(unreadable))
    pixels = np.stack(arrays) if arrays else np.zeros((0, size, size), np.uint8)
    sigs = np.stack(signatures).astype(np.float16) if signatures else np.zeros((0, THUMB * THUMB), np.float16)
    return ImageSet(tuple(kept), pixels, tuple(digests), sigs, tuple(unreadable))


def near_duplicate_pairs(a: np.ndarray, b: np.ndarray, min_correlation: float = 0.98, chunk: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, correlation) for every pair of signatures (rows of ``a`` and ``b``) at least ``min_correlation`` alike."""
    pairs: list[tuple[int, int, float]] = []
    right = b.astype(np.float32).T
    for start in range(0, len(a), chunk):
        corr = a[start : start + chunk].astype(np.float32) @ right
        for i, j in zip(*np.nonzero(corr >= min_correlation)):
            pairs.append((start + int(i), int(j), float(corr[i, j])))
    return pairs

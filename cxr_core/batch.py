"""Batch inference over many files: decoding overlaps computing, memory stays flat.

Files are decoded by a thread pool (pydicom, OpenJPEG, Pillow and OpenCV release the
GIL) one batch ahead of the model, so on a GPU, or on a CPU with spare cores, the
network is not left waiting for JPEG 2000 decoding. Results are yielded as they come:
a folder of any size is processed with at most two batches in memory.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from cxr_core.errors import CxrError
from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.io import read_image
from cxr_core.inference import Prediction, predict
from cxr_core.models.loading import LoadedModel


@dataclass(frozen=True, eq=False)
class BatchItem:
    path: str
    image: XrayImage | None  # kept only when asked (memory)
    prediction: Prediction | None
    error: str | None
    warnings: tuple[str, ...] = ()


def _read(path: str) -> XrayImage | str:
    try:
        return read_image(path)
    except CxrError as exc:
        return str(exc)


def _chunks(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for path in paths:
        chunk.append(path)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_paths(model: LoadedModel, paths: Iterable[str], *, batch_size: int = 16, workers: int = 2, keep_images: bool = False) -> Iterator[BatchItem]:
    """Predictions for ``paths`` in order; decoding of batch n+1 runs while batch n is predicted."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit(chunk: Sequence[str]) -> list[tuple[str, Future]]:
            return [(p, pool.submit(_read, p)) for p in chunk]

        chunks = _chunks(paths, max(1, batch_size))
        pending = submit(next(chunks, []))
        while pending:
            ahead = submit(next(chunks, []))  # start decoding the next batch now
            decoded = [(p, f.result()) for p, f in pending]
            images = [im for _, im in decoded if isinstance(im, XrayImage)]
            predictions = iter(predict(model, images, batch_size=batch_size)) if images else iter(())
            for path, item in decoded:
                if isinstance(item, XrayImage):
                    yield BatchItem(path, item if keep_images else None, next(predictions), None, item.warnings)
                else:
                    yield BatchItem(path, None, None, item)
            pending = ahead

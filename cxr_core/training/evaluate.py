"""Evaluate an installed model on labelled folders, through the same path the app uses.

Files are read with :func:`cxr_core.imaging.io.read_image` and predicted with
:func:`cxr_core.inference.predict` (temperature and thresholds included), so the figures
are those a user of the app would get.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cxr_core.errors import CxrError
from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.io import read_image
from cxr_core.inference import Prediction, predict
from cxr_core.metrics import Metrics, compute_metrics
from cxr_core.models.loading import LoadedModel
from cxr_core.training.dataset import DatasetError, LabelPlan, Record, apply_plan, scan_folder

log = logging.getLogger(__name__)


def _sources(root: Path, metadata: Path | None) -> dict[Path, str]:
    candidates = [metadata] if metadata else [root / "metadata.csv", root.parent / "metadata.csv"]
    for csv_path in candidates:
        if csv_path is None or not csv_path.is_file():
            continue
        out: dict[Path, str] = {}
        with open(csv_path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("file") and row.get("source"):
                    out[(csv_path.parent / row["file"]).resolve()] = row["source"]
        return out
    return {}


def model_plan(model: LoadedModel, labels: set[str]) -> LabelPlan:
    """Folder labels -> model classes: same-named folders; for a binary model every other folder is the negative class."""
    manifest = model.manifest
    if manifest.head == "sigmoid":
        return LabelPlan.binary(manifest.classes[0], labels, negative=manifest.classes[1])
    return LabelPlan.multiclass(manifest.classes)


def predict_records(model: LoadedModel, records: Sequence[Record], *, batch_size: int = 32,
                    workers: int = 2) -> Iterator[tuple[Record, Prediction | None]]:
    """Each record with its prediction through the app's own path (reading, gate, temperature,
    thresholds), in order; None for a file that cannot be read (logged, and the rest go on)."""

    def read(record: Record) -> XrayImage | None:
        try:
            return read_image(record.path)
        except CxrError as exc:
            log.warning("skipped unreadable %s: %s", record.path.name, exc)
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = list(pool.map(read, chunk))
            kept = [(r, im) for r, im in zip(chunk, images) if im is not None]
            results = iter(predict(model, [im for _, im in kept], batch_size=batch_size)) if kept else iter(())
            for record, image in zip(chunk, images):
                yield record, (next(results) if image is not None else None)


@dataclass(frozen=True)
class ScoredEvaluation:
    """An evaluation with the per-film scores it was computed from (for its figures).

    ``labels``: (N,) class indices into the model's classes; ``probs``: (N, C) calibrated
    probabilities, one row per film with a label of the model's classes."""

    metrics: Metrics
    labels: np.ndarray
    probs: np.ndarray


def evaluate_folder(model: LoadedModel, root: Path, *, split: str | None = None, metadata: Path | None = None, batch_size: int = 32, workers: int = 2) -> Metrics:
    """The model's figures on labelled folders (every film scored through the app's own path)."""
    return score_folder(model, root, split=split, metadata=metadata, batch_size=batch_size, workers=workers).metrics


def score_folder(model: LoadedModel, root: Path, *, split: str | None = None, metadata: Path | None = None, batch_size: int = 32, workers: int = 2) -> ScoredEvaluation:
    """:func:`evaluate_folder` with the per-film labels and probabilities kept."""
    records = scan_folder(root)
    if split:
        records = [r for r in records if r.split == split]
        if not records:
            raise DatasetError(f"No images in split {split!r} under {root}.")
    plan = model_plan(model, {r.label for r in records})
    others = [r for r in records if plan.target(r.label) is None]
    records, excluded = apply_plan(records, plan)
    if excluded:
        log.info("not model classes, reported apart: %s", excluded)
    if not records:
        raise DatasetError(f"No folder under {root} is named after a class of {model.key} ({', '.join(model.manifest.classes)}).")
    source_of = _sources(root, metadata)

    classes = model.manifest.classes
    labels, predicted, probs, sources, answered = [], [], [], [], []
    other_calls: dict[str, Counter[str]] = {}
    for record, result in predict_records(model, records + others, batch_size=batch_size, workers=workers):
        if result is None:
            continue
        if record.label not in classes:  # a label the model has no class for: how it was called
            other_calls.setdefault(record.label, Counter())[result.decision or classes[0]] += 1
            continue
        labels.append(classes.index(record.label))
        # Metrics judge the decision on every film; abstention is reported beside them. The input gate is not scored here.
        predicted.append(classes.index(result.decision or classes[0]))
        probs.append(result.probabilities)
        answered.append(not result.uncertain)
        sources.append(record.source or source_of.get(record.path.resolve()))
    has_sources = any(s for s in sources)
    y, p = np.array(labels), np.array(probs)
    metrics = compute_metrics(y, np.array(predicted), p, classes, sources if has_sources else None, answered=answered)
    metrics = replace(metrics, other_labels={label: dict(sorted(c.items())) for label, c in sorted(other_calls.items())})
    return ScoredEvaluation(metrics, y, p)

"""The fixed evaluation set: training never sees it, every candidate is measured on it."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from cxr_core.fileio import write_json
from cxr_core.models.fitted_films import count_fitted, fitted_fingerprints
from cxr_core.models.loading import load_model
from cxr_core.models.manifest import Manifest
from cxr_core.models.versions import EVALUATION_NAME
from cxr_core.training.dataset import Record, scan_folder
from cxr_core.training.evaluate import evaluate_folder
from cxr_core.training.images import ImageSet, load_images, near_duplicate_pairs
from cxr_core.training.prepare import PreparedData

log = logging.getLogger(__name__)


def evaluation_records(eval_dir: Path, split: str | None = "test") -> tuple[list[Record], str | None]:
    """The films of the evaluation set that are scored, and the split they are: ``split`` when
    the set has one, else every film (None)."""
    records = scan_folder(eval_dir)
    if split and any(r.split == split for r in records):
        return [r for r in records if r.split == split], split
    return records, None


def evaluation_images(eval_dir: Path, split: str | None = "test") -> ImageSet:
    return load_images(evaluation_records(eval_dir, split)[0], 32)  # the signatures are what matters here, not the pixels


def overlap_indices(images: ImageSet, reference: ImageSet, min_correlation: float = 0.98) -> set[int]:
    """Indices of ``images`` that are exact or near copies of any ``reference`` image."""
    digests = set(reference.sha256)
    hits = {i for i, d in enumerate(images.sha256) if d in digests}
    if len(images.records) and len(reference.records):
        hits |= {i for i, _, _ in near_duplicate_pairs(images.signature, reference.signature, min_correlation)}
    return hits


def exclude_evaluation_overlap(data: PreparedData, eval_dir: Path, split: str | None = "test") -> PreparedData:
    """Drop training/validation images that also sit in the evaluation set (the report says how many)."""
    reference = evaluation_images(eval_dir, split)
    train_hits = overlap_indices(data.train, reference)
    val_hits = overlap_indices(data.val, reference)
    train = data.train.subset([i for i in range(len(data.train.records)) if i not in train_hits])
    val = data.val.subset([i for i in range(len(data.val.records)) if i not in val_hits])
    removed = len(train_hits) + len(val_hits)
    notes = data.report.notes + ((f"{removed} image(s) also in the evaluation set were removed from training/validation.",) if removed else ())
    log.info("evaluation overlap: %d train, %d val removed", len(train_hits), len(val_hits))
    return replace(data, train=train, val=val, report=replace(data.report, notes=notes, evaluation_overlap_removed=removed))


def fitted_films_in(manifest: Manifest, eval_dir: Path, split: str | None = "test") -> int:
    """How many films of the evaluation set (as :func:`evaluate_candidate` scores it)
    ``manifest``'s version was fitted on: trained, adapted or had its threshold chosen on
    (:mod:`cxr_core.models.fitted_films`); 0 without reading a file when it records none."""
    if not fitted_fingerprints(manifest):
        return 0
    return count_fitted(manifest, [r.path for r in evaluation_records(eval_dir, split)[0]])


def evaluate_candidate(folder: Path, eval_dir: Path, split: str | None = "test", out: Path | None = None) -> dict[str, object]:
    """Metrics of the model in ``folder`` on the evaluation set, written to ``out`` (default:
    its evaluation.json)."""
    model = load_model(folder)
    use_split = evaluation_records(eval_dir, split)[1]
    metrics = evaluate_folder(model, eval_dir, split=use_split).as_dict()
    # Films of the set the version was fitted on flatter it: counted, so that the promotion check
    # can say so (cxr_core.models.versions.promotion_problems).
    fitted = fitted_films_in(model.manifest, eval_dir, split)
    result = {**metrics, "evaluation_set": str(eval_dir), "split": use_split, "fitted_films": fitted,
              "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(out or Path(folder) / EVALUATION_NAME, result)
    return result


def evaluate_active_alongside(model_id: str, eval_dir: Path, split: str | None = "test") -> dict[str, object] | None:
    """Measure the active version of ``model_id`` on the same set as a new candidate, unless
    it already was: the promotion check compares like with like (a shipped model has no
    evaluation of its own on a set chosen here)."""
    from cxr_core.models.versions import evaluation_path, list_versions

    active = next((v for v in list_versions(model_id) if v.active), None)
    if active is None:
        return None
    use_split = evaluation_records(eval_dir, split)[1]
    if active.evaluation and (active.evaluation.get("evaluation_set"), active.evaluation.get("split")) == (str(eval_dir), use_split):
        return active.evaluation
    return evaluate_candidate(active.path, eval_dir, split, out=evaluation_path(active.path, active.manifest, active.shipped))


"""From a labelled folder to checked train/val/test image sets and a validation report.

Checks before any training: per-class counts, unreadable files (listed, skipped),
exact duplicates (sha256) and near duplicates (dHash) across splits (the later split
keeps its copy, the earlier loses it: test > val > train), patients on both sides of a
split, excluded labels, class imbalance. Empty classes or a single class are errors.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from cxr_core.models.manifest import InputSpec
from cxr_core.training.dataset import (
    SPLITS,
    DatasetError,
    LabelPlan,
    Record,
    apply_plan,
    assign_splits,
    remove_patient_leaks,
    scan_folder,
)
from cxr_core.training.images import ImageSet, load_images, near_duplicate_pairs

log = logging.getLogger(__name__)

_RANK = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ValidationReport:
    """What was found in the data and what was done about it. ``problems`` block training."""

    root: str
    classes: tuple[str, ...]
    counts: Mapping[str, Mapping[str, int]]  # split -> class -> images kept
    sources: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # split -> source -> images
    unreadable: tuple[tuple[str, str], ...] = ()
    excluded_labels: Mapping[str, int] = field(default_factory=dict)
    patient_leaks_removed: Mapping[str, int] = field(default_factory=dict)
    exact_duplicates_within_split: int = 0
    exact_duplicates_removed: tuple[tuple[str, str], ...] = ()  # (removed path, kept path)
    near_duplicates_removed: tuple[tuple[str, str, float], ...] = ()  # (removed, kept, correlation)
    evaluation_overlap_removed: int = 0
    imbalance_ratio: float = 1.0
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "root": self.root,
            "classes": list(self.classes),
            "counts": {s: dict(c) for s, c in self.counts.items()},
            "sources": {s: dict(c) for s, c in self.sources.items()},
            "unreadable": len(self.unreadable),
            "excluded_labels": dict(self.excluded_labels),
            "patient_leaks_removed": dict(self.patient_leaks_removed),
            "exact_duplicates_within_split": self.exact_duplicates_within_split,
            "exact_duplicates_removed": len(self.exact_duplicates_removed),
            "near_duplicates_removed": len(self.near_duplicates_removed),
            "evaluation_overlap_removed": self.evaluation_overlap_removed,
            "imbalance_ratio": round(self.imbalance_ratio, 3),
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


@dataclass(frozen=True, eq=False)
class PreparedData:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    report: ValidationReport
    plan: LabelPlan


def _dedupe_across_splits(images: ImageSet, min_correlation: float) -> tuple[list[int], list[tuple[str, str]], list[tuple[str, str, float]], int]:
    """Indices to keep; exact and near duplicates removed from the earlier split."""
    n = len(images.records)
    split_rank = [_RANK.get(r.split or "train", 0) for r in images.records]
    removed: set[int] = set()
    exact_removed: list[tuple[str, str]] = []
    within = 0
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(images.sha256):
        by_digest[digest].append(i)
    for group in by_digest.values():
        if len(group) < 2:
            continue
        keeper = max(group, key=lambda i: (split_rank[i], -i))
        for i in group:
            if i == keeper:
                continue
            if split_rank[i] == split_rank[keeper]:
                within += 1  # harmless for leakage; a second copy in the same split
                continue
            removed.add(i)
            exact_removed.append((str(images.records[i].path), str(images.records[keeper].path)))

    near_removed: list[tuple[str, str, float]] = []
    for rank_low, rank_high in ((0, 1), (0, 2), (1, 2)):
        low = [i for i in range(n) if split_rank[i] == rank_low and i not in removed]
        high = [i for i in range(n) if split_rank[i] == rank_high]
        if not low or not high:
            continue
        for a, b, corr in near_duplicate_pairs(images.signature[low], images.signature[high], min_correlation):
            i, j = low[a], high[b]
            if i not in removed:
                removed.add(i)
                near_removed.append((str(images.records[i].path), str(images.records[j].path), round(corr, 4)))
    keep = [i for i in range(n) if i not in removed]
    return keep, exact_removed, near_removed, within


def scan_folders(roots: Path | str | Sequence[Path | str]) -> list[Record]:
    """The records of one labelled folder or of several, merged (each with its own metadata.csv)."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    if not roots:
        raise DatasetError("No data folder was given.")
    return [record for root in roots for record in scan_folder(root)]


def describe_roots(roots: Path | str | Sequence[Path | str]) -> str:
    """How a report names the data: the folder, or the folders joined by " + "."""
    return str(roots) if isinstance(roots, (str, Path)) else " + ".join(str(r) for r in roots)


#: fewer training films of a class than this draws a warning: a fine-tune learns little from them
MIN_TRAIN_FILMS = 20
#: fewer validation films than this: its sensitivity moves by 20% or more with each film
MIN_VAL_FILMS = 5


def prepare_data(
    root: Path | str | Sequence[Path | str],
    plan: LabelPlan | None,
    size: int,
    *,
    val_fraction: float = 0.1,
    near_duplicate_correlation: float = 0.98,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    mask_text: bool = False,
    crop: InputSpec | None = None,
) -> PreparedData:
    """Scan, check and decode a labelled folder, or several merged into one set (duplicates,
    patients and splits checked across all of them). Raises DatasetError when it cannot be
    trained on. ``crop``: see :func:`~cxr_core.training.images.load_images`."""
    records = scan_folders(root)
    labels = sorted({r.label for r in records})
    plan = plan or LabelPlan.multiclass(labels)
    records, excluded = apply_plan(records, plan)
    present = {r.label for r in records}
    empty = [c for c in plan.classes if c not in present and c not in plan.optional]
    if empty:
        raise DatasetError(
            f"Class folder(s) {', '.join(empty)} hold no images (labels found: {', '.join(labels) or 'none'})."
        )
    if len(present) < 2:
        raise DatasetError("Training needs at least two classes with images; only one was found.")
    unsplit = sum(r.split is None for r in records)
    records = assign_splits(records, val_fraction=val_fraction)
    records, leaks = remove_patient_leaks(records)

    images = load_images(records, size, workers=workers, progress=progress, mask_text=mask_text, crop=crop)
    keep, exact_removed, near_removed, within = _dedupe_across_splits(images, near_duplicate_correlation)
    kept = images.subset(keep)

    by_split = {s: [i for i, r in enumerate(kept.records) if r.split == s] for s in SPLITS}
    counts = {s: dict(Counter(kept.records[i].label for i in idx)) for s, idx in by_split.items() if idx}
    sources = {s: dict(Counter(kept.records[i].source or "unknown" for i in idx)) for s, idx in by_split.items() if idx}
    problems: list[str] = []
    notes: list[str] = []
    train_counts = counts.get("train", {})
    for cls in plan.classes:
        if cls in plan.optional and cls not in present:
            notes.append(f"Class {cls!r} has no films: the model trained before keeps it (distillation).")
            continue
        if train_counts.get(cls, 0) == 0:
            problems.append(f"Class {cls!r} has no readable training images.")
        if counts.get("val", {}).get(cls, 0) == 0:
            problems.append(f"Class {cls!r} has no validation images (needed for early stopping and calibration).")
    if unsplit:
        notes.append(f"{unsplit} image(s) had no train/val folder: {val_fraction:.0%} of their patients (by a hash of the "
                     "patient id, or of the file name without one), at least one per class, were set aside for validation; "
                     "a patient's films stay together.")
    for cls in plan.classes:
        have = (train_counts.get(cls, 0), counts.get("val", {}).get(cls, 0))
        few_train, few_val = 0 < have[0] < MIN_TRAIN_FILMS, 0 < have[1] < MIN_VAL_FILMS
        if few_train and few_val:
            notes.append(f"Class {cls!r} has only {have[0]} training and {have[1]} validation film(s): too few to train "
                         f"(at least {MIN_TRAIN_FILMS}) or to measure (at least {MIN_VAL_FILMS}) it reliably.")
        elif few_train:
            notes.append(f"Class {cls!r} has only {have[0]} training film(s): too few to train it reliably "
                         f"(at least {MIN_TRAIN_FILMS}).")
        elif few_val:
            # Say which of the two is short: 23 training films are enough, 1 validation film is not.
            notes.append(f"Class {cls!r} has only {have[1]} validation film(s) (and {have[0]} training): too few to measure "
                         f"it reliably (at least {MIN_VAL_FILMS}).")
    nonzero = [v for v in train_counts.values() if v]
    ratio = max(nonzero) / min(nonzero) if nonzero else 1.0
    if ratio > 3:
        notes.append(f"Classes are imbalanced (largest/smallest = {ratio:.1f}); class weighting is advised.")
    if images.unreadable:
        notes.append(f"{len(images.unreadable)} unreadable file(s) skipped.")
    if crop is not None and crop.crop == "lungs":
        notes.append(f"Every film was cropped to its lung fields ({crop.crop_segmenter}, margin {crop.crop_margin:.0%}).")
    if mask_text:
        notes.append("Burned-in text and markers were masked (inpainted) on every film before training.")
    if leaks:
        notes.append(f"Images of patients present in several splits removed: {leaks}.")
    if exact_removed or near_removed:
        notes.append(f"Duplicates across splits removed from the earlier split: {len(exact_removed)} exact, {len(near_removed)} near.")
    report = ValidationReport(
        root=describe_roots(root),
        classes=plan.classes,
        counts=counts,
        sources=sources,
        unreadable=images.unreadable,
        excluded_labels=excluded,
        patient_leaks_removed=leaks,
        exact_duplicates_within_split=within,
        exact_duplicates_removed=tuple(exact_removed),
        near_duplicates_removed=tuple(near_removed),
        imbalance_ratio=ratio,
        problems=tuple(problems),
        notes=tuple(notes),
    )
    if problems:
        raise DatasetError(" ".join(problems))
    test = kept.subset(by_split["test"]) if by_split["test"] else None
    return PreparedData(kept.subset(by_split["train"]), kept.subset(by_split["val"]), test, report, plan)

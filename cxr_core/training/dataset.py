"""Labelled image folders: find the images, map labels to classes, assign splits.

Accepted layouts (any format :func:`cxr_core.imaging.io.read_image` reads, DICOM included):

* ``ROOT/<class>/<image>``: one sub-folder per class, no splits (they are made here);
* ``ROOT/{train,val,test}/<class>/<image>``: splits given by the folders;
* either of the above with ``ROOT/metadata.csv`` (columns ``file`` relative to ROOT,
  and optionally ``label``, ``split``, ``patient_id``, ``source``), which wins over folders.

When patient ids exist, no patient may sit on both sides of a split: patients found in
more than one split are removed from train/val (test, the fixed benchmark, is kept) and
reported.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from cxr_core.errors import CxrError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
METADATA_NAME = "metadata.csv"
_SKIP_NAMES = {METADATA_NAME, "README.md", "README.txt", ".DS_Store", "Thumbs.db"}


class DatasetError(CxrError):
    """The labelled folder cannot be used for training as it is."""


@dataclass(frozen=True)
class Record:
    """One labelled image. ``label`` is the folder/CSV label before any class mapping."""

    path: Path
    label: str
    split: str | None = None
    patient_id: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class LabelPlan:
    """Which folder labels feed which model class.

    ``mapping`` sends folder labels to classes; labels absent from it are excluded.
    For a binary covid-vs-other model every other label maps to ``other``.
    """

    classes: tuple[str, ...]
    mapping: Mapping[str, str] = field(default_factory=dict)
    #: classes that may hold no films (taught by distillation from the model trained before)
    optional: frozenset[str] = frozenset()

    @classmethod
    def multiclass(cls, classes: Sequence[str]) -> "LabelPlan":
        return cls(tuple(classes), {c: c for c in classes})

    @classmethod
    def binary(cls, positive: str, labels: Iterable[str], negative: str = "other") -> "LabelPlan":
        mapping = {label: (positive if label == positive else negative) for label in labels}
        return cls((positive, negative), mapping)

    def target(self, label: str) -> str | None:
        return self.mapping.get(label)


def _is_image_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name not in _SKIP_NAMES


def _from_metadata(root: Path) -> list[Record]:
    records: list[Record] = []
    with open(root / METADATA_NAME, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise DatasetError(f"{METADATA_NAME} needs a 'file' column (path relative to the folder).")
        for row in reader:
            relative = Path(row["file"])
            if relative.is_absolute() or ".." in relative.parts:
                raise DatasetError(f"{METADATA_NAME} names a file outside the folder: {row['file']!r}.")
            path = root / relative
            label = (row.get("label") or "").strip() or path.parent.name
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise DatasetError(f"{METADATA_NAME}: unknown split {split!r} (use {', '.join(SPLITS)}).")
            records.append(
                Record(path, label, split, (row.get("patient_id") or "").strip() or None, (row.get("source") or "").strip() or None)
            )
    return records


def _from_folders(root: Path) -> list[Record]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and all(p.name in SPLITS for p in subdirs):
        layout = [(split_dir.name, class_dir) for split_dir in subdirs for class_dir in sorted(split_dir.iterdir()) if class_dir.is_dir()]
    else:
        layout = [(None, class_dir) for class_dir in subdirs]
    records: list[Record] = []
    for split, class_dir in layout:
        for path in sorted(p for p in class_dir.rglob("*") if _is_image_candidate(p)):
            records.append(Record(path, class_dir.name, split))
    return records


def scan_folder(root: Path | str) -> list[Record]:
    """Every candidate image under ``root`` with its label (and split/patient/source if known)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder.")
    records = _from_metadata(root) if (root / METADATA_NAME).is_file() else _from_folders(root)
    if not records:
        raise DatasetError(f"No images found under {root}: expected one sub-folder per class.")
    return records


def by_source_and_label(records: Sequence[Record], split: str) -> dict[str, list[Record]]:
    """The records of one split grouped as ``"source/label"``, groups sorted, files in order
    (how the measurement scripts report per-source results)."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        if record.split == split:
            groups.setdefault(f"{record.source}/{record.label}", []).append(record)
    return dict(sorted(groups.items()))


def _bucket(key: str, salt: str) -> float:
    """Deterministic pseudo-random number in [0, 1) from a key: splits stable across runs and machines."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_key(record: Record) -> str:
    """What a split is drawn for: the patient, or the file (by label and name, not by where the
    folder happens to sit, so that the same upload splits the same way on every machine)."""
    return record.patient_id or f"{record.label}/{record.path.name}"


def assign_splits(records: Sequence[Record], val_fraction: float = 0.1, test_fraction: float = 0.0, salt: str = "cxr") -> list[Record]:
    """Give records without a split one, grouped by patient (or by file when no patient id)."""
    out = []
    for record in records:
        if record.split is not None:
            out.append(record)
            continue
        u = _bucket(split_key(record), salt)
        split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        out.append(replace(record, split=split))
    return _validate_every_class(records, out, salt) if val_fraction > 0 else out


def _validate_every_class(given: Sequence[Record], assigned: list[Record], salt: str) -> list[Record]:
    """Give each class at least one validation patient when the hash gave it none and it has
    two or more patients in train (a small class would otherwise be refused for having no
    validation images). The patient whose hash is smallest moves, with all their films."""
    group = [split_key(r) for r in given]
    auto = [g.split is None for g in given]
    for label in sorted({r.label for r in assigned}):
        if any(r.label == label and r.split == "val" for r in assigned):
            continue
        candidates = sorted({group[i] for i, r in enumerate(assigned) if auto[i] and r.label == label and r.split == "train"},
                            key=lambda key: _bucket(key, salt))
        if len(candidates) >= 2:
            chosen = candidates[0]
            assigned = [replace(r, split="val") if auto[i] and group[i] == chosen else r for i, r in enumerate(assigned)]
    return assigned


def remove_patient_leaks(records: Sequence[Record]) -> tuple[list[Record], dict[str, int]]:
    """Drop train/val images of patients who also appear in another split.

    Test images are kept: the test split is the fixed benchmark. Returns the kept records
    and how many were dropped per split.
    """
    splits_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.patient_id:
            splits_of[r.patient_id].add(r.split or "")
    leaking = {p for p, s in splits_of.items() if len(s) > 1}
    kept: list[Record] = []
    dropped: Counter[str] = Counter()
    for r in records:
        if r.patient_id in leaking:
            other = splits_of[r.patient_id] - {r.split}
            # Drop from train when the patient is also in val or test; from val when also in test.
            if (r.split == "train" and other) or (r.split == "val" and "test" in other):
                dropped[r.split or ""] += 1
                continue
        kept.append(r)
    if dropped:
        log.info("removed %s images of %d patients present in several splits", dict(dropped), len(leaking))
    return kept, dict(dropped)


def apply_plan(records: Sequence[Record], plan: LabelPlan) -> tuple[list[Record], dict[str, int]]:
    """Keep records whose label maps to a class, relabelled; count the excluded labels."""
    kept, excluded = [], Counter()
    for r in records:
        target = plan.target(r.label)
        if target is None:
            excluded[r.label] += 1
        else:
            kept.append(replace(r, label=target))
    return kept, dict(excluded)

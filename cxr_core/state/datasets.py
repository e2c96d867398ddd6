"""Labelled datasets uploaded through the app, stored under ``var/datasets/<id>/``.

    <id>/data/          the files, as uploaded (zip extracted safely)
    <id>/meta.json      name, who uploaded it and when
    <id>/report.json    the validation report (computed once, then cached)
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from cxr_core import config
from cxr_core.errors import CxrError
from cxr_core.fileio import write_json
from cxr_core.state.archive import extract_zip, save_files


def datasets_dir() -> Path:
    return config.var_dir() / "datasets"


@dataclass(frozen=True)
class Dataset:
    id: str
    folder: Path
    name: str
    uploaded_by: str
    created: str

    @property
    def root(self) -> Path:
        """The labelled folder: the upload, minus wrapping folders that hold only one folder."""
        root = self.folder / "data"
        while True:
            entries = [p for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []
            if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "val", "test"):
                inner = [p for p in entries[0].iterdir() if p.is_dir()]
                if inner and not any(p.is_file() for p in entries[0].iterdir() if p.name != "metadata.csv"):
                    root = entries[0]
                    continue
            return root

    def report(self) -> dict[str, Any] | None:
        path = self.folder / "report.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def confirmation(self) -> dict[str, Any] | None:
        """Who confirmed the checked dataset for training, and when; None until then."""
        path = self.folder / "confirmed.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    @property
    def trainable(self) -> bool:
        """Checked without problems and confirmed by an admin after reading the check."""
        report = self.report()
        return bool(report and report.get("ok")) and self.confirmation() is not None


class DatasetNotReady(CxrError):
    """The dataset has not passed its check, or nobody has confirmed it."""


def confirm_dataset(dataset: Dataset, user: str) -> None:
    """Record that ``user`` read the validation report and accepts the dataset for training."""
    report = dataset.report()
    if not report:
        raise DatasetNotReady("Check the dataset before confirming it.")
    if not report.get("ok"):
        raise DatasetNotReady("This dataset failed its check: " + "; ".join(report.get("problems", [])))
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(dataset.folder / "confirmed.json", {"user": user, "time": when, "report_validated": report.get("validated")})


def store_upload(name: str, user: str, *, files: Sequence[tuple[str, bytes]] | None = None, archive: bytes | None = None) -> Dataset:
    if (files is None) == (archive is None):
        raise CxrError("Give either uploaded files or one zip archive.")
    dataset_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    folder = datasets_dir() / dataset_id
    folder.mkdir(parents=True)
    try:
        if archive is not None:
            extract_zip(archive, folder / "data")
        else:
            save_files(files or [], folder / "data")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (folder / "meta.json").write_text(json.dumps({"name": name, "uploaded_by": user, "created": created}), encoding="utf-8")
    return Dataset(dataset_id, folder, name, user, created)


def list_datasets() -> list[Dataset]:
    root = datasets_dir()
    out = []
    if root.is_dir():
        for folder in sorted((p for p in root.iterdir() if (p / "meta.json").exists()), reverse=True):
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            out.append(Dataset(folder.name, folder, meta.get("name", folder.name), meta.get("uploaded_by", "?"), meta.get("created", "")))
    return out


def validate_dataset(dataset: Dataset, eval_dir: Path | None = None, eval_split: str | None = "test", thumbnails: int = 4) -> dict[str, Any]:
    """The training pipeline's validation report plus overlap with the evaluation set; cached in report.json."""
    from cxr_core.training.dataset import DatasetError
    from cxr_core.training.evaluation_set import evaluation_images, overlap_indices
    from cxr_core.training.images import ImageSet
    from cxr_core.training.prepare import prepare_data

    try:
        data = prepare_data(dataset.root, None, 64)
    except DatasetError as exc:
        report: dict[str, Any] = {"ok": False, "problems": [str(exc)]}
    else:
        report = {"ok": True, **data.report.as_dict()}
        report["unreadable_files"] = [(str(Path(p).relative_to(dataset.root)), why) for p, why in data.report.unreadable[:50]]
        everything = ImageSet.concat([s for s in (data.train, data.val, data.test) if s is not None])
        if eval_dir is not None and Path(eval_dir).is_dir():
            hits = overlap_indices(everything, evaluation_images(Path(eval_dir), eval_split))
            report["evaluation_overlap"] = len(hits)
            report["evaluation_set"] = str(eval_dir)
        by_class: dict[str, list[str]] = {}
        for record in everything.records:
            by_class.setdefault(record.label, [])
            if len(by_class[record.label]) < thumbnails:
                by_class[record.label].append(str(record.path.relative_to(dataset.root)))
        report["thumbnails"] = by_class
    report["validated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (dataset.folder / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (dataset.folder / "confirmed.json").unlink(missing_ok=True)  # a new report needs a new confirmation
    return report


def delete_dataset(dataset: Dataset) -> None:
    shutil.rmtree(dataset.folder)


@dataclass(frozen=True)
class EvaluationChoice:
    """A folder that can serve as the fixed evaluation set, as an admin picks it."""

    label: str
    path: Path


def evaluation_choices(exclude: str | None = None) -> list[EvaluationChoice]:
    """Where an evaluation set can come from: the server's ``CXR_EVAL_DIR`` when it is a
    folder, then every uploaded dataset that passed its check (newest first), except the
    dataset ``exclude`` (the one being trained on)."""
    import os

    choices: list[EvaluationChoice] = []
    server = os.environ.get("CXR_EVAL_DIR", "").strip()
    if server and Path(server).is_dir():
        choices.append(EvaluationChoice(f"The server's evaluation set ({server})", Path(server)))
    for dataset in list_datasets():
        report = dataset.report()
        if dataset.id != exclude and report and report.get("ok"):
            choices.append(EvaluationChoice(f"{dataset.name} (uploaded {dataset.created[:10]} by {dataset.uploaded_by})", dataset.root))
    return choices

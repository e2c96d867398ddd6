"""scripts/build_sites.py: a made-up site takes the films the notebook names, in path order, with their
patient ids; its replay folder is the shared train and val splits less those films."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cxr_core.training.dataset import scan_folder
from tests.conftest import load_script


def _folder(root: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    """rows: (file, split, label, source, patient_id); the files are empty placeholders."""
    for file, *_ in rows:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_bytes(b"")
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "split", "label", "source", "patient_id"])
        writer.writerows(rows)


def _shared(data: Path) -> None:
    _folder(data / "cxr", [(f"val/covid/c19rdb-COVID-{i}.jpg", "val", "covid", "c19rdb", "") for i in (3, 1, 2, 4)]
            + [("train/covid/c19rdb-COVID-9.jpg", "train", "covid", "c19rdb", ""),
               ("train/normal/kermany-a.jpg", "train", "normal", "kermany", "kermany-a"),
               ("test/normal/kermany-b.jpg", "test", "normal", "kermany", "kermany-b")])
    # Path order puts test before train: the order the notebook's sites were drawn in.
    _folder(data / "cxr-extra", [("train/normal/openist-a.jpg", "train", "normal", "openist", "o-a"),
                                 ("test/normal/openist-z.jpg", "test", "normal", "openist", "o-z"),
                                 ("train/pneumonia/nih-1.jpg", "train", "pneumonia", "nih_pneumonia", "nih-p7")])
    _folder(data / "cxr-external" / "jsrt", [("normal/jsrt-N1.jpg", "test", "normal", "jsrt", "jsrt-N1"),
                                             ("nodule/jsrt-L1.jpg", "test", "nodule", "jsrt", "jsrt-L1")])


def test_a_site_takes_the_named_films_and_its_replay_leaves_them_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sites = load_script("build_sites")
    _shared(tmp_path / "data")
    monkeypatch.setattr(sites, "SITES", {"a": {"covid": (1, 2), "openist": (1, 1), "nih": (1, 1)},
                                         "b": {"covid": (3, 4), "jsrt-nodule": (1, 1)}})
    monkeypatch.setattr(sites, "REPLAY", {"a": "replay-a"})
    counts = sites.build(tmp_path / "out", tmp_path / "data")
    assert counts == {"a": 4, "replay-a": 4, "b": 3}

    site = {(r.path.name, r.label, r.patient_id, r.split) for r in scan_folder(tmp_path / "out" / "a")}
    assert site == {("c19rdb-COVID-1.jpg", "covid", None, None), ("c19rdb-COVID-2.jpg", "covid", None, None),
                    ("openist-z.jpg", "normal", "o-z", None), ("nih-1.jpg", "pneumonia", "nih-p7", None)}
    assert all(r.path.resolve().is_relative_to((tmp_path / "data").resolve()) for r in scan_folder(tmp_path / "out" / "a"))
    assert {r.path.name for r in scan_folder(tmp_path / "out" / "b")} == {"c19rdb-COVID-3.jpg", "c19rdb-COVID-4.jpg", "jsrt-L1.jpg"}

    replay = {(r.path.name, r.split) for r in scan_folder(tmp_path / "out" / "replay-a")}
    assert replay == {("c19rdb-COVID-3.jpg", "val"), ("c19rdb-COVID-4.jpg", "val"), ("c19rdb-COVID-9.jpg", "train"),
                      ("kermany-a.jpg", "train")}

    # Built again over the old folders: the same, nothing left over.
    assert sites.build(tmp_path / "out", tmp_path / "data") == counts

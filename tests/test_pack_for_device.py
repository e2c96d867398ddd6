"""scripts/pack_for_device.py: parts under the size asked, every image once and unchanged,
metadata rows of the packed files only, and the parts copied together scan like the original."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.training.dataset import scan_folder
from tests.conftest import load_script


def _data(root: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for split in ("train", "val", "test"):
        for label in ("covid", "normal", "bacterial_pneumonia"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                name = f"{split}/{label}/{label}-{split}-{i}.png"
                # Noise compresses badly, so every file is a few kB and the parts fill up.
                Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / name)
                rows.append({"file": name, "split": split, "label": label, "source": "s", "patient_id": f"{label}-{split}-{i}"})
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_parts_hold_every_chosen_image_once_and_rebuild_the_folder(tmp_path: Path) -> None:
    pack = load_script("pack_for_device")
    data = tmp_path / "data"
    _data(data)
    one_file = (data / "train/covid/covid-train-0.png").stat().st_size
    folders = pack.pack(data, ["covid", "normal"], ["train", "val", "test"], tmp_path / "out", part_bytes=5 * one_file)

    assert len(folders) >= 4  # 24 images of about one_file bytes each, at most 5 a part
    packed: list[str] = []
    for folder in folders:
        images = [p for p in folder.rglob("*.png")]
        assert sum(p.stat().st_size for p in images) <= 5 * one_file
        packed += [p.relative_to(folder).as_posix() for p in images]
        assert (folder / "EXPECTED").read_text().strip() == "24"
        with open(folder / "metadata.csv", newline="") as handle:
            listed = {row["file"] for row in csv.DictReader(handle)}
        assert len(listed) == 24 and not any("bacterial" in f for f in listed)
    assert sorted(packed) == sorted(set(packed)) and len(packed) == 24
    for rel in packed:
        assert (data / rel).read_bytes() == next(f / rel for f in folders if (f / rel).exists()).read_bytes()

    rebuilt = tmp_path / "rebuilt"
    for folder in folders:
        shutil.copytree(folder, rebuilt, dirs_exist_ok=True)
    key = lambda r, root: (Path(r.path).relative_to(root).as_posix(), r.label, r.split, r.patient_id, r.source)  # noqa: E731
    original = sorted(key(r, data) for r in scan_folder(data) if r.label != "bacterial_pneumonia")
    assert sorted(key(r, rebuilt) for r in scan_folder(rebuilt)) == original


def test_a_missing_label_folder_is_named(tmp_path: Path) -> None:
    pack = load_script("pack_for_device")
    data = tmp_path / "data"
    _data(data)
    with pytest.raises(SystemExit, match="viral_pneumonia"):
        pack.pack(data, ["covid", "viral_pneumonia"], ["train"], tmp_path / "out", part_bytes=2**20)


def test_an_out_folder_holding_other_things_is_left_alone(tmp_path: Path) -> None:
    pack = load_script("pack_for_device")
    data = tmp_path / "data"
    _data(data)
    out = tmp_path / "out"
    pack.pack(data, ["covid"], ["train"], out, part_bytes=2**20)
    pack.pack(data, ["covid"], ["train"], out, part_bytes=2**20)  # earlier parts are replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="choose another --out"):
        pack.pack(data, ["covid"], ["train"], out, part_bytes=2**20)
    assert (out / "notes.txt").read_text() == "mine"

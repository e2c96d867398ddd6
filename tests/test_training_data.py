"""Dataset scanning and validation before training."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.training.dataset import (
    DatasetError,
    LabelPlan,
    Record,
    assign_splits,
    by_source_and_label,
    remove_patient_leaks,
    scan_folder,
)
from cxr_core.training.prepare import prepare_data
from tests.conftest import SHARED_DATA
from tests.synthetic import make_labelled_folder, synthetic_film

PLAN3 = LabelPlan.multiclass(("covid", "normal", "viral_pneumonia"))


def test_split_folders_and_counts(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "data")
    data = prepare_data(root, PLAN3, 32)
    assert data.report.counts["train"] == {"covid": 16, "normal": 16, "viral_pneumonia": 16}
    assert data.train.pixels.shape == (48, 32, 32) and data.val.pixels.shape[0] == 18 and data.test is not None
    assert data.report.problems == () and data.report.unreadable == ()


def test_flat_folders_get_patient_free_deterministic_splits(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "flat", per_class={"all": 40}, splits=False)
    records = assign_splits(scan_folder(root), val_fraction=0.25)
    again = assign_splits(scan_folder(root), val_fraction=0.25)
    assert [r.split for r in records] == [r.split for r in again]
    share = sum(r.split == "val" for r in records) / len(records)
    assert 0.12 < share < 0.38


def test_patients_never_straddle_splits() -> None:
    records = [
        Record(Path("a1"), "covid", "train", "p1"),
        Record(Path("a2"), "covid", "test", "p1"),
        Record(Path("b1"), "normal", "train", "p2"),
        Record(Path("c1"), "normal", "val", "p3"),
        Record(Path("c2"), "normal", "test", "p3"),
        Record(Path("d1"), "normal", None, "p4"),
    ]
    kept, dropped = remove_patient_leaks(records)
    assert [r.path.name for r in kept] == ["a2", "b1", "c2", "d1"]
    assert dropped == {"train": 1, "val": 1}
    grouped = assign_splits([Record(Path(f"x{i}"), "covid", None, "same-patient") for i in range(20)])
    assert len({r.split for r in grouped}) == 1


def test_unreadable_files_are_listed_and_skipped(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "data")
    (root / "train" / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "train" / "normal" / "notes.txt").write_text("not an image")
    data = prepare_data(root, PLAN3, 32)
    names = sorted(Path(p).name for p, _ in data.report.unreadable)
    assert names == ["broken.png", "notes.txt"]
    assert data.report.counts["train"]["covid"] == 16


def test_duplicates_across_splits_are_removed_from_the_earlier_split(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "data")
    test_file = sorted((root / "test" / "covid").iterdir())[0]
    shutil.copy(test_file, root / "train" / "covid" / "exact-copy.png")
    # Same film re-encoded as JPEG and resized: a near duplicate.
    buffer = io.BytesIO()
    Image.open(test_file).resize((64, 64)).save(buffer, format="JPEG", quality=85)
    (root / "val" / "covid" / "reencoded.jpg").write_bytes(buffer.getvalue())
    data = prepare_data(root, PLAN3, 32)
    assert [Path(a).name for a, _ in data.report.exact_duplicates_removed] == ["exact-copy.png"]
    assert [Path(a).name for a, _, _ in data.report.near_duplicates_removed] == ["reencoded.jpg"]
    assert all(r.path.name != "exact-copy.png" for r in data.train.records)
    assert data.test is not None and any(r.path == test_file for r in data.test.records)


def test_distinct_films_are_not_called_duplicates(tmp_path: Path) -> None:
    data = prepare_data(make_labelled_folder(tmp_path / "data", seed=5), PLAN3, 32)
    assert data.report.near_duplicates_removed == () and data.report.exact_duplicates_removed == ()


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "data", classes=("covid", "normal"))
    (root / "train" / "viral_pneumonia").mkdir()
    with pytest.raises(DatasetError, match="viral_pneumonia hold no images"):
        prepare_data(root, PLAN3, 32)


def test_single_class_is_an_error(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "data", classes=("covid",))
    with pytest.raises(DatasetError, match="at least two classes"):
        prepare_data(root, None, 32)


def test_missing_validation_class_is_an_error(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "data")
    shutil.rmtree(root / "val" / "normal")
    with pytest.raises(DatasetError, match="'normal' has no validation images"):
        prepare_data(root, PLAN3, 32)


def test_binary_plan_maps_every_other_label(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "data", classes=("covid", "normal", "viral_pneumonia", "bacterial_pneumonia"))
    plan = LabelPlan.binary("covid", {r.label for r in scan_folder(root)})
    data = prepare_data(root, plan, 32)
    assert plan.classes == ("covid", "other")
    assert data.report.counts["train"] == {"covid": 16, "other": 48}


def test_metadata_csv_with_sources_and_traversal(tmp_path: Path) -> None:
    root = make_labelled_folder(tmp_path / "data")
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "split", "label", "source", "patient_id"])
        for i, f in enumerate(files):
            writer.writerow([f.as_posix(), f.parts[0], f.parts[1], "site-a" if i % 2 else "site-b", f"p{i}"])
    data = prepare_data(root, PLAN3, 32)
    assert set(data.report.sources["train"]) == {"site-a", "site-b"}
    with open(root / "metadata.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["../../etc/passwd", "train", "covid", "x", "p"])
    with pytest.raises(DatasetError, match="outside the folder"):
        scan_folder(root)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/cxr is not present")
def test_shared_data_is_checked_for_leaks_and_duplicates() -> None:
    records = scan_folder(SHARED_DATA)
    assert len(records) == 11956 and {r.source for r in records} == {"c19rdb", "kermany"}
    kept, dropped = remove_patient_leaks(records)
    assert dropped and all(split in ("train", "val") for split in dropped)
    by_patient: dict[str, set[str]] = {}
    for r in kept:
        if r.patient_id:
            by_patient.setdefault(r.patient_id, set()).add(r.split or "")
    assert all(len(s) == 1 for s in by_patient.values())


def test_signature_tolerates_reencoding_but_separates_films() -> None:
    from cxr_core.training.images import thumbnail_signature

    rng = np.random.default_rng(0)
    a, b = synthetic_film(0, rng, 64), synthetic_film(1, rng, 64)
    noisy = np.clip(a.astype(float) + rng.normal(0, 3, a.shape), 0, 255)
    same = float(thumbnail_signature(a / 255) @ thumbnail_signature(noisy / 255))
    different = float(thumbnail_signature(a / 255) @ thumbnail_signature(b / 255))
    assert same > 0.98 > different


def test_records_of_one_split_group_by_source_and_label_in_file_order() -> None:
    records = [Record(Path("b1"), "normal", "test", source="kermany"), Record(Path("a1"), "covid", "test", source="c19rdb"),
               Record(Path("x"), "covid", "train", source="c19rdb"), Record(Path("b2"), "normal", "test", source="kermany")]
    groups = by_source_and_label(records, "test")
    assert list(groups) == ["c19rdb/covid", "kermany/normal"]
    assert [r.path.name for r in groups["kermany/normal"]] == ["b1", "b2"]


def test_several_folders_are_one_set_checked_across_all_of_them(tmp_path: Path) -> None:
    """`train A B`: duplicates and patients are checked across the folders, not within each."""
    first = make_labelled_folder(tmp_path / "first", seed=1)
    second = make_labelled_folder(tmp_path / "second", classes=("normal",), per_class={"train": 5, "val": 2}, seed=2)
    # The same film in the second folder's training split as in the first's test split.
    test_film = sorted((first / "test" / "normal").iterdir())[0]
    shutil.copy(test_film, second / "train" / "normal" / "copied-from-first.png")
    data = prepare_data([first, second], PLAN3, 32)
    assert data.report.root == f"{first} + {second}"
    assert [Path(a).name for a, _ in data.report.exact_duplicates_removed] == ["copied-from-first.png"]
    assert data.report.counts["train"]["normal"] == 16 + 5
    assert data.report.counts["val"]["normal"] == 6 + 2
    with pytest.raises(DatasetError, match="No data folder"):
        prepare_data([], PLAN3, 32)


def test_a_small_flat_upload_gets_a_validation_film_per_class_and_a_warning(tmp_path: Path) -> None:
    """Nine films in flat class folders (three a class): the hash alone leaves classes without a
    validation film, so the check would refuse the set; one patient per class is set aside instead,
    the report says so, and warns that three films are too few."""
    root = make_labelled_folder(tmp_path / "flat", per_class={"all": 3}, splits=False)
    data = prepare_data(root, PLAN3, 32)
    assert data.report.counts["val"] == {"covid": 1, "normal": 1, "viral_pneumonia": 1}
    assert data.report.counts["train"] == {"covid": 2, "normal": 2, "viral_pneumonia": 2}
    notes = " ".join(data.report.notes)
    assert "9 image(s) had no train/val folder" in notes and "at least one per class" in notes
    assert "Class 'covid' has only 2 training and 1 validation film(s)" in notes


@pytest.mark.parametrize("per_class, says, not_said", [
    ({"train": 25, "val": 2}, "has only 2 validation film(s) (and 25 training): too few to measure", "too few to train"),
    ({"train": 8, "val": 6}, "has only 8 training film(s): too few to train it reliably", "to measure"),
])
def test_the_check_names_which_of_training_and_validation_is_short(tmp_path: Path, per_class: dict, says: str, not_said: str) -> None:
    data = prepare_data(make_labelled_folder(tmp_path / "d", per_class=per_class, size=32), PLAN3, 32)
    notes = [n for n in data.report.notes if n.startswith("Class 'covid'")]
    assert len(notes) == 1 and says in notes[0] and not_said not in notes[0], notes


def test_a_class_with_one_patient_is_not_split(tmp_path: Path) -> None:
    """One patient cannot be both trained and validated on: the class stays without validation
    films and the check says so, rather than training on nothing."""
    records = [Record(Path(f"c{i}"), "covid", None, "only-patient") for i in range(5)]
    records += [Record(Path(f"n{i}"), "normal", None, f"p{i}") for i in range(5)]
    assigned = assign_splits(records, val_fraction=0.1)
    assert {r.split for r in assigned if r.label == "covid"} in ({"train"}, {"val"})
    assert sum(r.split == "val" for r in assigned if r.label == "normal") >= 1
    assert sum(r.split == "train" for r in assigned if r.label == "normal") >= 1


def test_given_splits_are_never_moved(tmp_path: Path) -> None:
    records = [Record(Path(f"c{i}"), "covid", "train", f"p{i}") for i in range(5)]
    assert [r.split for r in assign_splits(records, val_fraction=0.5)] == ["train"] * 5


def test_a_flat_upload_splits_the_same_wherever_its_folder_sits(tmp_path: Path) -> None:
    """Without patient ids the split is drawn per file by label and name, not by absolute path:
    the same upload on another machine (or in another temporary folder) gets the same splits."""
    first = make_labelled_folder(tmp_path / "a" / "flat", per_class={"all": 12}, splits=False)
    second = tmp_path / "somewhere" / "else" / "flat"
    shutil.copytree(first, second)

    def splits(root: Path) -> dict[str, str | None]:
        return {f"{r.label}/{r.path.name}": r.split for r in assign_splits(scan_folder(root))}

    assert splits(first) == splits(second)
    assert set(splits(first).values()) == {"train", "val"}

"""Admin back end: safe uploads, users, the model registry and promotion."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import zipfile
from pathlib import Path

import pytest

from cxr_core.state.archive import ArchiveError, Limits, extract_zip, save_files
from cxr_core.state.users import AuthError, add_user, authenticate, list_users, remove_user
from tests.conftest import make_model_folder
from tests.synthetic import make_labelled_folder


def _zip(entries: list[tuple[str, bytes]], *, symlink: str | None = None, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries:
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_a_normal_archive_extracts(tmp_path: Path) -> None:
    data = _zip([("covid/a.png", b"a" * 100), ("normal/b.png", b"b" * 100), ("__MACOSX/._a.png", b"junk"), ("normal/.DS_Store", b"x")])
    written = extract_zip(data, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["covid/a.png", "normal/b.png"]


@pytest.mark.parametrize(
    "entries, symlink, message",
    [
        ([("../../evil.png", b"x")], None, "outside the folder"),
        ([("covid/../../evil.png", b"x")], None, "outside the folder"),
        ([("/etc/evil.png", b"x")], None, "absolute path"),
        ([("C:/evil.png", b"x")], None, "absolute path"),
        ([("..\\..\\evil.png", b"x")], None, "outside the folder"),
        ([("covid/a.png", b"x")], "covid/link.png", "symbolic link"),
        ([("covid/a.png", b"x"), ("covid/a.png", b"y")], None, "twice"),
    ],
)
def test_hostile_archives_are_refused_and_leave_nothing(tmp_path: Path, entries: list, symlink: str | None, message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        extract_zip(_zip(entries, symlink=symlink), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.png").exists() and not Path("/etc/evil.png").exists()


def test_zip_bomb_and_caps(tmp_path: Path) -> None:
    bomb = _zip([("covid/bomb.png", b"\0" * (20 * 1024 * 1024))])  # 20 MB of zeros compresses ~1000:1
    with pytest.raises(ArchiveError, match="zip bomb"):
        extract_zip(bomb, tmp_path / "a")
    many = _zip([(f"covid/{i}.png", b"x") for i in range(30)], method=zipfile.ZIP_STORED)
    with pytest.raises(ArchiveError, match="30 entries; the limit is 20"):
        extract_zip(many, tmp_path / "b", Limits(max_files=20))
    big = _zip([("covid/a.png", os.urandom(5000))], method=zipfile.ZIP_STORED)
    with pytest.raises(ArchiveError, match="limit"):
        extract_zip(big, tmp_path / "c", Limits(max_total_bytes=4000))
    with pytest.raises(ArchiveError, match="not a readable zip"):
        extract_zip(b"PK\x03\x04 not really", tmp_path / "d")


def test_lying_header_is_caught_while_decompressing(tmp_path: Path) -> None:
    data = bytearray(_zip([("covid/a.png", os.urandom(1000))], method=zipfile.ZIP_STORED))
    # Shrink the declared size in the central directory: the real content is bigger.
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (100).to_bytes(4, "little")
    with pytest.raises((ArchiveError, zipfile.BadZipFile)):
        extract_zip(bytes(data), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_upload_is_saved_with_the_same_checks(tmp_path: Path) -> None:
    written = save_files([("set/covid/a.png", b"a"), ("set/normal/b.png", b"b")], tmp_path / "ok")
    assert len(written) == 2 and (tmp_path / "ok" / "set" / "covid" / "a.png").read_bytes() == b"a"
    with pytest.raises(ArchiveError, match="outside the folder"):
        save_files([("set/covid/a.png", b"a"), ("../x.png", b"b")], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_users_file_hashes_and_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users.json"
    add_user("alice", "correct horse battery", "admin", path)
    add_user("bob", "another long password", "radiologist", path)
    text = path.read_text()
    assert "correct horse" not in text and "$2b$" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert authenticate("alice", "correct horse battery", path).role == "admin"
    with pytest.raises(AuthError, match="Wrong user name or password"):
        authenticate("alice", "wrong", path)
    with pytest.raises(AuthError, match="Wrong user name or password"):
        authenticate("mallory", "whatever", path)
    for _ in range(5):
        with pytest.raises(AuthError):
            authenticate("bob", "guess", path)
    with pytest.raises(AuthError, match="Too many failed attempts"):
        authenticate("bob", "another long password", path)  # locked even with the right password
    with pytest.raises(AuthError, match="at least 10"):
        add_user("carol", "short", "admin", path)
    with pytest.raises(AuthError, match="Role must be"):
        add_user("carol", "long enough password", "superuser", path)
    assert [u.name for u in list_users(path)] == ["alice", "bob"] and remove_user("bob", path)


# --- Registry -------------------------------------------------------------------------------


@pytest.fixture()
def registry_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    weights = tmp_path / "weights"
    make_model_folder(weights, "densenet121", ("covid", "normal", "viral_pneumonia"), id="dn", version="1.0.0", size=64)
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("CXR_REGISTRY_DIR", raising=False)
    return tmp_path


EVAL_SET = {"evaluation_set": "/data/eval", "split": "test"}


def _candidate(version: str, accuracy: float, covid_recall: float, seed: int = 1, where: dict | None = None) -> Path:
    from cxr_core.models.pointer import registry_dir

    folder = make_model_folder(registry_dir() / "dn", "densenet121", ("covid", "normal", "viral_pneumonia"), id="dn", version=version, size=64, seed=seed)
    target = registry_dir() / "dn" / version
    folder.rename(target)
    evaluation = {"accuracy": accuracy, "per_class": {"covid": {"recall": covid_recall}}, **(where or EVAL_SET)}
    (target / "evaluation.json").write_text(json.dumps(evaluation))
    return target


def test_the_shipped_active_model_is_measured_on_the_candidates_set(registry_env: Path) -> None:
    """A shipped model has no evaluation on a set chosen here: the job measures it on the
    candidate's set, stored under var/ (weights/ stays as checked out), once per set."""
    from cxr_core.models.pointer import registry_dir
    from cxr_core.models.versions import list_versions
    from cxr_core.training.evaluation_set import evaluate_active_alongside

    eval_dir = make_labelled_folder(registry_env / "eval", per_class={"test": 3}, seed=4, size=64)
    result = evaluate_active_alongside("dn", eval_dir, "test")
    assert result is not None and result["n"] == 9 and (result["evaluation_set"], result["split"]) == (str(eval_dir), "test")
    assert (registry_dir() / "evaluations" / "dn@1.0.0.json").exists()
    assert not (registry_env / "weights" / "dn" / "evaluation.json").exists()
    shipped = next(v for v in list_versions("dn") if v.version == "1.0.0")
    assert shipped.evaluation == result
    stamp = (registry_dir() / "evaluations" / "dn@1.0.0.json").stat().st_mtime_ns
    assert evaluate_active_alongside("dn", eval_dir, "test") == result  # already measured on this set
    assert (registry_dir() / "evaluations" / "dn@1.0.0.json").stat().st_mtime_ns == stamp


def test_promotion_gate_rollback_and_delete(registry_env: Path) -> None:
    from cxr_core.models.loading import installed_models
    from cxr_core.models.pointer import RegistryError, registry_dir
    from cxr_core.models.versions import delete_version, list_versions, promote, rollback

    _candidate("2.0.0", accuracy=0.93, covid_recall=0.96)
    _candidate("2.1.0", accuracy=0.95, covid_recall=0.90, seed=2)
    _candidate("2.2.0", accuracy=0.99, covid_recall=0.99, seed=3, where={"evaluation_set": "/data/other", "split": "test"})
    assert [v.version for v in list_versions("dn") if v.active] == ["1.0.0"]
    with pytest.raises(RegistryError, match="active version dn@1.0.0 has no evaluation"):
        promote("dn", "2.0.0", user="alice")
    (registry_dir() / "evaluations").mkdir(parents=True)
    (registry_dir() / "evaluations" / "dn@1.0.0.json").write_text(json.dumps({"accuracy": 0.90, "per_class": {"covid": {"recall": 0.95}}, **EVAL_SET}))
    with pytest.raises(RegistryError, match="different sets"):
        promote("dn", "2.2.0", user="alice")

    promote("dn", "2.0.0", user="alice")
    assert [m.manifest.version for m in installed_models()] == ["2.0.0"]  # the app now loads 2.0.0
    with pytest.raises(RegistryError, match="COVID sensitivity 0.9000 is below"):
        promote("dn", "2.1.0", user="alice")
    promote("dn", "2.1.0", user="alice", override_reason="better specificity, sensitivity checked on site data")
    assert [m.manifest.version for m in installed_models()] == ["2.1.0"]
    rollback("dn", user="alice")
    assert [m.manifest.version for m in installed_models()] == ["2.0.0"]
    with pytest.raises(RegistryError, match="active version cannot be deleted"):
        delete_version("dn", "2.0.0")
    with pytest.raises(RegistryError, match="Shipped versions"):
        delete_version("dn", "1.0.0")
    delete_version("dn", "2.1.0")
    assert [v.version for v in list_versions("dn")] == ["1.0.0", "2.0.0", "2.2.0"]


def test_a_crash_during_promotion_leaves_a_working_model(registry_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.models.loading import installed_models, load_model
    from cxr_core.models.versions import promote

    _candidate("2.0.0", accuracy=0.93, covid_recall=0.96)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(OSError):
            promote("dn", "2.0.0", user="alice", gate=False)
    models = installed_models()
    assert [m.manifest.version for m in models] == ["1.0.0"]
    load_model(models[0].path, device="cpu")
    leftovers = [p for p in (registry_env / "var" / "registry").glob(".active.*") if p.suffix != ".lock"]
    assert not leftovers  # no temporary file left behind


def test_a_writer_killed_before_its_rename_leaves_nothing_behind_for_long(registry_env: Path) -> None:
    """SIGKILL between the temporary pointer file and its rename leaves the temporary file; the
    next reader or writer removes it, unless a live writer holds the pointer's lock."""
    import fcntl

    from cxr_core.models.pointer import read_pointer, registry_dir, write_pointer

    write_pointer({"active": {}, "history": []})
    orphan = registry_dir() / ".active.json.k1ll3d0x"
    orphan.write_text("{half a pointer")
    with open(registry_dir() / ".active.json.lock", "a") as held:  # a live writer
        fcntl.flock(held, fcntl.LOCK_EX)
        assert read_pointer() == {"active": {}, "history": []} and orphan.exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    assert read_pointer() == {"active": {}, "history": []} and not orphan.exists()
    orphan.write_text("{half a pointer")
    write_pointer({"active": {"dn": "1.0.0"}, "history": []})
    assert not orphan.exists() and read_pointer()["active"] == {"dn": "1.0.0"}


def test_a_broken_pointer_falls_back_to_the_shipped_model(registry_env: Path) -> None:
    from cxr_core.models.loading import installed_models
    from cxr_core.models.pointer import registry_dir
    from cxr_core.models.versions import promote

    target = _candidate("2.0.0", accuracy=0.93, covid_recall=0.96)
    promote("dn", "2.0.0", user="alice", gate=False)
    (target / "manifest.json").unlink()  # the active version's folder is damaged by hand
    assert [m.manifest.version for m in installed_models()] == ["1.0.0"]
    assert (registry_dir() / "active.json").exists()


def test_only_a_checked_and_confirmed_dataset_is_trainable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.state.datasets import DatasetNotReady, confirm_dataset, list_datasets, store_upload, validate_dataset

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    source = make_labelled_folder(tmp_path / "src", per_class={"train": 4, "val": 2}, size=64)
    files = [(str(p.relative_to(source)), p.read_bytes()) for p in sorted(source.rglob("*.png"))]
    good = store_upload("good", "alice", files=files)
    single = store_upload("one class", "alice", files=[f for f in files if "/covid/" in f[0]])
    with pytest.raises(DatasetNotReady, match="Check the dataset"):
        confirm_dataset(good, "alice")
    assert validate_dataset(good)["ok"] and not good.trainable
    confirm_dataset(good, "alice")
    assert good.trainable and good.confirmation()["user"] == "alice"
    assert not validate_dataset(single)["ok"]
    with pytest.raises(DatasetNotReady, match="failed its check"):
        confirm_dataset(single, "alice")
    assert [d.name for d in list_datasets() if d.trainable] == ["good"]
    validate_dataset(good)  # checked again: the old confirmation no longer holds
    assert not good.trainable


def test_an_unevaluated_candidate_cannot_be_promoted_even_with_a_reason(registry_env: Path) -> None:
    """Issue 33: a version never measured on the fixed evaluation set cannot go live at all."""
    from cxr_core.models.pointer import RegistryError, registry_dir
    from cxr_core.models.versions import list_versions, not_evaluated, promote

    target = _candidate("2.0.0", accuracy=0.93, covid_recall=0.96)
    (target / "evaluation.json").unlink()
    candidate = next(v for v in list_versions("dn") if v.version == "2.0.0")
    assert "has not been evaluated" in (not_evaluated(candidate) or "")
    with pytest.raises(RegistryError, match="has not been evaluated"):
        promote("dn", "2.0.0", user="alice", override_reason="looks fine to me")
    assert [v.version for v in list_versions("dn") if v.active] == ["1.0.0"]
    assert not (registry_dir() / "active.json").exists()


def test_rolling_back_to_the_shipped_version_is_a_clean_state(registry_env: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """Issue 33: after a rollback to the shipped version nothing logs an error, the check
    passes, and a deleted version is no rollback target."""
    from cxr_core.models.loading import installed_models
    from cxr_core.models.pointer import read_pointer
    from cxr_core.models.versions import delete_version, promote, rollback, rollback_target
    from cxr_core.state.health import check_health

    _candidate("2.0.0", accuracy=0.93, covid_recall=0.96)
    promote("dn", "2.0.0", user="alice", gate=False)
    assert rollback_target("dn") == "1.0.0"
    rollback("dn", user="alice")
    assert read_pointer()["active"] == {}  # the shipped folder: nothing to point at
    with caplog.at_level(logging.ERROR):
        assert [m.manifest.version for m in installed_models()] == ["1.0.0"]
        report = check_health(models=False)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert next(c for c in report.checks if c.name == "model registry").ok
    assert rollback_target("dn") == "2.0.0"
    delete_version("dn", "2.0.0")
    assert rollback_target("dn") is None


def test_a_broken_pointer_fails_the_installation_check(registry_env: Path) -> None:
    from cxr_core.models.versions import promote
    from cxr_core.state.health import check_health

    target = _candidate("2.0.0", accuracy=0.93, covid_recall=0.96)
    promote("dn", "2.0.0", user="alice", gate=False)
    (target / "manifest.json").unlink()
    check = next(c for c in check_health(models=False).checks if c.name == "model registry")
    assert not check.ok and "dn@2.0.0" in check.detail


def test_the_default_model_is_an_explicit_recorded_setting(registry_env: Path) -> None:
    """Issue 33: promoting a version must not change which model Diagnose offers first."""
    from cxr_core.models.loading import resolve_model
    from cxr_core.models.pointer import RegistryError, default_model_id, read_pointer
    from cxr_core.models.versions import promote, set_default_model

    make_model_folder(registry_env / "weights", "resnet50", ("covid", "other"), head="sigmoid", id="aa-binary", size=64)
    assert default_model_id() is None and resolve_model().manifest.id == "aa-binary"  # type: ignore[union-attr]
    set_default_model("dn", user="alice")
    assert default_model_id() == "dn" and resolve_model().manifest.key == "dn@1.0.0"  # type: ignore[union-attr]
    _candidate("2.0.0", accuracy=0.93, covid_recall=0.96)
    promote("dn", "2.0.0", user="alice", gate=False)
    assert resolve_model().manifest.key == "dn@2.0.0"  # type: ignore[union-attr]
    assert read_pointer()["history"][0] == {**read_pointer()["history"][0], "action": "default", "user": "alice", "to": "dn"}
    with pytest.raises(RegistryError, match="No installed model"):
        set_default_model("nope", user="alice")


def test_evaluation_sets_to_choose_from_are_the_servers_and_the_checked_uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.state.datasets import evaluation_choices, store_upload, validate_dataset

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    server_set = make_labelled_folder(tmp_path / "server-eval", per_class={"test": 2}, size=48)
    monkeypatch.setenv("CXR_EVAL_DIR", str(server_set))
    source = make_labelled_folder(tmp_path / "src", per_class={"train": 4, "val": 2}, size=64)
    files = [(str(p.relative_to(source)), p.read_bytes()) for p in sorted(source.rglob("*.png"))]
    site = store_upload("Site B films", "alice", files=files)
    refused = store_upload("one class", "alice", files=[f for f in files if "/covid/" in f[0]])
    unchecked = store_upload("not yet checked", "alice", files=files)
    validate_dataset(site)
    validate_dataset(refused)
    choices = evaluation_choices()
    assert [c.path for c in choices] == [server_set, site.root]
    assert choices[0].label.startswith("The server's evaluation set") and choices[1].label.startswith("Site B films (uploaded ")
    assert [c.path for c in evaluation_choices(exclude=site.id)] == [server_set]
    assert unchecked.id not in {c.path.parent.name for c in choices}
    monkeypatch.setenv("CXR_EVAL_DIR", str(tmp_path / "missing"))
    assert [c.path for c in evaluation_choices()] == [site.root]

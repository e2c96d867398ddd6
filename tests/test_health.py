"""`python -m cxr_core check`: passes on a working installation and names what is broken:
tampered weights, an edited audit trail, a state folder that cannot be written, no model."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from cxr_core.cli import main
from cxr_core.models.manifest import read_manifest
from cxr_core.state.audit import record
from cxr_core.state.db import database_path


def _check(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    code = main(["check", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def _failed(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def test_a_working_installation_passes(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    record("prediction", details={"p": 1})
    code, report = _check(capsys)
    assert code == 0 and report["ok"], report
    names = [c["name"] for c in report["checks"]]
    assert names[:4] == ["state folder", "database", "audit trail", "input checks"]
    assert {"model densenet121-test@0.0.1", "model resnet50-test@0.0.1"} <= set(names), names
    assert "intact (1 entries)" in report["checks"][2]["detail"]
    # The plain form: one tab-separated line per check.
    assert main(["check", "--no-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["ok", "state folder"], ["ok", "database"], ["ok", "audit trail"], ["ok", "input checks"],
                                                         ["ok", "model registry"]]


def test_tampered_weights_fail_their_model(weights_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "weights"
    shutil.copytree(weights_root / "resnet50-test", root / "resnet50-test")
    weights = root / "resnet50-test" / read_manifest(root / "resnet50-test").weights_file
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern in the last tensor changed
    weights.write_bytes(bytes(data))
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(root))
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    code, report = _check(capsys)
    assert code == 1 and not report["ok"]
    failed = _failed(report)
    assert list(failed) == ["model resnet50-test@0.0.1"] and "sha256" in failed["model resnet50-test@0.0.1"].lower(), failed


def test_an_edited_audit_trail_fails(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    for i in range(3):
        record("prediction", details={"i": i})
    conn = sqlite3.connect(database_path())  # someone with the file bypasses the triggers
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET details = '{\"i\":9}' WHERE id = 2")
    conn.commit()
    conn.close()
    code, report = _check(capsys, "--no-models")
    assert code == 1 and list(_failed(report)) == ["audit trail"] and "entry 2" in _failed(report)["audit trail"]


def test_an_unwritable_state_folder_and_no_model_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CXR_VAR_DIR", str(blocker / "var"))
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path / "empty"))
    code, report = _check(capsys)
    failed = _failed(report)
    assert code == 1 and "state folder" in failed and "no trained model is installed" in failed["models"], failed


def test_missing_input_check_assets_fail(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A partial copy of the code without the exposure range would skip that check silently in the app."""
    import cxr_core.imaging.quality as quality

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setattr(quality, "EXPOSURE_ASSET", tmp_path / "exposure.json")
    quality.exposure_asset.cache_clear()
    try:
        code, report = _check(capsys, "--no-models")
    finally:
        quality.exposure_asset.cache_clear()
    assert code == 1 and list(_failed(report)) == ["input checks"] and "exposure.json" in _failed(report)["input checks"]

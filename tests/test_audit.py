"""The audit trail: append-only, hash-chained, verifiable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import cxr_core.state.db as db
from cxr_core.state.audit import entries, record, verify_chain


def test_chain_records_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    first = record("prediction", image_sha256="a" * 64, model="m@1", details={"prediction": "covid"}, db=path)
    second = record("override", user="dr.x", role="radiologist", image_sha256="a" * 64, details={"reason": "lateral marker"}, db=path)
    assert second.prev_hash == first.hash and first.prev_hash == "0" * 64
    assert verify_chain(path).ok and verify_chain(path).rows == 2
    assert [e.action for e in entries(db=path)] == ["override", "prediction"]
    assert entries(action="override", db=path)[0].details == {"reason": "lateral marker"}


def test_sql_cannot_edit_or_delete(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    record("prediction", details={"p": 1}, db=path)
    with db.connect(path) as conn, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET user = 'someone else'")
    with db.connect(path) as conn, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit")


@pytest.mark.parametrize("tamper, problem", [("edit", "edited"), ("delete", "removed")])
def test_tampering_is_detected(tmp_path: Path, tamper: str, problem: str) -> None:
    path = tmp_path / "a.sqlite3"
    for i in range(5):
        record("prediction", details={"i": i}, db=path)
    conn = sqlite3.connect(path)  # someone with the file bypasses the triggers
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    if tamper == "edit":
        conn.execute("UPDATE audit SET details = '{\"i\":99}' WHERE id = 3")
    else:
        conn.execute("DELETE FROM audit WHERE id = 3")
    conn.commit()
    conn.close()
    report = verify_chain(path)
    assert not report.ok and report.first_bad_id == (3 if tamper == "edit" else 4) and problem in report.problem


def test_cli_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cxr_core.cli import main

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path))
    record("prediction", details={})
    assert main(["audit", "verify"]) == 0 and "intact: 1 entries" in capsys.readouterr().out
    assert main(["audit", "list"]) == 0 and '"action": "prediction"' in capsys.readouterr().out


def test_filters_and_csv_export(tmp_path: Path) -> None:
    import csv
    import io

    from cxr_core.state.audit import distinct_values, to_csv

    path = tmp_path / "a.sqlite3"
    record("prediction", user="dr.a", role="radiologist", image_sha256="ab" * 32, model="m@1", details={"prediction": "covid"}, db=path)
    record("prediction", user="dr.b", role="radiologist", image_sha256="cd" * 32, model="m@2", details={"note": "=HYPERLINK(\"x\")"}, db=path)
    record("promote", user="root", role="admin", model="m@2", db=path)
    assert distinct_values("action", db=path) == ["prediction", "promote"]
    assert distinct_values("user", db=path) == ["dr.a", "dr.b", "root"]
    assert [e.user for e in entries(image_sha256="ABAB", db=path)] == ["dr.a"]  # prefix, any case
    assert [e.action for e in entries(model="m@2", db=path)] == ["promote", "prediction"]
    assert entries(since="2000-01-01", until="2000-01-02", db=path) == []
    assert len(entries(since="2000-01-01", db=path)) == 3
    with pytest.raises(ValueError):
        distinct_values("details; DROP TABLE audit", db=path)

    rows = list(csv.DictReader(io.StringIO(to_csv(entries(db=path)))))
    assert [r["action"] for r in rows] == ["promote", "prediction", "prediction"]
    assert rows[2]["hash"] == entries(db=path)[2].hash and rows[2]["image_sha256"] == "ab" * 32
    # A details cell is JSON and never starts like a spreadsheet formula.
    assert rows[1]["details"].startswith("{") and '"note"' in rows[1]["details"]
    assert all(not value.startswith(("=", "+", "@")) for r in rows for value in r.values())


def test_the_suite_keeps_its_records_out_of_the_checkout() -> None:
    """Test predictions must not land in the checkout's var/, which a server running the app from
    this folder uses for its real, append-only audit trail (conftest.private_state)."""
    from cxr_core import config
    from cxr_core.models.pointer import registry_dir
    from cxr_core.state.jobs import jobs_dir
    from cxr_core.state.users import users_file

    for path in (config.var_dir(), db.database_path(), users_file(), jobs_dir(), registry_dir()):
        assert not path.resolve().is_relative_to(config.PROJECT_ROOT.resolve()), path

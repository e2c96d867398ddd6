"""The audit trail: an append-only, hash-chained record of what the app did and for whom.

Each row's hash is sha256 over the previous row's hash and the row's own fields
(canonical JSON), so editing or deleting any row breaks every hash after it;
:func:`verify_chain` finds the first break. SQL triggers refuse UPDATE and DELETE, and
writers serialise on an immediate transaction so the chain never forks. No patient
identifiers: images are named by sha256, and ``details`` holds outputs, not names.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr_core.state.db import connect

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    id: int
    created: str
    user: str
    role: str
    action: str
    image_sha256: str | None
    model: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    rows: int
    first_bad_id: int | None = None
    problem: str = ""


def _digest(prev_hash: str, created: str, user: str, role: str, action: str, image: str | None, model: str | None, details: str) -> str:
    payload = json.dumps([prev_hash, created, user, role, action, image, model, details], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def record(action: str, *, user: str = "anonymous", role: str = "anonymous", image_sha256: str | None = None,
           model: str | None = None, details: dict[str, Any] | None = None, db: Path | None = None) -> AuditEntry:
    """Append one entry; returns it with its hash."""
    text = json.dumps(details or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    with connect(db) as conn:
        conn.execute("BEGIN IMMEDIATE")  # one writer at a time: the chain must not fork
        row = conn.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        prev = row["hash"] if row else GENESIS
        digest = _digest(prev, created, user, role, action, image_sha256, model, text)
        cursor = conn.execute(
            "INSERT INTO audit (created, user, role, action, image_sha256, model, details, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (created, user, role, action, image_sha256, model, text, prev, digest),
        )
        new_id = int(cursor.lastrowid or 0)
    return AuditEntry(new_id, created, user, role, action, image_sha256, model, details or {}, prev, digest)


def _entry(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(row["id"], row["created"], row["user"], row["role"], row["action"], row["image_sha256"], row["model"],
                      json.loads(row["details"]), row["prev_hash"], row["hash"])


def entries(*, action: str | None = None, user: str | None = None, image_sha256: str | None = None, model: str | None = None,
            since: str | None = None, until: str | None = None, limit: int = 1000, db: Path | None = None) -> list[AuditEntry]:
    """Newest first. ``image_sha256`` matches a prefix (people paste the first characters);
    ``since`` / ``until`` are ISO dates or times compared with the UTC ``created`` stamp
    (``until`` is exclusive)."""
    clauses, args = [], []
    for column, value in (("action", action), ("user", user), ("model", model)):
        if value:
            clauses.append(f"{column} = ?")
            args.append(value)
    if image_sha256:
        clauses.append("image_sha256 LIKE ?")
        args.append(image_sha256.strip().lower().replace("%", "").replace("_", "") + "%")
    if since:
        clauses.append("created >= ?")
        args.append(since)
    if until:
        clauses.append("created < ?")
        args.append(until)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    with connect(db) as conn:
        rows = conn.execute(f"SELECT * FROM audit{where} ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
    return [_entry(r) for r in rows]


def distinct_values(column: str, db: Path | None = None) -> list[str]:
    """The values seen in ``action``, ``user`` or ``model``, for filter menus."""
    if column not in {"action", "user", "model", "role"}:
        raise ValueError(f"not a filterable column: {column}")
    with connect(db) as conn:
        rows = conn.execute(f"SELECT DISTINCT {column} FROM audit WHERE {column} IS NOT NULL ORDER BY {column}").fetchall()
    return [str(r[0]) for r in rows]


CSV_COLUMNS = ("id", "created", "user", "role", "action", "image_sha256", "model", "details", "prev_hash", "hash")


def to_csv(rows: list[AuditEntry]) -> str:
    """CSV text with the hashes, so an exported extract can be checked against the chain.
    Cells that a spreadsheet would run as a formula are prefixed with a quote."""
    import csv
    import io

    def cell(value: object) -> str:
        text = "" if value is None else value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
        return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([cell(getattr(row, name)) for name in CSV_COLUMNS])
    return buffer.getvalue()


def verify_chain(db: Path | None = None) -> ChainReport:
    """Walk the chain from the first row; the first row whose hash or link is wrong is reported."""
    prev = GENESIS
    count = 0
    with connect(db) as conn:
        for row in conn.execute("SELECT * FROM audit ORDER BY id"):
            count += 1
            if row["prev_hash"] != prev:
                return ChainReport(False, count, row["id"], "its link to the previous row is broken (a row was removed or inserted)")
            expected = _digest(prev, row["created"], row["user"], row["role"], row["action"], row["image_sha256"], row["model"], row["details"])
            if expected != row["hash"]:
                return ChainReport(False, count, row["id"], "its content does not match its hash (the row was edited)")
            prev = row["hash"]
    return ChainReport(True, count)

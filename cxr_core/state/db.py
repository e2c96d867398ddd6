"""The app's SQLite database: one file, WAL mode, schema created and migrated on open.

Each module owning tables declares its DDL in :data:`SCHEMA`, keyed by version; the
``schema_version`` pragma records what a database file already has.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cxr_core import config

SCHEMA: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created TEXT NOT NULL,
        user TEXT NOT NULL,
        model TEXT NOT NULL,
        image_sha256 TEXT NOT NULL,
        method TEXT NOT NULL,
        target TEXT NOT NULL,
        layer TEXT NOT NULL,
        predicted TEXT,
        agree_prediction INTEGER,
        agree_heatmap INTEGER,
        comment TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX IF NOT EXISTS feedback_image ON feedback (image_sha256);
    """,
    2: """
    CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created TEXT NOT NULL,
        user TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        image_sha256 TEXT,
        model TEXT,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE
    );
    CREATE INDEX IF NOT EXISTS audit_action ON audit (action);
    CREATE INDEX IF NOT EXISTS audit_image ON audit (image_sha256);
    -- Append-only: rows can be added, never changed or removed through SQL.
    CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    """,
    3: """
    CREATE TABLE IF NOT EXISTS site_validation (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created TEXT NOT NULL,
        user TEXT NOT NULL,
        model TEXT NOT NULL,
        data_name TEXT NOT NULL,
        data_sha256 TEXT NOT NULL,
        n INTEGER NOT NULL,
        result TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS site_validation_model ON site_validation (model);
    """,
}

_init_lock = threading.Lock()
_initialised: set[Path] = set()


def database_path() -> Path:
    return config.var_dir() / "cxr.sqlite3"


def _migrate(conn: sqlite3.Connection) -> None:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    for version in sorted(v for v in SCHEMA if v > current):
        conn.executescript(SCHEMA[version])
        conn.execute(f"PRAGMA user_version = {int(version)}")
    conn.commit()


@contextmanager
def connect(path: Path | None = None) -> Iterator[sqlite3.Connection]:
    """A connection in WAL mode; committed on success, rolled back on error, always closed.

    Connections are cheap and short-lived: one per operation, so Streamlit sessions on
    different threads never share one.
    """
    path = Path(path) if path is not None else database_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level="DEFERRED")
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        with _init_lock:
            if path.resolve() not in _initialised:
                _migrate(conn)
                _initialised.add(path.resolve())
        yield conn
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()

"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

Readers (another process, a page polling a job, the app after a crash) see the old file
or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path``; ``mode`` sets permissions first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        if mode is not None:
            os.chmod(tmp_path, mode)
        write(tmp_path)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), mode)


def write_json(path: Path, data: Any, mode: int | None = None) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n", mode)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()

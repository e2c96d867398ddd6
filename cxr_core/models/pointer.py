"""The registry's pointer file (``var/registry/active.json``): which version of each model is
active, the default model for Diagnose, and the history of changes.

Below :mod:`cxr_core.models.loading` (which reads it to find the active folders) and
:mod:`cxr_core.models.versions` (which writes it when promoting, rolling back or choosing the default).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cxr_core import config
from cxr_core.errors import CxrError
from cxr_core.fileio import write_json

log = logging.getLogger(__name__)


class RegistryError(CxrError):
    """A registry operation was refused."""


def registry_dir() -> Path:
    return Path(os.environ.get("CXR_REGISTRY_DIR", config.var_dir() / "registry"))

def _pointer_path() -> Path:
    return registry_dir() / "active.json"


@contextmanager
def _pointer_lock(wait: bool = True) -> Iterator[bool]:
    """Hold ``.active.json.lock`` (flock) while writing the pointer; yields whether it was got
    (always, when ``wait``)."""
    path = registry_dir() / ".active.json.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sweep_orphans() -> None:
    """Remove temporary pointer files left by a writer killed between its write and its rename
    (cxr_core.fileio.atomic_write). Only called under the lock, so no live writer owns them."""
    for path in registry_dir().glob(".active.json.*"):
        if path.suffix != ".lock":
            path.unlink(missing_ok=True)


def read_pointer() -> dict[str, Any]:
    path = _pointer_path()
    if any(p.suffix != ".lock" for p in path.parent.glob(".active.json.*")):
        try:
            with _pointer_lock(wait=False) as locked:
                if locked:
                    _sweep_orphans()
        except OSError:  # a read-only registry: the leftovers are harmless, only untidy
            log.debug("could not tidy the registry's temporary files", exc_info=True)
    if not path.exists():
        return {"active": {}, "history": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path} is unreadable; the shipped models are used until it is repaired.") from exc
    data.setdefault("active", {})
    data.setdefault("history", [])
    return data


def write_pointer(data: dict[str, Any]) -> None:
    with _pointer_lock():
        _sweep_orphans()
        write_json(_pointer_path(), data)  # atomic: readers see the old pointer or the new one

def default_model_id() -> str | None:
    """The model id an admin chose as the default for Diagnose (``active.json``'s ``default``), if any."""
    value = read_pointer().get("default")
    return str(value) if value else None

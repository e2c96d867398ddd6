"""The registry's pointer file (``var/registry/active.json``): which version of each model is
active, the default model for Diagnose, and the history of changes.

Below :mod:`cxr_core.models.loading` (which reads it to find the active folders) and
:mod:`cxr_core.models.versions` (which writes it when promoting, rolling back or choosing the default).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cxr_core import config
from cxr_core.errors import CxrError
from cxr_core.fileio import write_json


class RegistryError(CxrError):
    """A registry operation was refused."""


def registry_dir() -> Path:
    return Path(os.environ.get("CXR_REGISTRY_DIR", config.var_dir() / "registry"))

def _pointer_path() -> Path:
    return registry_dir() / "active.json"


def read_pointer() -> dict[str, Any]:
    path = _pointer_path()
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
    write_json(_pointer_path(), data)  # atomic: readers see the old pointer or the new one

def default_model_id() -> str | None:
    """The model id an admin chose as the default for Diagnose (``active.json``'s ``default``), if any."""
    value = read_pointer().get("default")
    return str(value) if value else None

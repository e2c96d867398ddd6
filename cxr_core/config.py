"""Settings read from the environment, with safe defaults.

Kept in one place so that the CLI, the pages and the tests agree on them.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Largest file read into memory, in bytes (DICOM or raster). Streamlit's own
#: ``server.maxUploadSize`` is set to the same figure in .streamlit/config.toml.
DEFAULT_MAX_FILE_BYTES = 200 * 1024 * 1024

#: Largest decoded frame, in pixels. A large digital chest detector is about
#: 4300 x 4300 (18.5 MP); 50 MP leaves room and stops decompression bombs.
DEFAULT_MAX_PIXELS = 50_000_000


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        parsed = int(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from exc
    if parsed <= 0:
        raise ValueError(f"{name} must be positive, got {parsed}")
    return parsed


def weights_dir() -> Path:
    """The folder that holds one sub-folder per installed model (``CXR_WEIGHTS_DIR``)."""
    return Path(os.environ.get("CXR_WEIGHTS_DIR", PROJECT_ROOT / "weights"))


def var_dir() -> Path:
    """Runtime state: database, job folders, temporary uploads (``CXR_VAR_DIR``)."""
    return Path(os.environ.get("CXR_VAR_DIR", PROJECT_ROOT / "var"))


def max_file_bytes() -> int:
    return _env_int("CXR_MAX_FILE_MB", DEFAULT_MAX_FILE_BYTES // (1024 * 1024)) * 1024 * 1024


def max_pixels() -> int:
    return _env_int("CXR_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def default_model_id() -> str | None:
    """The model used when none is named (``CXR_DEFAULT_MODEL``); None means the first installed."""
    return os.environ.get("CXR_DEFAULT_MODEL") or None

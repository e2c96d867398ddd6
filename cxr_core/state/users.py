"""Users and roles for signing in: a JSON file outside git with bcrypt password hashes.

    python -m cxr_core users add alice --role admin      # asks for the password twice

The file (``CXR_USERS_FILE``, default ``var/users.json``, created with mode 0600) maps a
user name to a role and a salted bcrypt hash; passwords are never stored or logged.
Repeated failures lock the name for a while, so a password cannot be guessed online.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import bcrypt

from cxr_core import config
from cxr_core.errors import CxrError
from cxr_core.fileio import write_json

ROLES = ("radiologist", "reviewer", "admin")
MIN_PASSWORD = 10
MAX_FAILURES = 5
LOCKOUT_SECONDS = 300


class AuthError(CxrError):
    """Signing in failed, or a user cannot be created as asked."""


@dataclass(frozen=True)
class User:
    name: str
    role: str


def users_file() -> Path:
    return Path(os.environ.get("CXR_USERS_FILE", config.var_dir() / "users.json"))


def _load(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AuthError(f"The users file {path} cannot be read.") from exc
    users = data.get("users", {})
    return users if isinstance(users, dict) else {}


def _save(path: Path, users: dict[str, dict[str, str]]) -> None:
    write_json(path, {"users": users}, mode=0o600)  # hashes only, but still nobody else's business


def add_user(name: str, password: str, role: str, path: Path | None = None) -> User:
    path = path or users_file()
    name = name.strip()
    if not name or not name.replace(".", "").replace("-", "").replace("_", "").replace("@", "").isalnum():
        raise AuthError("A user name uses letters, digits, '.', '-', '_' or '@'.")
    if role not in ROLES:
        raise AuthError(f"Role must be one of {', '.join(ROLES)}.")
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"A password needs at least {MIN_PASSWORD} characters.")
    users = _load(path)
    users[name] = {
        "role": role,
        "hash": bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=12)).decode("ascii"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _save(path, users)
    return User(name, role)


def remove_user(name: str, path: Path | None = None) -> bool:
    path = path or users_file()
    users = _load(path)
    if name not in users:
        return False
    del users[name]
    _save(path, users)
    return True


def list_users(path: Path | None = None) -> list[User]:
    return [User(n, u.get("role", "")) for n, u in sorted(_load(path or users_file()).items())]


_failures: dict[str, list[float]] = {}
_failures_lock = threading.Lock()


def authenticate(name: str, password: str, path: Path | None = None) -> User:
    """The user if the password matches; AuthError otherwise (same message whether the name exists or not)."""
    now = time.monotonic()
    with _failures_lock:
        recent = [t for t in _failures.get(name, []) if now - t < LOCKOUT_SECONDS]
        _failures[name] = recent
        if len(recent) >= MAX_FAILURES:
            raise AuthError(f"Too many failed attempts for this name; try again in {LOCKOUT_SECONDS // 60} minutes.")
    record = _load(path or users_file()).get(name)
    # Hash even for unknown names so timing does not reveal which names exist.
    stored = record["hash"].encode("ascii") if record else bcrypt.hashpw(b"unknown", bcrypt.gensalt(rounds=12))
    if bcrypt.checkpw(password.encode("utf-8"), stored) and record is not None:
        with _failures_lock:
            _failures.pop(name, None)
        return User(name, record.get("role", "radiologist"))
    with _failures_lock:
        _failures.setdefault(name, []).append(now)
    raise AuthError("Wrong user name or password.")


def require_login_everywhere() -> bool:
    """Clinical pages behind the sign-in too (``CXR_REQUIRE_LOGIN=1``); admin pages always are."""
    return os.environ.get("CXR_REQUIRE_LOGIN", "").strip().lower() in ("1", "true", "yes")

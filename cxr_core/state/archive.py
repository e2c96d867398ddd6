"""Safe extraction of uploaded labelled folders: a zip archive or a browser folder upload.

Nothing lands outside the target folder: absolute paths, drive letters, ``..`` parts and
symbolic links are refused. Caps on the number of files, the total uncompressed size,
each file's size and the compression ratio stop zip bombs; sizes are counted while
decompressing, not taken from the archive's (forgeable) headers. Any refusal removes
what was extracted so far and raises :class:`ArchiveError` with the reason.
"""

from __future__ import annotations

import io
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

from cxr_core.errors import CxrError

_SKIP_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


class ArchiveError(CxrError):
    """The upload cannot be unpacked safely."""


@dataclass(frozen=True)
class Limits:
    max_files: int = 50_000
    max_total_bytes: int = 8 * 1024**3
    max_file_bytes: int = 200 * 1024**2
    max_ratio: float = 200.0  # uncompressed / compressed, per file and overall


def safe_relative(name: str) -> PurePosixPath | None:
    """A clean relative path for an archive member, None for entries to skip; raises on escapes."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise ArchiveError(f"The archive contains an absolute path ({name!r}); nothing was extracted.")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"The archive contains a path leading outside the folder ({name!r}); nothing was extracted.")
    if not parts or any(p in _SKIP_PARTS or p.startswith("._") for p in parts):
        return None
    return PurePosixPath(*parts)


def _inside(target: Path, relative: PurePosixPath) -> Path:
    dest = (target / Path(*relative.parts)).resolve()
    if target.resolve() not in dest.parents:
        raise ArchiveError(f"{relative} would be written outside the folder; nothing was extracted.")
    return dest


def extract_zip(source: bytes | BinaryIO | Path, target: Path, limits: Limits = Limits()) -> list[Path]:
    """Extract into ``target`` (created; must not exist or be empty). Returns the files written."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise ArchiveError(f"{target} is not empty.")
    target.mkdir(parents=True, exist_ok=True)
    handle: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") if isinstance(source, Path) else source
    written: list[Path] = []
    try:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ArchiveError("The upload is not a readable zip archive.") from exc
        with archive:
            members = archive.infolist()
            if len(members) > limits.max_files:
                raise ArchiveError(f"The archive holds {len(members)} entries; the limit is {limits.max_files}.")
            declared = sum(m.file_size for m in members)
            compressed = sum(m.compress_size for m in members) or 1
            if declared > limits.max_total_bytes:
                raise ArchiveError(f"The archive would unpack to {declared / 2**30:.1f} GiB; the limit is {limits.max_total_bytes / 2**30:.1f} GiB.")
            if declared / compressed > limits.max_ratio:
                raise ArchiveError(f"The archive's compression ratio ({declared / compressed:.0f}:1) is implausible for images (a zip bomb?).")
            total = 0
            for member in members:
                mode = member.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise ArchiveError(f"The archive contains a symbolic link ({member.filename!r}); nothing was extracted.")
                if member.is_dir():
                    continue
                relative = safe_relative(member.filename)
                if relative is None:
                    continue
                if member.file_size > limits.max_file_bytes:
                    raise ArchiveError(f"{relative} is {member.file_size / 2**20:.0f} MB; the limit per file is {limits.max_file_bytes / 2**20:.0f} MB.")
                if member.compress_size and member.file_size / member.compress_size > limits.max_ratio:
                    raise ArchiveError(f"{relative} is compressed {member.file_size / member.compress_size:.0f}:1, implausible for an image (a zip bomb?).")
                dest = _inside(target, relative)
                dest.parent.mkdir(parents=True, exist_ok=True)
                size = 0
                if dest.exists():
                    raise ArchiveError(f"The archive contains {relative} twice; nothing was extracted.")
                with archive.open(member) as src, open(dest, "xb") as out:
                    while chunk := src.read(1 << 20):
                        size += len(chunk)
                        total += len(chunk)
                        # Headers can lie: count what actually comes out.
                        if size > limits.max_file_bytes or size > member.file_size or total > limits.max_total_bytes:
                            raise ArchiveError(f"{relative} unpacks to more than it declares or than the limits allow; nothing was extracted.")
                        out.write(chunk)
                written.append(dest)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if isinstance(source, Path):
            handle.close()
    return written


def save_files(files: Iterable[tuple[str, bytes]], target: Path, limits: Limits = Limits()) -> list[Path]:
    """Write a browser folder upload ((relative name, bytes) pairs) under ``target`` with the same checks."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise ArchiveError(f"{target} is not empty.")
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    total = 0
    try:
        for name, data in files:
            relative = safe_relative(name)
            if relative is None:
                continue
            if len(written) >= limits.max_files:
                raise ArchiveError(f"More than {limits.max_files} files were uploaded.")
            if len(data) > limits.max_file_bytes:
                raise ArchiveError(f"{relative} is larger than {limits.max_file_bytes / 2**20:.0f} MB.")
            total += len(data)
            if total > limits.max_total_bytes:
                raise ArchiveError(f"The upload is larger than {limits.max_total_bytes / 2**30:.1f} GiB.")
            dest = _inside(target, relative)
            if dest.exists():
                raise ArchiveError(f"{relative} was uploaded twice.")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "xb") as out:
                out.write(data)
            written.append(dest)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return written

"""One entry point for reading a chest X-ray: :func:`read_image`.

It takes bytes, a path or a file-like object (Streamlit's ``UploadedFile``),
sniffs the format from the content (never the extension: DICOM files often have
none) and returns an :class:`XrayImage`: float32 pixels in display polarity plus
the technical metadata. Patient identifiers are never copied out of the file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from cxr_core import config
from cxr_core.errors import (
    CorruptImageError,
    CxrError,
    EmptyFileError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
)

# The film types live in cxr_core.imaging.film (the readers build them without importing this
# module); imported here too, where callers have always found them.
from cxr_core.imaging.film import XrayImage  # noqa: E402

log = logging.getLogger(__name__)

ImageSource = Union[bytes, bytearray, memoryview, str, Path, BinaryIO]

# Magic numbers of the raster formats we accept (PIL is restricted to these too).
_RASTER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)



def _read_source(source: ImageSource, max_bytes: int) -> tuple[bytes, str]:
    """Return (content, display name), refusing anything above ``max_bytes``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = ""
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise ImageReadError(f"File not found: {path.name}") from exc
        except OSError as exc:
            raise ImageReadError(f"The file {path.name} cannot be opened.") from exc
        if path.is_dir():
            raise NotAnImageError(f"{path.name} is a folder, not an image file.")
        if size > max_bytes:
            raise ImageTooLargeError(
                f"The file is {size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB."
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageReadError(f"The file {path.name} cannot be read.") from exc
        name = path.name
    elif hasattr(source, "read"):
        if hasattr(source, "seek"):
            source.seek(0)
        # Read one byte more than allowed so an oversized stream is detected without
        # trusting a size attribute the caller may not have.
        data = source.read(max_bytes + 1)
        name = str(getattr(source, "name", "") or "")
    else:
        raise TypeError(f"read_image cannot read a {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageTooLargeError(
            f"The file is larger than the {max_bytes / 2**20:.0f} MB limit."
        )
    return data, name


def sniff_format(data: bytes) -> str | None:
    """'dicom', a raster format name, or None. Looks at content only."""
    # PS3.10 7.1: a 128-byte preamble followed by the four bytes "DICM".
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in _RASTER_MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM data set written without preamble and meta header (old ACR-NEMA style).

    Such files start with a little-endian group 0x0008 tag (Identifying module), e.g.
    (0008,0005) or (0008,0016). We accept only that shape to avoid handing random
    bytes to a parser in force mode.
    """
    return len(data) >= 8 and data[0:2] == b"\x08\x00" and data[3:4] == b"\x00"


def read_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
) -> XrayImage:
    """Read a chest X-ray from DICOM, PNG, JPEG, BMP or TIFF content.

    Args:
        source: bytes, a path, or a binary file-like object.
        name: display name (defaults to the path's file name or the stream's ``name``).
        max_bytes: refuse larger inputs (default: :func:`cxr_core.config.max_file_bytes`).
        max_pixels: refuse frames with more pixels, checked before decoding.

    Returns:
        An :class:`XrayImage` with pixels of shape (H, W), float32 in [0, 1].

    Raises:
        ImageReadError (or a subclass) with a message fit to show a clinician.
    """
    max_bytes = max_bytes or config.max_file_bytes()
    max_pixels = max_pixels or config.max_pixels()
    data, found_name = _read_source(source, max_bytes)
    display_name = name if name is not None else found_name
    if not data:
        raise EmptyFileError("The file is empty (0 bytes).")

    fmt = sniff_format(data)
    if fmt is None and not _looks_like_bare_dicom(data):
        raise NotAnImageError(
            "File is not an image: it is neither DICOM nor PNG, JPEG, BMP or TIFF."
        )
    try:
        if fmt == "dicom" or fmt is None:
            from cxr_core.imaging.dicom import decode_dicom

            decoded = decode_dicom(data, max_pixels=max_pixels, has_preamble=fmt == "dicom")
        else:
            from cxr_core.imaging.raster import decode_raster

            decoded = decode_raster(data, max_pixels=max_pixels)
    except CxrError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError("The image is too large to decode in the memory available.") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on hostile bytes
        # Fuzzing found pydicom's lazy element parsing (NotImplementedError for a garbled
        # VR) and Pillow's TIFF setup (TypeError) escaping the readers' own handlers: a
        # damaged file is a damaged file, whatever the decoder calls it.
        log.info("decoder raised %s on %s content: %s", type(exc).__name__, fmt or "bare DICOM", exc)
        kind = "DICOM file" if fmt in ("dicom", None) else f"{fmt.upper()} image"
        raise CorruptImageError(f"This {kind} is damaged and cannot be read.") from exc

    pixels = np.ascontiguousarray(decoded.pixels, dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ImageReadError("The image has no usable pixels.")
    pixels.setflags(write=False)
    digest = hashlib.sha256(data).hexdigest()
    log.debug("read %s image %s (%dx%d)", decoded.metadata.source_format, digest[:12], *pixels.shape)
    return XrayImage(
        pixels=pixels,
        metadata=decoded.metadata,
        sha256=digest,
        warnings=decoded.warnings,
        name=display_name,
    )

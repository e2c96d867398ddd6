"""One entry point for reading a chest X-ray: :func:`read_image`.

It takes bytes, a path or a file-like object (Streamlit's ``UploadedFile``),
sniffs the format from the content (never the extension: DICOM files often have
none) and returns an :class:`XrayImage`: float32 pixels in display polarity plus
the technical metadata. Patient identifiers are never copied out of the file.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Window:
    """The intensity window that mapped stored values to display values."""

    center: float
    width: float
    source: str  # "dicom-window", "dicom-voi-lut", "auto" (percentiles) or "none" (8-bit data)


@dataclass(frozen=True)
class ImageMetadata:
    """Technical facts about an image. Deliberately holds nothing that identifies a patient."""

    source_format: str  # "dicom", "png", "jpeg", "bmp", "tiff"
    rows: int
    columns: int
    frames: int = 1
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    photometric_interpretation: str | None = None
    bits_stored: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    transfer_syntax: str | None = None
    window: Window | None = None

    def as_rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a metadata panel; missing values shown as an em dash."""

        def show(value: object) -> str:
            if value is None or value == "":
                return "—"
            if isinstance(value, tuple):
                return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            return str(value)

        window = (
            f"C {self.window.center:g} / W {self.window.width:g} ({self.window.source})"
            if self.window
            else None
        )
        return [
            ("Format", self.source_format.upper()),
            ("Size (rows x columns)", f"{self.rows} x {self.columns}"),
            ("Frames", show(self.frames)),
            ("Modality", show(self.modality)),
            ("Body part", show(self.body_part)),
            ("View position", show(self.view_position)),
            ("Photometric interpretation", show(self.photometric_interpretation)),
            ("Bits stored", show(self.bits_stored)),
            ("Pixel spacing (mm)", show(self.pixel_spacing_mm)),
            ("Transfer syntax", show(self.transfer_syntax)),
            ("Display window", show(window)),
        ]


@dataclass(frozen=True, eq=False)
class XrayImage:
    """A decoded radiograph.

    ``pixels`` is a read-only float32 array of shape (H, W) in [0, 1], in display
    polarity: 0 is black, air is dark and bone bright (MONOCHROME1 already inverted,
    the DICOM window already applied).
    """

    pixels: np.ndarray
    metadata: ImageMetadata
    sha256: str
    warnings: tuple[str, ...] = ()
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    def to_uint8(self) -> np.ndarray:
        """(H, W) uint8 copy for display."""
        return np.clip(self.pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class DecodedPixels:
    """What a format reader hands back to :func:`read_image`."""

    pixels: np.ndarray  # (H, W) float32 in [0, 1], display polarity
    metadata: ImageMetadata
    warnings: tuple[str, ...]


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
            from cxr_core.dicom import decode_dicom

            decoded = decode_dicom(data, max_pixels=max_pixels, has_preamble=fmt == "dicom")
        else:
            from cxr_core.raster import decode_raster

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


def strided_sample(values: np.ndarray, min_side: int) -> np.ndarray:
    """Every 4th row and column of an (H, W) array whose shorter side is at least
    ``min_side`` (16x fewer pixels), else the array itself: for the percentiles and
    medians of a film, which such a sample barely moves."""
    return values[::4, ::4] if values.ndim == 2 and min(values.shape) >= min_side else values


def auto_window(values: np.ndarray) -> tuple[np.ndarray, Window]:
    """Map arbitrary values to [0, 1] between the 0.5th and 99.5th percentiles.

    Used when a file carries no window of its own (16-bit PNG, DICOM without VOI).
    Percentiles rather than min/max so a few hot pixels or a burned-in marker do not
    wash out the lungs. Percentiles come from a strided sample: exact enough, and
    ~16x cheaper on a 2k x 2k film.
    """
    sample = strided_sample(values, 64)
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32), Window(lo, 0.0, "auto")
    out = (values.astype(np.float32) - lo) / (hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out, Window(center=(lo + hi) / 2, width=hi - lo, source="auto")

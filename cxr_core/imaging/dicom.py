"""DICOM decoding: the greyscale pipeline of PS3.4 N.2, done once and carefully.

Order (PS3.4 Figure N.2-1): stored values -> Modality LUT (rescale slope/intercept
or Modality LUT Sequence) -> VOI LUT (LUT sequence, or window centre/width) ->
Presentation LUT (MONOCHROME1 is inverted so that the result is always
MONOCHROME2: air dark, bone bright).

Only technical attributes are copied into :class:`ImageMetadata`; patient and
study identifiers stay in the file.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxr_core.errors import (
    CorruptImageError,
    ImageTooLargeError,
    NoPixelDataError,
    UnsupportedImageError,
)
from cxr_core.imaging.film import DecodedPixels, ImageMetadata, Window, auto_window

log = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOUR_PHOTOMETRIC = {
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
    "PALETTE COLOR",
}


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _first_float(value: Any) -> float | None:
    """First value of a possibly multi-valued DS element (PS3.3 C.11.2.1.2: the first pair is the default)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    # PixelSpacing is calibrated to the patient; projection radiographs often carry only
    # ImagerPixelSpacing (at the detector), which is what CR/DX modules require (C.8.11.4).
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2:
                return (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            continue
    return None


def _window_linear(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing to [0, 1] per PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT, SIGMOID)."""
    x = values.astype(np.float32, copy=False)
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        out = (x - center) / width + 0.5
    else:
        # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; requires w >= 1.
        out = (x - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.clip(out, 0.0, 1.0)


def _apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, Window, list[str]]:
    """Apply the first VOI transform the file provides, or an automatic window."""
    notes: list[str] = []
    if ds.get("VOILUTSequence"):
        try:
            lut_input = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
            out = apply_voi(lut_input, ds, index=0).astype(np.float32)
            # PS3.3 C.11.2.1.1: LUT Descriptor = (entries, first input value mapped, bits per
            # entry); 0 entries means 65536. Some writers declare 16 bits and fill 12, so the
            # output is scaled by the table's own largest entry (never by this image's
            # brightest pixel, which would stretch every film to full white).
            entries, first, bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
            table = apply_voi(np.arange(first, first + (entries or 65536), dtype=np.int64), ds, index=0)
            top = float(np.max(table)) if np.max(table) > 0 else float(2**bits - 1)
            return np.clip(out / top, 0, 1), Window(top / 2, top, "dicom-voi-lut"), notes
        except (NotImplementedError, ValueError, AttributeError, IndexError, KeyError) as exc:
            log.info("VOI LUT sequence unusable (%s); falling back", exc)
            notes.append("The DICOM's VOI lookup table could not be applied; an automatic window was used.")

    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    if center is not None and width is not None:
        function = (_text(ds, "VOILUTFunction") or "LINEAR").upper()
        if width >= 1.0 or (function != "LINEAR" and width > 0):
            return _window_linear(values, center, width, function), Window(center, width, "dicom-window"), notes
        notes.append(f"The DICOM's window width ({width:g}) is invalid; an automatic window was used.")

    out, window = auto_window(values)
    return out, window, notes


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the same weights PIL uses for 'L'."""
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _read_dataset(data: bytes, has_preamble: bool) -> tuple[Dataset, list[str]]:
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, MemoryError,
            IndexError, AttributeError, NotImplementedError, RuntimeError) as exc:
        log.info("dcmread failed: %s: %s", type(exc).__name__, exc)
        raise CorruptImageError(
            "This DICOM file is damaged or incomplete and cannot be read."
        ) from exc
    except Exception as exc:  # pydicom raises a wide range on hostile bytes
        log.info("dcmread failed unexpectedly: %s: %s", type(exc).__name__, exc)
        raise CorruptImageError(
            "This DICOM file is damaged or incomplete and cannot be read."
        ) from exc

    # pydicom reads a cut-off file as far as it goes and only warns; a data set that ends
    # early is damaged, whatever survived of it.
    if any("end of file" in str(w.message).lower() for w in caught):
        raise CorruptImageError("This DICOM file is incomplete (it ends early, probably truncated).")

    if "TransferSyntaxUID" not in ds.file_meta:
        # A data set without a File Meta header (or with one lacking (0002,0010)): PS3.5
        # 10.1 makes Implicit VR Little Endian the default; otherwise use how pydicom parsed it.
        implicit = getattr(ds, "is_implicit_VR", None)
        if implicit is None and getattr(ds, "original_encoding", None):
            implicit = ds.original_encoding[0]
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
        notes.append("The DICOM file has no transfer syntax in its header; it was read as uncompressed.")
    return ds, notes


def decode_dicom(data: bytes, *, max_pixels: int, has_preamble: bool = True) -> DecodedPixels:
    """Decode DICOM bytes to display-ready greyscale pixels of shape (H, W), float32 in [0, 1]."""
    ds, notes = _read_dataset(data, has_preamble)

    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise NoPixelDataError(
            "This DICOM has no pixel data (it may be a report or another non-image object)."
        )

    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not columns:
        raise CorruptImageError("This DICOM declares no image size (Rows/Columns missing or zero).")
    samples = _int(ds, "SamplesPerPixel") or 1
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"This DICOM declares a {columns} x {rows} image ({rows * columns / 1e6:.0f} MP); "
            f"the limit is {max_pixels / 1e6:.0f} MP."
        )
    if samples not in (1, 3):
        raise UnsupportedImageError(f"This DICOM has {samples} samples per pixel; only 1 or 3 are supported.")

    frames = _int(ds, "NumberOfFrames") or 1
    photometric = (_text(ds, "PhotometricInterpretation") or "MONOCHROME2").upper()
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    ts_name = getattr(transfer_syntax, "name", str(transfer_syntax))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # index=0 decodes the first frame only: no need to decode 100 frames to show one.
            arr = pixel_array(ds, index=0 if frames > 1 else None)
    except (NotImplementedError, ImportError) as exc:
        log.info("no decoder for %s: %s", ts_name, exc)
        raise UnsupportedImageError(
            f"This DICOM uses a compression ({ts_name}) this installation cannot decode."
        ) from exc
    except RuntimeError as exc:
        # pydicom raises RuntimeError both when no plugin is installed for the syntax and
        # when every installed plugin failed on the data: tell the two apart for the user.
        log.info("pixel decode failed (%s): %s", ts_name, exc)
        if "missing" in str(exc).lower() or "no plugins" in str(exc).lower():
            raise UnsupportedImageError(
                f"This DICOM uses a compression ({ts_name}) this installation cannot decode."
            ) from exc
        raise CorruptImageError(
            f"The compressed image data ({ts_name}) in this DICOM file is damaged and cannot be decoded."
        ) from exc
    except (ValueError, EOFError, OSError, IndexError, KeyError, TypeError, AttributeError, MemoryError) as exc:
        log.info("pixel decode failed (%s): %s: %s", ts_name, type(exc).__name__, exc)
        raise CorruptImageError(
            "The image data in this DICOM file is damaged or incomplete (the file may be truncated)."
        ) from exc
    except Exception as exc:
        log.info("pixel decode failed unexpectedly (%s): %s: %s", ts_name, type(exc).__name__, exc)
        raise CorruptImageError(
            "The image data in this DICOM file is damaged or incomplete (the file may be truncated)."
        ) from exc

    if frames > 1:
        notes.append(f"This DICOM holds {frames} frames; only the first is analysed.")

    window: Window | None
    if photometric in _COLOUR_PHOTOMETRIC or arr.ndim == 3:
        if photometric == "PALETTE COLOR":
            try:
                arr = apply_color_lut(arr, ds)
            except (ValueError, AttributeError, KeyError, IndexError) as exc:
                raise CorruptImageError("This palette-colour DICOM has a damaged colour table.") from exc
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise UnsupportedImageError(f"Unexpected pixel layout {arr.shape} for {photometric}.")
        # pydicom returns YBR data converted to RGB; scale by the type's range, then take luma.
        top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else float(arr.max() or 1.0)
        pixels = np.clip(_to_grey(arr) / top, 0, 1)
        window = None
        notes.append(f"Colour DICOM ({photometric}) converted to greyscale; radiographs are normally greyscale.")
    else:
        values = apply_modality_lut(arr, ds)
        pixels, window, voi_notes = _apply_voi(values, ds)
        notes.extend(voi_notes)
        if photometric == "MONOCHROME1":
            # PS3.3 C.7.6.3.1.2: in MONOCHROME1 the minimum value is white; invert after VOI.
            pixels = 1.0 - pixels

    if not np.all(np.isfinite(pixels)):
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)

    metadata = ImageMetadata(
        source_format="dicom",
        rows=int(pixels.shape[0]),
        columns=int(pixels.shape[1]),
        frames=frames,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        photometric_interpretation=photometric,
        bits_stored=_int(ds, "BitsStored"),
        pixel_spacing_mm=_pixel_spacing(ds),
        transfer_syntax=ts_name,
        window=window,
    )
    return DecodedPixels(pixels=pixels.astype(np.float32, copy=False), metadata=metadata, warnings=tuple(notes))

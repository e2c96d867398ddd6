"""PNG, JPEG, BMP and TIFF decoding through Pillow.

Pillow is restricted to these formats (it would otherwise try every plugin it has,
EPS through Ghostscript included), the pixel count is checked from the header
before any decoding, and EXIF orientation is honoured.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr_core.errors import CorruptImageError, ImageTooLargeError, NotAnImageError, UnsupportedImageError
from cxr_core.imaging.film import DecodedPixels, ImageMetadata, Window, auto_window

log = logging.getLogger(__name__)

_FORMATS = ["PNG", "JPEG", "BMP", "TIFF"]
# Channels differing by more than this (on a 0-255 scale) in over 1% of pixels mean
# the image really is in colour, not a grey film saved as RGB.
_COLOUR_TOLERANCE = 8
_COLOUR_SHARE = 0.01
_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "PA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8,
         "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns at MAX_IMAGE_PIXELS; our limit is stricter and
            # checked below, so make its warning an error rather than noise.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"The image declares too many pixels (limit {max_pixels / 1e6:.0f} MP).") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError("File is not an image Pillow recognises as PNG, JPEG, BMP or TIFF.") from exc
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, TypeError) as exc:
        # TypeError: Pillow's TIFF reader on a damaged directory ("Missing dimensions").
        raise CorruptImageError("The image file is damaged and cannot be read.") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptImageError("The image declares no size.")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"The image is {width} x {height} ({width * height / 1e6:.0f} MP); "
            f"the limit is {max_pixels / 1e6:.0f} MP."
        )
    return image


def _to_array(image: Image.Image, notes: list[str]) -> tuple[np.ndarray, Window | None]:
    """Greyscale float32 (H, W) in [0, 1] from any Pillow mode."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth greyscale has no standard display range: window it like a DICOM without VOI.
        values = np.asarray(image).astype(np.float32)
        return auto_window(values)

    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            notes.append("Transparency removed (transparent areas shown black).")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba).convert("RGB")
        mode = "RGB"

    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0, None
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0, None

    rgb = np.asarray(image.convert("RGB"))  # P, CMYK, YCbCr, LAB, HSV, RGB
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2).astype(np.int16)
    if float(np.mean(spread > _COLOUR_TOLERANCE)) > _COLOUR_SHARE:
        notes.append(f"Colour image ({mode}) converted to greyscale; radiographs are normally greyscale.")
    grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255.0
    return grey, None


def decode_raster(data: bytes, *, max_pixels: int) -> DecodedPixels:
    """Decode raster bytes to greyscale pixels of shape (H, W), float32 in [0, 1]."""
    image = _open(data, max_pixels)
    notes: list[str] = []
    fmt = (image.format or "").lower()
    bits = _BITS.get(image.mode)
    frames = int(getattr(image, "n_frames", 1) or 1)
    if frames > 1:
        notes.append(f"The file holds {frames} images; only the first is analysed.")
    try:
        image.seek(0)
        image.load()
        # Cameras and phones store rotation as an EXIF tag instead of rotating pixels.
        oriented = ImageOps.exif_transpose(image)
        if oriented is not None and oriented.size != image.size:
            notes.append("Image rotated according to its EXIF orientation.")
        image = oriented if oriented is not None else image
        pixels, window = _to_array(image, notes)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError("The image expands to too many pixels.") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as exc:
        # Pillow raises OSError("image file is truncated") and friends for damaged content.
        log.info("raster decode failed: %s: %s", type(exc).__name__, exc)
        raise CorruptImageError(
            "The image file is damaged or incomplete (it may be truncated) and cannot be read."
        ) from exc
    except (KeyError, NotImplementedError) as exc:
        raise UnsupportedImageError(f"This {fmt.upper()} variant ({image.mode}) is not supported.") from exc

    if not np.all(np.isfinite(pixels)):
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)
    metadata = ImageMetadata(
        source_format=fmt or "raster",
        rows=int(pixels.shape[0]),
        columns=int(pixels.shape[1]),
        frames=frames,
        photometric_interpretation=f"PIL:{image.mode}",
        bits_stored=bits,
        window=window,
    )
    return DecodedPixels(pixels=pixels, metadata=metadata, warnings=tuple(notes))

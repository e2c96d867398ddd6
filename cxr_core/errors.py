"""Exceptions raised by cxr_core.

Every exception carries a message written for a clinician or an admin, not a
developer: pages show ``str(error)`` with ``st.error`` and the CLI prints it in
its ``error`` field. The original low-level exception, when there is one, is
chained (``raise ... from``) and goes to the log, never to the screen.
"""

from __future__ import annotations


class CxrError(Exception):
    """Base class: anything cxr_core raises on purpose."""


# --- Reading images -------------------------------------------------------------------------


class ImageReadError(CxrError):
    """The file could not be turned into an image."""


class EmptyFileError(ImageReadError):
    """The file has no bytes at all."""


class NotAnImageError(ImageReadError):
    """The bytes are neither DICOM nor a supported raster format."""


class CorruptImageError(ImageReadError):
    """The format was recognised but the content is damaged or truncated."""


class NoPixelDataError(ImageReadError):
    """A valid DICOM object that holds no image (a report, a structured document...)."""


class UnsupportedImageError(ImageReadError):
    """A valid file this installation cannot decode (unknown compression, odd layout)."""


class ImageTooLargeError(ImageReadError):
    """The file or its declared pixel count exceeds the configured limits."""


# --- Models ---------------------------------------------------------------------------------


class ModelError(CxrError):
    """A model folder is missing, invalid or cannot be loaded."""


class NoModelInstalledError(ModelError):
    """The weights folder holds no usable model."""


class ModelNotFoundError(ModelError):
    """A model id was asked for that is not installed."""


class ManifestError(ModelError):
    """manifest.json is missing, malformed or inconsistent."""


class ChecksumMismatchError(ModelError):
    """The weights file's sha256 differs from the one the manifest records."""


class HeadMismatchError(ModelError):
    """The classifier head's output size does not fit the manifest's classes."""


class UnknownArchitectureError(ModelError):
    """The manifest names an architecture the registry does not know."""


# --- Explanations ---------------------------------------------------------------------------


class ExplanationError(CxrError):
    """A heatmap could not be computed as asked."""

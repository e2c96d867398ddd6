"""Exported pictures carry their provenance.

A heatmap saved from the app and pasted into a slide, a teaching file or a report loses the
screen around it: which model and version made it, for which class, and that it is decision
support. Every exported PNG therefore gets a white strip under the picture (the picture's
own pixels are left as they are) naming the model, what the map shows and the disclaimer,
and the same facts as PNG text chunks for software. File names are never written: they
often hold patient names; the image is named by its SHA-256 prefix.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from cxr_core.inference import DISCLAIMER

#: Text height as a share of the picture's width (a 2,000 px film gets 25 px text), within bounds.
_TEXT_SHARE, _MIN_TEXT, _MAX_TEXT = 1 / 80, 12, 40


@dataclass(frozen=True)
class Provenance:
    """What an exported picture shows and what made it."""

    model: str  # "id@version", or several joined by ", " for a grid across models
    model_name: str
    shows: str  # e.g. "Grad-CAM for COVID-19 (p = 0.298)"
    image_sha256: str | None = None

    def lines(self) -> list[str]:
        image = f" · image sha256 {self.image_sha256[:12]}" if self.image_sha256 else ""
        return [f"{self.model_name} ({self.model}){image}", self.shows, DISCLAIMER]

    def text_chunks(self) -> dict[str, str]:
        chunks = {"Software": "cxr", "cxr:model": self.model, "cxr:model_name": self.model_name, "Description": self.shows, "Disclaimer": DISCLAIMER}
        if self.image_sha256:
            chunks["cxr:image_sha256"] = self.image_sha256
        return chunks


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels; a word wider than
    that on its own (a model key on a narrow picture) is broken between characters."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
        while draw.textlength(line, font=font) > width and len(line) > 1:
            cut = 1
            while cut < len(line) and draw.textlength(line[: cut + 1], font=font) <= width:
                cut += 1
            lines.append(line[:cut])
            line = line[cut:]
    lines.append(line)
    return lines


def _as_image(picture: np.ndarray | Image.Image) -> Image.Image:
    return picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture, dtype=np.uint8))


def with_banner(picture: np.ndarray | Image.Image, lines: Sequence[str]) -> Image.Image:
    """(H, W, 3) uint8 picture -> RGB image (H + strip, W): the picture unchanged, ``lines`` below it."""
    top = _as_image(picture).convert("RGB")
    size = int(min(max(top.width * _TEXT_SHARE, _MIN_TEXT), _MAX_TEXT))
    font = ImageFont.load_default(size=size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(4, size // 2)
    wrapped = [part for line in lines for part in wrap_text(measure, line, font, top.width - 2 * margin)]
    step = int(size * 1.3)
    canvas = Image.new("RGB", (top.width, top.height + 2 * margin + step * len(wrapped)), "white")
    canvas.paste(top, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(wrapped):
        draw.text((margin, top.height + margin + step * k), text, fill="black", font=font)
    return canvas


def labelled_png(picture: np.ndarray | Image.Image, provenance: Provenance, *, banner: bool = True) -> bytes:
    """PNG bytes of ``picture`` with the provenance in its text chunks and, unless ``banner`` is
    False (the command line keeps its documented film-sized output), in a strip below it."""
    info = PngInfo()
    for key, value in provenance.text_chunks().items():
        info.add_itxt(key, value)
    out = with_banner(picture, provenance.lines()) if banner else _as_image(picture)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

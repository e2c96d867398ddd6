"""The raster reader on synthetic PNG/JPEG/BMP/TIFF of every mode, and broken files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.errors import CorruptImageError, EmptyFileError, ImageTooLargeError, NotAnImageError
from cxr_core.imaging.film import strided_sample
from cxr_core.imaging.io import read_image


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 ramp, dark at the left, bright at the right."""
    return np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))


def test_png_8bit_grey_keeps_values() -> None:
    ramp = gradient()
    image = read_image(encode(Image.fromarray(ramp, "L"), "PNG"))
    assert image.metadata.source_format == "png" and image.metadata.bits_stored == 8
    np.testing.assert_allclose(image.pixels, ramp / 255.0, atol=1e-6)
    assert image.warnings == ()


def test_png_16bit_grey_is_windowed() -> None:
    ramp = np.tile(np.linspace(1000, 3000, 64).astype(np.uint16), (32, 1))
    image = read_image(encode(Image.fromarray(ramp), "PNG"))
    assert image.metadata.bits_stored == 16
    assert image.metadata.window is not None and image.metadata.window.source == "auto"
    row = image.pixels[0]
    assert np.all(np.diff(row) >= 0) and row[0] == 0.0 and row[-1] == 1.0


def test_rgb_grey_film_has_no_colour_warning() -> None:
    ramp = gradient()
    rgb = np.stack([ramp] * 3, axis=2)
    image = read_image(encode(Image.fromarray(rgb, "RGB"), "PNG"))
    np.testing.assert_allclose(image.pixels, ramp / 255.0, atol=1 / 255)
    assert image.warnings == ()


def test_colour_photo_is_converted_with_warning() -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    image = read_image(encode(Image.fromarray(rgb, "RGB"), "JPEG", quality=95))
    assert any("Colour image" in w for w in image.warnings)
    assert abs(float(image.pixels.mean()) - 0.299 * 200 / 255) < 0.03


def test_rgba_transparency_is_flattened_with_warning() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[:, :8, 3] = 255  # left half opaque white, right half transparent
    image = read_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert any("Transparency" in w for w in image.warnings)
    assert image.pixels[:, :8].min() == 1.0 and image.pixels[:, 8:].max() == 0.0


def test_palette_png() -> None:
    grey = Image.fromarray(gradient(), "L").convert("P")
    image = read_image(encode(grey, "PNG"))
    np.testing.assert_allclose(image.pixels, gradient() / 255.0, atol=2 / 255)


def test_la_and_one_bit() -> None:
    la = Image.fromarray(gradient(), "L").convert("LA")
    assert read_image(encode(la, "PNG")).shape == (48, 64)
    one = Image.fromarray((gradient() > 127).astype(np.uint8) * 255, "L").convert("1")
    pixels = read_image(encode(one, "PNG")).pixels
    assert set(np.unique(pixels)) <= {0.0, 1.0}


def test_cmyk_jpeg() -> None:
    cmyk = Image.fromarray(np.stack([gradient()] * 3, axis=2), "RGB").convert("CMYK")
    image = read_image(encode(cmyk, "JPEG", quality=95))
    assert image.shape == (48, 64)
    assert image.pixels[:, -1].mean() > image.pixels[:, 0].mean() + 0.5


def test_bmp_and_16bit_tiff() -> None:
    assert read_image(encode(Image.fromarray(gradient(), "L"), "BMP")).metadata.source_format == "bmp"
    ramp16 = np.tile(np.linspace(0, 60000, 64).astype(np.uint16), (8, 1))
    tiff = read_image(encode(Image.fromarray(ramp16), "TIFF"))
    assert tiff.metadata.source_format == "tiff" and tiff.pixels[0, -1] == 1.0


def test_multipage_tiff_takes_first_page_with_warning() -> None:
    first = Image.fromarray(np.full((8, 8), 10, np.uint8), "L")
    second = Image.fromarray(np.full((8, 8), 250, np.uint8), "L")
    data = encode(first, "TIFF", save_all=True, append_images=[second])
    image = read_image(data)
    assert any("2 images" in w for w in image.warnings)
    assert abs(float(image.pixels.mean()) - 10 / 255) < 1e-6


def test_exif_orientation_is_honoured() -> None:
    # A landscape sensor image whose EXIF says "rotate 90 CW to view" (orientation 6).
    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, :10] = 255  # bright band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    image = read_image(encode(Image.fromarray(pixels, "L"), "JPEG", exif=exif.tobytes(), quality=95))
    assert image.shape == (80, 40)  # portrait once rotated
    # Rotating 90 degrees clockwise moves the stored left edge to the top.
    assert image.pixels[:10].mean() > 0.9 and image.pixels[-10:].mean() < 0.1
    assert any("EXIF" in w for w in image.warnings)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a tiny (invalid) image stream."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_gigapixel_png_is_refused_from_its_header() -> None:
    with pytest.raises(ImageTooLargeError):
        read_image(_png_header_only(200_000, 100_000))  # 20 gigapixels


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.fromarray(gradient(), "L"), "PNG")
    with pytest.raises(ImageTooLargeError, match="64 x 48"):
        read_image(data, max_pixels=1000)


def test_byte_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.fromarray(gradient(), "L"), "PNG"))
    with pytest.raises(ImageTooLargeError):
        read_image(path, max_bytes=100)
    with pytest.raises(ImageTooLargeError):
        read_image(io.BytesIO(path.read_bytes()), max_bytes=100)


def test_empty_file() -> None:
    with pytest.raises(EmptyFileError, match="empty"):
        read_image(b"")


@pytest.mark.parametrize("content", [b"GIF89a" + b"\0" * 100, b"%PDF-1.7\n" + b"x" * 300, b"\x00\x01\x02" * 100, "hello\n".encode()])
def test_wrong_magic_is_not_an_image(content: bytes) -> None:
    with pytest.raises(NotAnImageError, match="File is not an image"):
        read_image(content)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_truncated_raster(fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (256, 256), dtype=np.uint8)
    data = encode(Image.fromarray(noisy, "L"), fmt)
    with pytest.raises(CorruptImageError):
        read_image(data[: len(data) // 2])


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="File not found"):
        read_image(tmp_path / "absent.png")


def test_strided_sample_thins_only_films_at_or_above_the_size_given() -> None:
    film = np.arange(128 * 96, dtype=np.float32).reshape(128, 96)
    assert strided_sample(film, 64).shape == (32, 24) and strided_sample(film, 64)[1, 1] == film[4, 4]
    assert strided_sample(film, 97) is film  # shorter side 96 < 97: every pixel counts
    stack = np.zeros((3, 128, 128), dtype=np.float32)
    assert strided_sample(stack, 64) is stack  # only (H, W) films are thinned

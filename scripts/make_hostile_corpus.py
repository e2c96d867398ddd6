"""Generate a corpus of broken and hostile files for the readers and the upload paths.

    python scripts/make_hostile_corpus.py OUT_DIR

Writes at least 100 files (deterministic, seeded) built from pydicom-data's real files:
truncated and bit-flipped DICOMs, DICOMs without pixel data or with wrong lengths or
absurd declared sizes, PNG/JPEG/TIFF decompression bombs and damaged rasters, empty and
text files posing as images, polyglots, and zip archives with path traversal, absolute
paths, symlinks and bombs. ``manifest.json`` lists each file with the kind of attack.
"""

from __future__ import annotations

import io
import json
import random
import stat
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def _data_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


def _dicom(rows: int, cols: int, pixel_bytes: bytes | None, **extra: object) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(rows), str(cols), str(len(pixel_bytes or b""))])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixel_bytes is not None:
        ds.PixelData = pixel_bytes
    for key, value in extra.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _zip(entries: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def build(out: Path) -> list[dict[str, str]]:
    rng = random.Random(20261123)
    out.mkdir(parents=True, exist_ok=True)
    items: list[dict[str, str]] = []

    def add(name: str, data: bytes, kind: str, expect: str = "error") -> None:
        (out / name).write_bytes(data)
        items.append({"file": name, "kind": kind, "expect": expect})

    sources = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "693_J2KR.dcm", "MR2_J2KI.dcm", "US1_J2KR.dcm", "JPEG-LL.dcm", "emri_small_RLE.dcm", "OBXXXX1A_rle.dcm"]
    for source in sources:
        data = (_data_dir() / source).read_bytes()
        for fraction in (0.001, 0.02, 0.3, 0.6, 0.95, 0.999):
            add(f"truncated-{fraction}-{source}", data[: max(1, int(len(data) * fraction))], "truncated DICOM")
        for flips in (1, 16, 256):
            mutated = bytearray(data)
            for _ in range(flips):
                position = rng.randrange(132, len(mutated))
                mutated[position] ^= 1 << rng.randrange(8)
            add(f"bitflip-{flips}-{source}", bytes(mutated), "bit-flipped DICOM", expect="any")
        header = bytearray(data[:4096])
        for position in range(140, min(len(header), 1400), 97):
            header[position] ^= 0xFF
        add(f"header-garbled-{source}", bytes(header) + data[4096:], "DICOM with a garbled header", expect="any")

    add("no-pixel-data.dcm", _dicom(512, 512, None), "DICOM without pixel data")
    add("short-pixel-data.dcm", _dicom(512, 512, b"\0" * 1000), "pixel data shorter than declared")
    add("long-pixel-data.dcm", _dicom(16, 16, b"\0" * 100_000), "pixel data longer than declared", expect="any")
    add("huge-declared.dcm", _dicom(65535, 65535, b"\0" * 64), "absurd declared rows/columns")
    add("zero-rows.dcm", _dicom(0, 512, b""), "zero rows")
    add("odd-samples.dcm", _dicom(8, 8, b"\0" * 512, SamplesPerPixel=4), "unsupported samples per pixel")
    add("bits-64.dcm", _dicom(8, 8, b"\0" * 128, BitsAllocated=64, BitsStored=64, HighBit=63), "64-bit pixels", expect="any")
    add("window-zero.dcm", _dicom(8, 8, b"\x01\x00" * 64, WindowCenter=100, WindowWidth=0), "zero window width", expect="any")
    add("dicm-only.dcm", b"\0" * 128 + b"DICM", "preamble and magic only")
    add("dicm-garbage.dcm", b"\0" * 128 + b"DICM" + bytes(rng.randrange(256) for _ in range(5000)), "magic followed by noise")

    add("png-20-gigapixel.png", _png_declaring(200_000, 100_000, zlib.compress(b"\0" * 1024)), "PNG decompression bomb (header)")
    add("png-wide.png", _png_declaring(2**31 - 1, 1, zlib.compress(b"\0" * 16)), "PNG with an absurd width")
    bomb = zlib.compress(b"\0" * (30_000 * 30_000 // 8), 9)
    add("png-deflate-bomb.png", _png_declaring(30_000, 30_000, bomb), "PNG deflate bomb (900 MP)")
    ok_png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256), dtype=np.uint8)).save(ok_png, format="PNG")
    png = ok_png.getvalue()
    for fraction in (0.05, 0.5, 0.9):
        add(f"png-truncated-{fraction}.png", png[: int(len(png) * fraction)], "truncated PNG")
    add("png-bad-crc.png", png[:20] + bytes([png[20] ^ 0xFF]) + png[21:], "PNG with a bad CRC", expect="any")
    ok_jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (256, 256), dtype=np.uint8)).save(ok_jpeg, format="JPEG")
    jpeg = ok_jpeg.getvalue()
    for fraction in (0.05, 0.5):
        add(f"jpeg-truncated-{fraction}.jpg", jpeg[: int(len(jpeg) * fraction)], "truncated JPEG", expect="any")
    sof = jpeg.find(b"\xff\xc0")
    big = bytearray(jpeg)
    big[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    add("jpeg-huge-declared.jpg", bytes(big), "JPEG declaring 65500x65500")
    tiff = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tiff, format="TIFF")
    t = tiff.getvalue()
    add("tiff-truncated.tif", t[: len(t) // 3], "truncated TIFF", expect="any")
    add("bmp-header-only.bmp", b"BM" + b"\0" * 52, "BMP header only")

    add("empty.dcm", b"", "zero bytes")
    add("empty.png", b"", "zero bytes")
    add("notes.dcm", b"Patient: nobody\nThis is a text file named .dcm\n" * 20, "text named .dcm")
    add("report.png", b"<html><script>alert(1)</script></html>", "HTML named .png")
    add("random.jpg", bytes(rng.randrange(256) for _ in range(10_000)), "random bytes")
    add("pdf.dcm", b"%PDF-1.7\n" + b"0" * 1000, "PDF named .dcm")
    add("polyglot-png-zip.png", png + _zip([("evil/../../x.png", b"x")]), "PNG with a zip appended (polyglot)", expect="any")
    add("polyglot-dicom-html.dcm", b"<html>" + b"\0" * 122 + b"DICM" + (_data_dir() / "RG1_UNCR.dcm").read_bytes()[132:4096], "HTML preamble then DICOM (polyglot)", expect="any")

    # Archives for the dataset upload path.
    add("zip-slip.zip", _zip([("covid/ok.png", png), ("../../evil.png", png)]), "zip slip (../)")
    add("zip-absolute.zip", _zip([("covid/ok.png", png), ("/tmp/evil.png", png)]), "zip absolute path")
    add("zip-backslash.zip", _zip([("covid/ok.png", png), ("..\\..\\evil.png", png)]), "zip slip with backslashes")
    add("zip-symlink.zip", _zip([("covid/ok.png", png)], symlink="covid/link.png"), "zip symlink")
    add("zip-bomb.zip", _zip([("covid/bomb.png", b"\0" * (50 * 1024 * 1024))]), "zip bomb (50 MB of zeros)")
    add("zip-many.zip", _zip([(f"covid/{i}.png", b"x") for i in range(60_000)]), "zip with 60,000 entries")
    add("zip-not-a-zip.zip", b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(2000)), "corrupt zip")
    (out / "manifest.json").write_text(json.dumps(items, indent=1))
    return items


if __name__ == "__main__":
    made = build(Path(sys.argv[1]))
    print(f"{len(made)} files written to {sys.argv[1]}")

"""The DICOM reader on real files (pydicom-data, pydicom's test files) and built ones."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr_core.errors import CorruptImageError, ImageTooLargeError, NoPixelDataError, NotAnImageError
from cxr_core.imaging.io import read_image


def build_dicom(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    bits: int = 16,
    **elements: object,
) -> bytes:
    """A minimal valid DICOM file (Part 10, explicit VR little endian) around ``pixels``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-123456"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- The real chest film -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_rg1_chest_reads_with_metadata_and_dark_lungs(dicom_data: Path, name: str) -> None:
    image = read_image(dicom_data / name)
    meta = image.metadata
    assert image.shape == (1955, 1841)
    assert image.pixels.dtype == np.float32 and image.pixels.min() >= 0 and image.pixels.max() <= 1
    assert (meta.source_format, meta.modality, meta.body_part, meta.view_position) == ("dicom", "CR", "CHEST", "PA")
    assert meta.photometric_interpretation == "MONOCHROME1" and meta.bits_stored == 15
    assert meta.window is not None and meta.window.source == "dicom-window"
    assert meta.window.center == 15000 and meta.window.width == 30000
    # After MONOCHROME1 inversion the aerated lungs must be darker than the spine and
    # mediastinum between them (and than the subdiaphragmatic abdomen below).
    h, w = image.shape
    px = image.pixels
    right_lung = px[int(0.25 * h) : int(0.5 * h), int(0.2 * w) : int(0.35 * w)].mean()
    left_lung = px[int(0.25 * h) : int(0.5 * h), int(0.65 * w) : int(0.8 * w)].mean()
    spine = px[int(0.25 * h) : int(0.5 * h), int(0.46 * w) : int(0.54 * w)].mean()
    abdomen = px[int(0.85 * h) : int(0.95 * h), int(0.3 * w) : int(0.7 * w)].mean()
    assert right_lung < spine - 0.05 and left_lung < spine - 0.05
    assert max(right_lung, left_lung) < abdomen
    assert not any("frame" in w for w in image.warnings)


def test_lossless_jpeg2000_matches_uncompressed(dicom_data: Path) -> None:
    raw = read_image(dicom_data / "RG1_UNCR.dcm")
    j2k = read_image(dicom_data / "RG1_J2KR.dcm")
    assert j2k.metadata.transfer_syntax and "2000" in j2k.metadata.transfer_syntax
    np.testing.assert_array_equal(raw.pixels, j2k.pixels)


def test_detection_is_by_content_not_extension(dicom_data: Path) -> None:
    data = (dicom_data / "RG1_UNCR.dcm").read_bytes()
    nameless = read_image(data, name="IMG0001")
    assert nameless.metadata.source_format == "dicom"


def test_patient_identifiers_are_not_carried() -> None:
    data = build_dicom(np.arange(64, dtype=np.uint16).reshape(8, 8), bits=12)
    image = read_image(data)
    text = repr(image) + repr(image.metadata.as_rows())
    assert "Doe" not in text and "MRN-123456" not in text


# --- Transfer syntaxes: each compressed form decodes to the same pixels as its raw form ----


@pytest.mark.parametrize(
    "compressed, reference, syntax_word",
    [
        ("MR_small_RLE.dcm", "MR_small.dcm", "RLE"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", "JPEG-LS"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", "2000"),
        ("MR_small_bigendian.dcm", "MR_small.dcm", "Big Endian"),
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm", "2000"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", "2000"),
    ],
)
def test_compressed_transfer_syntaxes_decode_losslessly(
    dicom_tests: Path, dicom_data: Path, compressed: str, reference: str, syntax_word: str
) -> None:
    def find(name: str) -> Path:
        return dicom_tests / name if (dicom_tests / name).exists() else dicom_data / name

    comp = read_image(find(compressed))
    ref = read_image(find(reference))
    assert syntax_word.lower() in (comp.metadata.transfer_syntax or "").lower()
    assert comp.shape == ref.shape
    np.testing.assert_allclose(comp.pixels, ref.pixels, atol=1e-6)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("JPEG-LL.dcm", (1024, 256)),  # JPEG lossless, process 14
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", (768, 1024)),  # JPEG lossless SV1, 8-bit
        ("JPGExtended.dcm", (1024, 256)),  # JPEG extended (12-bit lossy)
        ("MR2_J2KI.dcm", (1024, 1024)),  # JPEG 2000 lossy
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100)),  # JPEG baseline, YBR
        ("JPEGLSNearLossless_16.dcm", (50, 10)),  # JPEG-LS near-lossless
        ("RG3_J2KI.dcm", (1760, 1760)),
    ],
)
def test_lossy_syntaxes_decode(dicom_tests: Path, dicom_data: Path, name: str, shape: tuple[int, int]) -> None:
    path = dicom_tests / name if (dicom_tests / name).exists() else dicom_data / name
    image = read_image(path)
    assert image.shape == shape
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0 and image.pixels.std() > 0.01


def test_multiframe_takes_first_frame_with_warning(dicom_data: Path) -> None:
    image = read_image(dicom_data / "emri_small_jpeg_ls_lossless.dcm")
    assert image.shape == (64, 64) and image.metadata.frames == 10
    assert any("10 frames" in w and "first" in w for w in image.warnings)
    first = pydicom.pixels.pixel_array(pydicom.dcmread(dicom_data / "emri_small.dcm"), index=0)
    assert np.corrcoef(first.ravel(), image.pixels.ravel())[0, 1] > 0.999


def test_rgb_dicom_is_converted_with_warning(dicom_data: Path) -> None:
    image = read_image(dicom_data / "US1_J2KR.dcm")
    assert image.shape == (480, 640)
    assert any("Colour DICOM" in w for w in image.warnings)


def test_voi_lut_sequence_is_applied(dicom_data: Path) -> None:
    image = read_image(dicom_data / "vlut_04.dcm")
    assert image.metadata.window is not None and image.metadata.window.source == "dicom-voi-lut"


def test_voi_lut_output_is_scaled_by_the_table_not_the_image(dicom_data: Path) -> None:
    """A dim film stays dim: its brightest pixel maps to LUT(value) / LUT's largest entry."""
    import io

    import pydicom
    from pydicom.pixels import apply_voi

    ds = pydicom.dcmread(dicom_data / "vlut_04.dcm")
    pixels = ds.pixel_array
    dim = np.minimum(pixels, np.quantile(pixels, 0.3)).astype(pixels.dtype)
    ds.PixelData = dim.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer)
    image = read_image(buffer.getvalue())
    entries, first, _ = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds, index=0)
    expected = float(apply_voi(np.array([dim.max()], dtype=np.int64), ds, index=0)[0]) / float(table.max())
    assert expected < 0.95
    assert float(image.pixels.max()) == pytest.approx(expected, abs=1e-3)


# --- The pipeline order: modality LUT, then VOI window, then MONOCHROME1 inversion ---------


def test_rescale_then_window_then_invert() -> None:
    stored = np.array([[0, 50, 100, 150]], dtype=np.uint16)
    data = build_dicom(
        stored,
        photometric="MONOCHROME1",
        bits=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=100,
        WindowWidth=201,
    )
    image = read_image(data)
    # Modality LUT: 2x - 100 -> [-100, 0, 100, 200].
    # LINEAR window c=100, w=201 (PS3.3 C.11.2.1.2.1): y = (x - 99.5) / 200 + 0.5, clipped.
    # MONOCHROME1: display = 1 - y.
    rescaled = stored.astype(float) * 2 - 100
    y = np.clip((rescaled - 99.5) / 200 + 0.5, 0, 1)
    np.testing.assert_allclose(image.pixels, 1 - y, atol=1e-6)
    assert image.metadata.photometric_interpretation == "MONOCHROME1"


def test_monochrome2_without_window_is_auto_windowed() -> None:
    stored = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (16, 1))
    image = read_image(build_dicom(stored, bits=12))
    assert image.metadata.window is not None and image.metadata.window.source == "auto"
    # Monotonic, dark to bright along the row, full range used.
    row = image.pixels[0]
    assert np.all(np.diff(row) >= 0) and row[0] == 0.0 and row[-1] == 1.0


# --- Broken and hostile DICOM ----------------------------------------------------------------


def test_no_pixel_data() -> None:
    with pytest.raises(NoPixelDataError, match="This DICOM has no pixel data"):
        read_image(build_dicom(None))


def test_real_report_without_pixels(dicom_tests: Path) -> None:
    with pytest.raises(NoPixelDataError):
        read_image(dicom_tests / "test-SR.dcm")


@pytest.mark.parametrize("keep", [140, 2000, 3_000_000])
def test_truncated_dicom(dicom_data: Path, keep: int) -> None:
    data = (dicom_data / "RG1_UNCR.dcm").read_bytes()[:keep]
    with pytest.raises((CorruptImageError, NoPixelDataError)) as info:
        read_image(data)
    assert "Traceback" not in str(info.value) and len(str(info.value)) < 200


def test_truncated_compressed_dicom(dicom_data: Path) -> None:
    data = (dicom_data / "RG1_J2KR.dcm").read_bytes()
    with pytest.raises(CorruptImageError):
        read_image(data[: len(data) // 2])


def test_huge_declared_size_is_refused_before_decoding() -> None:
    data = build_dicom(np.zeros((4, 4), dtype=np.uint16), Rows=60000, Columns=60000)
    with pytest.raises(ImageTooLargeError, match="60000 x 60000"):
        read_image(data)


def test_text_named_dcm_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "scan.dcm"
    path.write_text("Patient: nobody\nThis is a note, not an image.\n")
    with pytest.raises(NotAnImageError, match="File is not an image"):
        read_image(path)

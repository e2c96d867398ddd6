"""Reading films and making them ready for a network: DICOM and raster decoding, windowing,
quality and burned-in text, lung segmentation, preprocessing, and the input gate's verdict."""

from pathlib import Path

#: reference data the image checks need (lung atlas, chest-film space, exposure range, mean chest)
ASSETS = Path(__file__).resolve().parent / "assets"

"""Measure the out-of-distribution gate: chest films wrongly rejected, non-chest images caught.

    python scripts/measure_gate.py [--model ID] [--data ../shared/data/cxr] [--json OUT]

Chest set: every film of the shared test split (all four labels: all are frontal chest films).
Non-chest set, built here and described in the output:
  * every readable image of pydicom-data and of pydicom's own test files that is not a chest film;
  * scikit-image's bundled sample images (if scikit-image is installed);
  * synthetic non-radiographs: text documents, colour photos of shapes, noise, gradients,
    checkerboards, blank frames.
Files go through the app's own path (read_image -> predict), metadata rules included.
The non-chest set is measured twice: as it is, and with every DICOM header fact the gate
reads (modality, body part, view) removed, as if each file had been exported to PNG, so
the image-based checks are measured on their own.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_core.errors import CxrError  # noqa: E402
from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.io import read_image
from cxr_core.inference import predict  # noqa: E402
from cxr_core.models.loading import load_model, resolve_model  # noqa: E402

CHEST_DICOM = {"RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_non_radiographs(seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out: list[tuple[str, bytes]] = []
    for i in range(12):  # documents
        page = Image.new("L", (600, 800), 255)
        draw = ImageDraw.Draw(page)
        for line in range(30):
            draw.text((40, 30 + 25 * line), " ".join("".join(chr(97 + int(c)) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(8)), fill=0)
        out.append((f"synthetic/document-{i}.png", _png(np.asarray(page))))
    for i in range(12):  # colour "photos" of shapes on a sky/grass scene
        img = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(80, 230, 3)))
        draw = ImageDraw.Draw(img)
        draw.rectangle([0, 300, 640, 480], fill=tuple(int(v) for v in rng.integers(0, 160, 3)))
        for _ in range(8):
            x, y = rng.integers(0, 600), rng.integers(0, 440)
            draw.ellipse([x, y, x + rng.integers(20, 200), y + rng.integers(20, 200)], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        out.append((f"synthetic/photo-{i}.png", _png(np.asarray(img))))
    for i in range(6):
        out.append((f"synthetic/noise-{i}.png", _png(rng.integers(0, 256, (512, 512), dtype=np.uint8))))
    for i, angle in enumerate(np.linspace(0, np.pi, 6)):
        yy, xx = np.mgrid[0:512, 0:512] / 512
        out.append((f"synthetic/gradient-{i}.png", _png((255 * ((np.cos(angle) * xx + np.sin(angle) * yy) % 1)).astype(np.uint8))))
    for i, cell in enumerate((8, 32, 64, 128)):
        yy, xx = np.mgrid[0:512, 0:512]
        out.append((f"synthetic/checkerboard-{i}.png", _png(((((yy // cell) + (xx // cell)) % 2) * 255).astype(np.uint8))))
    for i, value in enumerate((0, 128, 255)):
        out.append((f"synthetic/blank-{i}.png", _png(np.full((512, 512), value, np.uint8))))
    return out


def non_chest_set() -> tuple[list[tuple[str, XrayImage]], dict[str, int], int]:
    import data_store
    import pydicom

    items: list[tuple[str, XrayImage]] = []
    makeup: Counter[str] = Counter()
    unreadable = 0
    folders = {"pydicom-data": Path(data_store.__file__).parent / "data", "pydicom-tests": Path(pydicom.__file__).parent / "data" / "test_files"}
    for group, folder in folders.items():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.name in CHEST_DICOM:
                continue
            try:
                image = read_image(path)
            except CxrError:
                unreadable += 1
                continue
            items.append((f"{group}/{path.name}", image))
            makeup[f"{group}:{image.metadata.modality or image.metadata.source_format}"] += 1
    try:
        import skimage.data

        for name in ("astronaut", "camera", "coins", "moon", "page", "horse", "hubble_deep_field", "chelsea", "coffee", "rocket", "text", "clock", "immunohistochemistry", "grass", "gravel", "brick", "cell", "checkerboard", "retina", "eagle"):
            try:
                array = getattr(skimage.data, name)()
            except Exception:  # noqa: BLE001 - some samples need a download; skip them
                continue
            array = (array * 255).astype(np.uint8) if array.dtype == bool else np.asarray(array)
            items.append((f"skimage/{name}", read_image(_png(array.astype(np.uint8)))))
            makeup["skimage"] += 1
    except ImportError:
        pass
    for name, data in synthetic_non_radiographs():
        items.append((name, read_image(data)))
        makeup["synthetic:" + name.split("/")[1].split("-")[0]] += 1
    return items, dict(makeup), unreadable


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"))
    parser.add_argument("--json")
    args = parser.parse_args()
    model = load_model(resolve_model(args.model).path)

    chest_files = sorted(Path(args.data).glob("test/*/*.jpg"))
    chest_outcomes: Counter[str] = Counter()
    for start in range(0, len(chest_files), 64):
        images = [read_image(p) for p in chest_files[start : start + 64]]
        for prediction in predict(model, images):
            chest_outcomes[prediction.gate_outcome] += 1

    items, makeup, unreadable = non_chest_set()

    def run_non_chest(images: list[tuple[str, XrayImage]]) -> dict[str, object]:
        outcomes: Counter[str] = Counter()
        by_group: dict[str, Counter[str]] = defaultdict(Counter)
        missed = []
        for start in range(0, len(images), 32):
            chunk = images[start : start + 32]
            for (name, _), prediction in zip(chunk, predict(model, [im for _, im in chunk])):
                outcomes[prediction.gate_outcome] += 1
                by_group[name.split("/")[0]][prediction.gate_outcome] += 1
                if prediction.gate_outcome == "accepted":
                    missed.append(name)
        n = sum(outcomes.values())
        return {
            "n": n, **outcomes,
            "rejected_or_warned_rate": round((outcomes["rejected"] + outcomes["warning"]) / n, 4),
            "rejected_rate": round(outcomes["rejected"] / n, 4),
            "by_group": {g: dict(c) for g, c in sorted(by_group.items())}, "accepted": missed,
        }

    def without_header(image: XrayImage) -> XrayImage:
        meta = replace(image.metadata, source_format="png", modality=None, body_part=None, view_position=None)
        return replace(image, metadata=meta)

    n_chest = sum(chest_outcomes.values())
    report = {
        "model": model.key,
        "chest": {"n": n_chest, **chest_outcomes, "wrongly_rejected_rate": round(chest_outcomes["rejected"] / n_chest, 4),
                  "warned_rate": round(chest_outcomes["warning"] / n_chest, 4)},
        "non_chest": {"makeup": makeup, "unreadable_skipped": unreadable, **run_non_chest(items)},
        "non_chest_without_dicom_headers": run_non_chest([(name, without_header(im)) for name, im in items]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

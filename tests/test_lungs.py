"""The lung segmenter: its model folder, its masks, the `lungs` command, and lung crops."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_core.config import PROJECT_ROOT
from cxr_core.errors import ChecksumMismatchError, ManifestError, ModelError
from cxr_core.explain.cam import Heatmap
from cxr_core.imaging.io import read_image
from cxr_core.imaging.lungs import dice, lung_box, lung_views, postprocess_mask, segment_lungs, segmenter_manifest
from cxr_core.imaging.preprocess import crop_box, network_view, to_input, to_network_input
from cxr_core.models.architectures import build_segmenter
from cxr_core.models.loading import discover_models, load_model, load_segmenter, save_segmenter_folder
from cxr_core.models.manifest import InputSpec, parse_manifest
from tests.conftest import SHARED_DATA

SHIPPED = PROJECT_ROOT / "weights" / "lung-segmenter"
MASKS_CSV = SHARED_DATA.parent / "lung-masks" / "masks.csv"


@pytest.fixture(scope="module")
def segmenter():  # type: ignore[no-untyped-def]
    return load_segmenter(SHIPPED, device="cpu")


def _two_lungs(size: int = 100) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[20:80, 15:45] = True
    mask[20:80, 55:85] = True
    return mask


def test_postprocess_keeps_two_lungs_fills_holes_and_drops_islands() -> None:
    mask = _two_lungs()
    mask[40:45, 25:30] = False  # a nodule-sized hole inside the right lung
    mask[90:93, 5:8] = True  # an island in the abdomen
    out = postprocess_mask(mask)
    assert out[42, 27] and not out[91, 6]
    assert out.sum() == _two_lungs().sum()
    assert not postprocess_mask(np.zeros((10, 10), bool)).any()


def test_dice_and_lung_box() -> None:
    a = _two_lungs()
    b = np.zeros_like(a)
    b[20:80, 15:45] = True
    assert dice(a, a) == 1.0 and dice(a, b) == pytest.approx(2 * b.sum() / (a.sum() + b.sum()))
    assert dice(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    assert lung_box(a) == pytest.approx((0.2, 0.8, 0.15, 0.85))
    # 10% of the lungs' 60 x 70 px box on each side, clipped to the film
    assert lung_box(a, 0.1) == pytest.approx((0.14, 0.86, 0.08, 0.92))
    assert lung_box(a, 1.0) == (0.0, 1.0, 0.0, 1.0)
    assert lung_box(np.zeros((5, 5), bool)) is None


def test_manifest_task_crop_and_intensity_are_validated() -> None:
    base = json.loads(segmenter_manifest().to_json())
    assert parse_manifest(base).task == "segmentation"
    with pytest.raises(ManifestError, match="task"):
        parse_manifest({**base, "task": "detection"})
    with pytest.raises(ManifestError, match="intensity"):
        parse_manifest({**base, "input": {**base["input"], "intensity": "equalise"}})
    with pytest.raises(ManifestError, match="crop_segmenter"):
        parse_manifest({**base, "input": {**base["input"], "crop": "lungs"}})
    spec = parse_manifest({**base, "input": {**base["input"], "crop": "lungs", "crop_margin": 0.1, "crop_segmenter": "lung-segmenter@1.0.0"}}).input
    assert (spec.crop, spec.crop_margin, spec.crop_segmenter) == ("lungs", 0.1, "lung-segmenter@1.0.0")
    # A manifest written before these fields existed reads as before.
    del base["task"], base["input"]["intensity"]
    assert parse_manifest(base).task == "classification" and parse_manifest(base).input.intensity == "fixed"


def test_segmenter_folder_round_trip_is_verified_and_kept_apart_from_classifiers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "lung-segmenter"
    save_segmenter_folder(build_segmenter("unet-resnet18"), segmenter_manifest(), folder)
    loaded = load_segmenter(folder, device="cpu")
    assert loaded.key == "lung-segmenter@1.0.0"
    # Not a model to read films with: neither listed nor loadable as one.
    assert discover_models(tmp_path) == []
    assert [f.manifest.id for f in discover_models(tmp_path, task="segmentation") if f.manifest] == ["lung-segmenter"]
    with pytest.raises(ModelError, match="not a classifier"):
        load_model(folder, device="cpu")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        load_segmenter(folder, device="cpu")


def test_shipped_segmenter_outlines_two_lungs_on_a_real_cr_film(segmenter, dicom_data: Path) -> None:  # type: ignore[no-untyped-def]
    image = read_image(dicom_data / "RG1_UNCR.dcm")  # MONOCHROME1, 15-bit, 1,955 x 1,841 px
    lung = segment_lungs([image.pixels], segmenter)[0]
    assert lung.mask.shape == image.shape and lung.regions == 2
    assert 0.15 < lung.lung_fraction < 0.5
    top, bottom, left, right = lung.box()  # type: ignore[misc]
    assert top < 0.35 and bottom > 0.6 and left < 0.3 and right > 0.7


@pytest.mark.skipif(not MASKS_CSV.is_file(), reason="../shared/data/lung-masks is not available")
def test_shipped_segmenter_reaches_its_dice_at_an_unseen_hospital(segmenter) -> None:  # type: ignore[no-untyped-def]
    """JSRT (a Japanese hospital it never trained on): mean Dice at least 0.92, the issue's floor."""
    from cxr_core.training.segmentation import load_pairs, read_mask_pairs

    pairs = read_mask_pairs(MASKS_CSV, sources=["jsrt"])
    films, truth = load_pairs(pairs)
    masks = segment_lungs(list(films), segmenter)
    scores = [dice(m.mask, t) for m, t in zip(masks, truth)]
    assert len(scores) == 247 and float(np.mean(scores)) >= 0.92


def test_lungs_command_writes_masks_and_reports_bad_files(tmp_path: Path, dicom_data: Path) -> None:
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes((dicom_data / "RG1_UNCR.dcm").read_bytes()[:2000])
    out = tmp_path / "masks"
    env = {"PATH": "/usr/bin:/bin", "CXR_WEIGHTS_DIR": str(SHIPPED.parent), "CXR_VAR_DIR": str(tmp_path / "var")}
    result = subprocess.run(
        [sys.executable, "-m", "cxr_core", "lungs", str(bad), str(dicom_data / "RG1_UNCR.dcm"), "--out-dir", str(out), "--json"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["truncated.dcm", "RG1_UNCR.dcm"]
    assert rows[0]["error"] and rows[0]["mask"] is None
    assert rows[1]["error"] is None and rows[1]["mask"] == str(out / "RG1_UNCR.png")
    mask = np.asarray(Image.open(out / "RG1_UNCR.png"))
    assert mask.shape == read_image(dicom_data / "RG1_UNCR.dcm").shape
    assert set(np.unique(mask)) == {0, 255}
    assert rows[1]["lung_fraction"] == pytest.approx((mask == 255).mean(), abs=1e-4)


def test_standardised_intensity_ignores_brightness_and_contrast_in_training_and_inference() -> None:
    rng = np.random.default_rng(0)
    film = rng.uniform(0.2, 0.8, (64, 64)).astype(np.float32)
    spec = InputSpec(size=(32, 32), intensity="standardise")
    brighter = np.clip(film * 0.6 + 0.3, 0, 1)
    assert torch.allclose(to_input(film, spec), to_input(brighter, spec), atol=1e-4)
    # The trainer's batch path does the same maths as inference.
    small = network_view(film, replace(spec, intensity="fixed"))
    batch = to_network_input(torch.from_numpy(small)[None, None], spec)[0]
    assert torch.allclose(batch, to_input(film, spec), atol=1e-5)


def test_clahe_intensity_is_the_same_in_training_and_inference(dicom_data: Path) -> None:
    """intensity "clahe": the same local-contrast processing before every prediction and every
    training step (the trainer reads a uint8 cache at the input size)."""
    import cv2

    chest_pixels = read_image(dicom_data / "RG1_UNCR.dcm").pixels
    spec = InputSpec(size=(128, 128), intensity="clahe")
    fixed = replace(spec, intensity="fixed")
    as_is = network_view(chest_pixels, fixed)
    cached = torch.from_numpy((as_is * 255 + 0.5).astype(np.uint8))[None, None]
    batch = to_network_input(cached.float() / 255.0, spec)[0]
    assert torch.allclose(batch, to_input(chest_pixels, spec), atol=1e-5)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(cached[0, 0].numpy()) / 255.0
    assert np.allclose(network_view(chest_pixels, spec), expected, atol=1e-6)
    assert not torch.allclose(batch, to_input(chest_pixels, fixed), atol=1e-2)


def test_a_heatmap_of_a_lung_crop_covers_its_box_only() -> None:
    low = np.ones((7, 7), np.float32)
    heatmap = Heatmap("covid", 0.9, low, (100, 200), box=(0.2, 0.8, 0.25, 0.75))
    raw, scaled = heatmap.at((100, 200))
    assert raw[20:80, 50:150].min() == 1.0
    assert raw[:20].max() == 0 and raw[80:].max() == 0 and raw[:, :50].max() == 0 and raw[:, 150:].max() == 0
    assert scaled.max() == pytest.approx(1.0) and scaled[:20].max() == 0


def test_a_lung_crop_model_sees_the_lungs_of_the_installed_segmenter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dicom_data: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(SHIPPED, weights / "lung-segmenter")
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights))
    image = read_image(dicom_data / "RG1_UNCR.dcm")
    key = load_segmenter(SHIPPED).key
    spec = InputSpec(size=(64, 64), crop="lungs", crop_margin=0.1, crop_segmenter=key)
    # The box is found on the segmenter's square view (cheap at any film size), 10% margin.
    box = lung_box(lung_views([image.pixels], load_segmenter(SHIPPED))[0], 0.1)
    assert box is not None
    cropped = network_view(image.pixels, spec)
    whole = network_view(image.pixels, replace(spec, crop="film"))
    by_hand = network_view(crop_box(image.pixels, box), replace(spec, crop="film"))
    assert cropped.shape == (64, 64) and np.allclose(cropped, by_hand) and not np.allclose(cropped, whole)
    # Another segmenter version would draw other boxes: refused, with what to install.
    with pytest.raises(ModelError, match="lung-segmenter@9.9.9"):
        network_view(image.pixels, replace(spec, crop_segmenter="lung-segmenter@9.9.9"))


def test_the_input_check_warns_about_a_film_without_a_plausible_pair_of_lungs(segmenter, dicom_data: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 30: a film without a plausible pair of lungs is at least warned; a real chest film is not."""
    from cxr_core.imaging.gate import WARNING, judge
    from cxr_core.imaging.lungs import implausible_lungs
    from cxr_core.imaging.quality import assess_quality

    chest = read_image(dicom_data / "RG1_UNCR.dcm")
    assert implausible_lungs(lung_views([chest.pixels], segmenter)[0], segmenter) is None
    empty = np.zeros((224, 224), bool)
    assert "no lung field" in (implausible_lungs(empty, segmenter) or "")
    one_lung = np.zeros((224, 224), bool)
    one_lung[50:170, 40:100] = True  # 14% of the frame, as much as many pairs of lungs, but one lung wide
    pair = one_lung.copy()
    pair[50:170, 124:184] = True
    assert implausible_lungs(pair, segmenter) is None
    assert "and 27% of its width" in (implausible_lungs(one_lung, segmenter) or "")
    objection = implausible_lungs(empty, segmenter)
    verdict = judge(chest.metadata, None, None, assess_quality(chest), objection)
    assert verdict.outcome == WARNING and objection in verdict.reasons


def test_training_crops_are_the_crops_inference_draws_and_are_found_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dicom_data: Path) -> None:
    """The training loader caches each film's tight lung box on disk (by file sha256); the
    margin is applied by the one formula inference uses, so the crops are identical."""
    from cxr_core.imaging.preprocess import lung_crop_boxes
    from cxr_core.training.images import LungBoxCache

    weights = tmp_path / "weights"
    shutil.copytree(SHIPPED, weights / "lung-segmenter")
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    film = read_image(dicom_data / "RG1_UNCR.dcm")
    spec = InputSpec(size=(64, 64), crop="lungs", crop_margin=0.1, crop_segmenter=load_segmenter(SHIPPED).key)
    turned = np.ascontiguousarray(np.rot90(film.pixels))
    cache = LungBoxCache(spec.crop_segmenter)
    boxes = cache.boxes([film.pixels, turned], [film.sha256, "0" * 64], spec)
    assert boxes == lung_crop_boxes([film.pixels, turned], spec)
    assert boxes[0] != boxes[1]
    with open(cache.path, "a", encoding="utf-8") as handle:
        handle.write('{"sha256": "cut sho')  # a crash mid-line
    again = LungBoxCache(spec.crop_segmenter)
    assert set(again.known) == {film.sha256, "0" * 64}
    # Found once: a second run reads the boxes without the segmenter (here: none installed).
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path / "empty"))
    assert again.boxes([film.pixels], [film.sha256], spec) == boxes[:1]


def test_train_lungs_with_processing_records_it_in_the_manifest_and_card(tmp_path: Path) -> None:
    from cxr_core.training.segmentation import read_mask_pairs, segmenter_card, train_segmenter

    rng = np.random.default_rng(0)
    (tmp_path / "films").mkdir()
    (tmp_path / "masks").mkdir()
    rows = ["mask,image,source"]
    for i in range(30):
        mask = np.zeros((128, 128), np.uint8)
        top = 20 + int(rng.integers(0, 10))
        mask[top:100, 18:58] = 255
        mask[top:100, 70:110] = 255
        film = np.where(mask > 0, 70, 190).astype(np.uint8) + rng.integers(0, 30, (128, 128)).astype(np.uint8)
        Image.fromarray(film).save(tmp_path / "films" / f"f{i}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"f{i}.png")
        rows.append(f"masks/f{i}.png,films/f{i}.png,site")
    (tmp_path / "masks.csv").write_text("\n".join(rows) + "\n")
    pairs = read_mask_pairs(tmp_path / "masks.csv", image_root=tmp_path)
    with pytest.raises(ValueError, match="probability"):
        train_segmenter(pairs, tmp_path / "bad", epochs=1, processing=1.5)
    run = train_segmenter(pairs, tmp_path / "seg", epochs=1, batch_size=8, processing=0.5, version="9.9.9")
    written = load_segmenter(run.folder, device="cpu")
    assert written.manifest.training["processing"] == 0.5 and written.key == "lung-segmenter@9.9.9"
    assert "another site's processing on the film (CLAHE" in (run.folder / "README.md").read_text()
    plain = replace(written.manifest, training={**written.manifest.training, "processing": 0.0})
    assert "another site's processing" not in segmenter_card(plain)

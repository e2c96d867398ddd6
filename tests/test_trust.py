"""Trust and safety: the OOD gate, abstention, image quality checks, burned-in text."""

from __future__ import annotations

import io
import json
import random
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cxr_core.imaging.annotations import Box, detect_burned_in, mask_boxes
from cxr_core.imaging.chest_space import chest_space
from cxr_core.imaging.film import ImageMetadata, XrayImage
from cxr_core.imaging.gate import ACCEPTED, REJECTED, WARNING, judge, metadata_verdict
from cxr_core.imaging.io import read_image
from cxr_core.imaging.quality import EXPOSURE_ASSET, assess_quality, exposed_field, exposure_range, fix_orientation
from cxr_core.inference import is_uncertain, make_prediction
from cxr_core.models.feature_gate import FeatureGate, fit_feature_gate
from cxr_core.models.manifest import Manifest
from tests.conftest import SHARED_DATA, load_script


def _image(pixels: np.ndarray, **meta: object) -> XrayImage:
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    pixels.setflags(write=False)
    return XrayImage(pixels, ImageMetadata("png", pixels.shape[0], pixels.shape[1], **meta), "0" * 64)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def chest(dicom_data: Path) -> XrayImage:
    return read_image(dicom_data / "RG1_UNCR.dcm")


# --- Metadata rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta, outcome, words",
    [
        (dict(modality="CR", body_part="CHEST", view_position="PA"), ACCEPTED, ""),
        (dict(modality="DX", body_part="THORAX", view_position="AP"), ACCEPTED, ""),
        (dict(modality="CT"), REJECTED, "CT image"),
        (dict(modality="MR"), REJECTED, "MR image"),
        (dict(modality="US"), REJECTED, "ultrasound"),
        (dict(modality="CR", body_part="EXTREMITY"), REJECTED, "EXTREMITY"),
        (dict(modality="DX", body_part="CHEST", view_position="LL"), REJECTED, "lateral"),
        (dict(modality="OT"), WARNING, "does not say this is a radiograph"),
    ],
)
def test_metadata_rules(meta: dict, outcome: str, words: str) -> None:
    verdict, reasons = metadata_verdict(ImageMetadata("dicom", 10, 10, **meta))
    assert verdict == outcome and words in " ".join(reasons)


def test_png_has_no_metadata_opinion() -> None:
    assert metadata_verdict(ImageMetadata("png", 10, 10)) == (ACCEPTED, [])


# --- The feature-space gate ------------------------------------------------------------------------


def test_feature_gate_separates_far_points_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 64))
    labels = rng.integers(0, 3, 600)
    train = centres[labels] + rng.normal(0, 1, (600, 64))
    val = centres[rng.integers(0, 3, 200)] + rng.normal(0, 1, (200, 64))
    gate = fit_feature_gate(train, labels, val, dims=16)
    near = gate.distances(centres[rng.integers(0, 3, 300)] + rng.normal(0, 1, (300, 64)))
    far = gate.distances(rng.normal(0, 5, (100, 64)) + 15)
    assert np.mean(near > gate.reject) < 0.01 and np.mean(near > gate.warn) < 0.05
    assert np.all(far > gate.reject)
    gate.save(tmp_path / "g.safetensors")
    again = FeatureGate.load(tmp_path / "g.safetensors")
    np.testing.assert_allclose(again.distances(val[:5]), gate.distances(val[:5]), rtol=1e-4)
    verdict = judge(ImageMetadata("png", 10, 10), float(far[0]), gate, None)
    assert verdict.outcome == REJECTED and verdict.image_checked


def test_the_feature_distance_alone_warns_about_a_film_that_looks_like_a_chest_film(chest: XrayImage) -> None:
    """Far from the model's training films but a typical chest film to look at (another site's
    processing): warned about, with the reason, not turned away. Far in both: rejected."""
    gate = FeatureGate(np.zeros(4), np.eye(4), np.zeros((1, 4)), np.eye(4), warn=1.0, reject=2.0)
    film = _image(chest.pixels**2.8)  # RG1 at an ordinary exposure: a typical chest film
    quality = assess_quality(film)
    verdict = judge(film.metadata, 2.5, gate, quality)
    assert verdict.outcome == WARNING and "though it looks like a chest film" in " ".join(verdict.reasons), verdict
    assert judge(film.metadata, 1.5, gate, quality).outcome == WARNING
    assert judge(film.metadata, 0.5, gate, quality).outcome == ACCEPTED
    rng = np.random.default_rng(1)
    noise = _image(rng.uniform(0, 1, (256, 256)).astype(np.float32))
    assert judge(noise.metadata, 2.5, gate, assess_quality(noise)).outcome == REJECTED
    # Nothing about its appearance known: the feature distance decides, as before.
    assert judge(film.metadata, 5.0, gate, None).outcome == REJECTED
    # Very far (beyond 1.5 x the rejection distance), or another check objects: rejected.
    assert judge(film.metadata, 3.5, gate, quality).outcome == REJECTED
    assert judge(film.metadata, 2.5, gate, quality, lungs="no plausible pair of lungs").outcome == REJECTED
    small = _image(cv2.resize(film.pixels, (96, 96), interpolation=cv2.INTER_AREA))
    assert judge(small.metadata, 2.5, gate, assess_quality(small)).outcome == REJECTED
    # An unusual appearance that the appearance check only warns about (local-contrast processing
    # does this) still lets a little-far film through with both warnings; a rejected appearance does not.
    space = chest_space()
    assert space is not None and quality.film_distance is not None and quality.film_distance <= space.warn
    unusual = replace(quality, film_distance=(space.warn + space.reject) / 2)
    verdict = judge(film.metadata, 2.5, gate, unusual)
    reasons = " ".join(verdict.reasons)
    assert verdict.outcome == WARNING and "though it looks like a chest film" in reasons and "unlike most chest radiographs" in reasons
    assert judge(film.metadata, 3.5, gate, unusual).outcome == REJECTED
    assert judge(film.metadata, 2.5, gate, replace(quality, film_distance=space.reject * 1.01)).outcome == REJECTED


def test_a_distance_just_past_its_limit_never_reads_as_equal_to_it(chest: XrayImage) -> None:
    from cxr_core.imaging.quality import shown_apart

    assert shown_apart(0.6512, 0.6489, 2) == ("0.651", "0.649")
    assert shown_apart(13.5312, 13.5, 1) == ("13.53", "13.50")
    assert shown_apart(0.7, 0.2, 2) == ("0.70", "0.20")
    gate = FeatureGate(np.zeros(4), np.eye(4), np.zeros((1, 4)), np.eye(4), warn=1.0, reject=2.0)
    reason = " ".join(judge(chest.metadata, 1.004, gate, None).reasons)
    assert "distance 1.004; typical films stay below 1.000" in reason, reason
    # The warning for a chest-like film beyond the feature rejection distance, too.
    film = _image(chest.pixels**2.8)
    reason = " ".join(judge(film.metadata, 2.004, gate, assess_quality(film)).reasons)
    assert "distance 2.004; typical films stay below 1.0, rejected above 2.000)" in reason, reason


def test_a_model_without_a_gate_warns(chest: XrayImage) -> None:
    verdict = judge(chest.metadata, None, None, assess_quality(chest))
    assert verdict.outcome == WARNING and "no feature-space check" in " ".join(verdict.reasons)


# --- Abstention ----------------------------------------------------------------------------------


def _manifest(**fields: object) -> Manifest:
    base = Manifest(id="m", version="1", name="m", architecture="densenet121", classes=("covid", "normal", "viral_pneumonia"), head="softmax", weights_sha256="0" * 64)
    return replace(base, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "probs, uncertain",
    [((0.9, 0.05, 0.05), False), ((0.55, 0.4, 0.05), True), ((0.62, 0.36, 0.02), False), ((0.61, 0.5, 0.0), True), ((0.4, 0.3, 0.3), True)],
)
def test_abstention(probs: tuple[float, ...], uncertain: bool) -> None:
    assert is_uncertain(probs, _manifest()) is uncertain


def test_uncertain_or_rejected_names_no_class() -> None:
    from cxr_core.imaging.gate import GateResult

    unsure = make_prediction(_manifest(), (0.5, 0.45, 0.05))
    assert unsure.uncertain and unsure.predicted is None and unsure.decision == "covid"
    rejected = make_prediction(_manifest(), (0.95, 0.03, 0.02), GateResult(REJECTED, ("CT",)))
    assert rejected.predicted is None and not rejected.uncertain and rejected.gate_outcome == REJECTED
    strict = make_prediction(_manifest(abstention={"min_probability": 0.96}), (0.95, 0.03, 0.02))
    assert strict.uncertain
    binary = _manifest(classes=("covid", "other"), head="sigmoid")
    assert make_prediction(binary, (0.52, 0.48)).uncertain and not make_prediction(binary, (0.9, 0.1)).uncertain


def test_a_threshold_call_is_never_hidden_as_uncertain() -> None:
    """COVID at its sensitivity-first threshold is shown even when another class is more
    probable or the two are close; abstention still applies to the other classes."""
    model = _manifest(thresholds={"covid": 0.24})
    close = make_prediction(model, (0.45, 0.50, 0.05))
    assert close.predicted == "covid" and close.by_threshold and not close.uncertain
    assert close.most_probable == "normal"
    below = make_prediction(model, (0.20, 0.42, 0.38))
    assert below.predicted is None and below.uncertain and not below.by_threshold and below.decision == "normal"
    binary = _manifest(classes=("covid", "other"), head="sigmoid", thresholds={"covid": 0.3})
    assert make_prediction(binary, (0.35, 0.65)).predicted == "covid"
    assert make_prediction(binary, (0.25, 0.75)).predicted == "other"
    assert make_prediction(binary, (0.29, 0.71)).predicted == "other"
    # No manifest threshold: the default 0.5 of a binary head is not a sensitivity choice.
    assert make_prediction(_manifest(classes=("covid", "other"), head="sigmoid"), (0.52, 0.48)).uncertain


# --- Image quality --------------------------------------------------------------------------------


def test_upright_film_passes(chest: XrayImage) -> None:
    """RG1 is upright, sharp enough and whole; only its brightness (its own DICOM window puts
    the median grey at 0.81) is outside the training films' range, and that is all it is told."""
    report = assess_quality(chest)
    assert (report.rotation, report.inverted, report.low_resolution, report.cropped) == (0, False, False, False)
    assert report.exposure == "brighter" and len(report.warnings) == 1 and "median grey 0.81" in report.warnings[0]
    # The same film with a gamma that brings its median grey to about 0.55: nothing to say.
    assert assess_quality(_image(chest.pixels**2.8)).warnings == ()


@pytest.mark.parametrize("value, share", [(1.0, 0.05), (0.0, 0.08), (1.0, 0.2)])
def test_a_framed_film_is_judged_on_its_exposed_field(chest: XrayImage, value: float, share: float) -> None:
    """A collimated CR shows its unexposed border white and an export may pad a film black: the
    frame is trimmed before orientation, polarity, exposure and appearance are judged, so an
    upright film in a white frame is not called rotated and inverted (it was before)."""
    film = chest.pixels**2.8  # RG1 at an ordinary exposure (see test_upright_film_passes)
    h, w = film.shape
    t, s = int(share * h), int(share * w)
    framed = np.full((h + 2 * t, w + 2 * s), value, np.float32)
    framed[t : t + h, s : s + w] = film
    field = exposed_field(framed)
    assert abs(field.shape[0] - exposed_field(film).shape[0]) <= 8 and abs(field.shape[1] - exposed_field(film).shape[1]) <= 8
    report, plain = assess_quality(_image(framed)), assess_quality(_image(film))
    assert (report.rotation, report.inverted, report.exposure) == (0, False, None)
    assert report.median_grey == pytest.approx(plain.median_grey, abs=0.02)
    assert report.film_distance == pytest.approx(plain.film_distance, abs=0.05)


def test_the_exposed_field_keeps_a_film_without_a_frame_and_a_blank_frame_whole(chest: XrayImage) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.uniform(0.2, 0.8, (300, 240)).astype(np.float32)
    assert exposed_field(noisy).shape == (300, 240)
    assert exposed_field(np.full((300, 240), 0.9, np.float32)).shape == (300, 240)
    # At most 30% of a side goes: a film mostly frame is not cut down to nothing.
    mostly = np.zeros((1000, 1000), np.float32)
    mostly[450:550, 450:550] = rng.uniform(0, 1, (100, 100))
    assert exposed_field(mostly).shape == (400, 400)


def test_exposure_is_judged_against_the_training_films(chest: XrayImage) -> None:
    lo, hi = exposure_range()
    assert 0.1 < lo < 0.4 < 0.6 < hi < 0.9
    # RG1's median grey is 0.81; these gammas take it to about 0.81, 0.56 and 0.19.
    for gamma, side in ((1.0, "brighter"), (2.8, None), (8.0, "darker")):
        report = assess_quality(_image(chest.pixels**gamma))
        assert not report.inverted and report.exposure == side, (gamma, report.median_grey)
        assert any(f"is {side} overall" in w for w in report.warnings) == (side is not None)
    # A blank frame is rejected for being blank; its brightness adds nothing.
    assert assess_quality(_image(np.full((400, 400), 0.95, np.float32))).exposure is None


def test_strong_local_contrast_processing_is_named(chest: XrayImage) -> None:
    """CLAHE-type processing, which the models read as COVID-19, is warned about; the film as it
    comes, brighter or darker, is not."""
    film = _image(chest.pixels**2.8)
    plain = assess_quality(film)
    assert not plain.processed and not any("local contrast" in w for w in plain.warnings), plain.local_contrast
    u8 = (film.pixels * 255 + 0.5).astype(np.uint8)
    processed = assess_quality(_image(cv2.createCLAHE(clipLimit=4.0, tileGridSize=(8, 8)).apply(u8).astype(np.float32) / 255))
    assert processed.processed and processed.local_contrast > plain.local_contrast
    assert any("strongly processed for local contrast" in w for w in processed.warnings)
    verdict = judge(film.metadata, None, None, processed)
    assert verdict.outcome == WARNING and any("read a COVID-19 call with particular care" in r for r in verdict.reasons)


def test_contrast_stretch_spans_the_range_and_says_so(chest: XrayImage) -> None:
    from cxr_core.study import STRETCH_NOTE, contrast_stretched

    stretched = contrast_stretched(chest)
    lo, hi = np.percentile(chest.pixels[::4, ::4], [0.5, 99.5])
    expected = np.clip((chest.pixels - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(stretched.pixels, expected, atol=1e-5)
    assert stretched.sha256 == chest.sha256 and stretched.warnings[-1] == STRETCH_NOTE and not stretched.pixels.flags.writeable
    assert chest.pixels.min() > 0.1  # the original is untouched (RG1's darkest pixels stay ~0.2)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/cxr is not present")
def test_exposure_range_is_measured_from_the_training_films(tmp_path: Path) -> None:
    """The shipped range is what scripts/measure_exposure.py measures on the shared data, and it
    warns on few films like the training ones."""
    measured = load_script("measure_exposure").measure(SHARED_DATA)
    shipped = json.loads(EXPOSURE_ASSET.read_text())
    assert measured["range"] == shipped["range"] and measured["outside_range"] == shipped["outside_range"]
    assert measured["local_contrast"] == shipped["local_contrast"]
    contrast = shipped["local_contrast"]["above"]["test"]
    assert contrast["above"] / contrast["n"] <= 0.02
    test = shipped["outside_range"]["test"]
    assert (test["darker"] + test["brighter"]) / test["n"] <= 0.02


@pytest.mark.parametrize("k, invert", [(1, False), (2, False), (3, False), (0, True), (2, True)])
def test_rotation_and_polarity_are_detected_and_fixed(chest: XrayImage, k: int, invert: bool) -> None:
    pixels = np.rot90(chest.pixels, k)
    spoiled = _image(1.0 - pixels if invert else pixels)
    report = assess_quality(spoiled)
    assert (report.rotation, report.inverted) == (k, invert) and report.fixable and report.warnings
    # Inverted, RG1's median grey is 0.19 ("darker"); that is the inversion speaking, so only
    # the inversion is reported, and the film's exposure is judged once it is corrected.
    assert report.exposure == (None if invert else "brighter")
    fixed = fix_orientation(spoiled, report)
    np.testing.assert_allclose(fixed.pixels, chest.pixels, atol=1e-6)
    assert "Corrected by the user" in fixed.warnings[-1]


def test_low_resolution_and_cropping() -> None:
    film = cv2.resize(np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1)), (120, 120))
    assert assess_quality(_image(film)).low_resolution
    assert assess_quality(_image(np.zeros((300, 900), np.float32))).cropped


def _document() -> np.ndarray:
    page = np.ones((800, 600), np.uint8) * 255
    for line in range(28):
        cv2.putText(page, "Report: findings within normal limits " + str(line), (30, 40 + 26 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 0, 1)
    return page.astype(np.float32) / 255


def _as_png(image: XrayImage) -> XrayImage:
    """The same pixels with no DICOM header: only the image-based checks can judge it."""
    return replace(image, metadata=ImageMetadata("png", image.metadata.rows, image.metadata.columns))


def test_appearance_check_without_any_header(chest: XrayImage, dicom_data: Path, dicom_tests: Path) -> None:
    """With no metadata and no model, the chest CR passes while an extremity radiograph, an
    MR slice, a document and a blank frame do not; a rotated chest film is turned away with
    the hint to correct it, and passes once corrected."""
    from cxr_core.imaging.chest_space import chest_space

    space = chest_space()
    assert space is not None and 0 < space.warn <= space.reject
    verdict = judge(_as_png(chest).metadata, None, None, assess_quality(chest))
    assert not any("does not look like" in r or "unlike most" in r or "uniform" in r for r in verdict.reasons), verdict
    for name in ("RG3_UNCR.dcm", "MR2_UNCR.dcm"):
        image = _as_png(read_image(dicom_data / name))
        verdict = judge(image.metadata, None, None, assess_quality(image))
        assert verdict.outcome == REJECTED and "does not look like a chest radiograph" in " ".join(verdict.reasons), (name, verdict)
    for pixels, words in ((_document(), "does not look like a chest radiograph"), (np.full((512, 512), 0.5, np.float32), "almost uniform")):
        verdict = judge(ImageMetadata("png", *pixels.shape), None, None, assess_quality(_image(pixels)))
        assert verdict.outcome == REJECTED and words in " ".join(verdict.reasons)
    turned = _image(np.rot90(chest.pixels, 1))
    report = assess_quality(turned)
    verdict = judge(turned.metadata, None, None, report)
    assert verdict.outcome == REJECTED and "correct the film" in " ".join(verdict.reasons) and verdict.correctable
    fixed = fix_orientation(turned, report)
    assert assess_quality(fixed).film_distance <= space.warn


def test_a_rejected_mr_is_not_asked_chest_film_questions(dicom_data: Path) -> None:
    """Issue 33: an MR slice rejected by its header is not also told it "looks rotated" or
    "inverted", nor offered a correction; quality checks are for films that passed the gate."""
    image = read_image(dicom_data / "MR2_UNCR.dcm")
    report = assess_quality(image)
    assert report.warnings  # the quality check alone would have had something to say
    verdict = judge(image.metadata, None, None, report)
    assert verdict.outcome == REJECTED and not verdict.correctable
    assert not any(w in verdict.reasons for w in report.warnings)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/cxr is not present")
def test_appearance_check_keeps_chest_films() -> None:
    """On a spread sample of the shared test split, at most 1% of films are rejected by
    appearance (the whole split measured: scripts/measure_gate.py)."""
    from cxr_core.imaging.chest_space import chest_space

    space = chest_space()
    files = sorted(SHARED_DATA.glob("test/*/*.jpg"))[::4]
    distances = np.array([assess_quality(read_image(p)).film_distance for p in files])
    assert (distances > space.reject).mean() <= 0.01 and (distances > space.warn).mean() <= 0.05


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/cxr is not present")
def test_orientation_on_shared_test_films() -> None:
    random.seed(0)
    files = random.sample(sorted(SHARED_DATA.glob("test/*/*.jpg")), 150)
    false_alarms = detected = 0
    for path in files:
        image = read_image(path)
        false_alarms += assess_quality(image).fixable
        k, invert = random.choice([(1, False), (2, False), (3, False), (0, True), (1, True)])
        pixels = np.rot90(image.pixels, k)
        report = assess_quality(_image(1 - pixels if invert else pixels))
        detected += (report.rotation, report.inverted) == (k, invert)
    assert false_alarms / len(files) <= 0.05 and detected / len(files) >= 0.9, (false_alarms, detected)


# --- Burned-in text -----------------------------------------------------------------------------


def _with_text(base: np.ndarray, rng: random.Random, n: int = 2) -> tuple[np.ndarray, list[Box]]:
    """White words where white is visible (the field under them is dark), as scanners
    burn them in; a CR plate's bright unexposed border gets none (see the dark-text test)."""
    img = (np.clip(cv2.resize(base, (1024, 1024)), 0, 1) * 255).astype(np.uint8)
    truth: list[Box] = []
    while len(truth) < n:
        word = rng.choice(["L", "R", "AP", "PORTABLE", "SUPINE", "ERECT", "D"])
        scale = rng.uniform(1.0, 2.5)
        thick = max(2, int(scale * 2))
        (tw, th), base_line = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        x = rng.choice([rng.randint(10, 200), rng.randint(1024 - 200 - tw, 1024 - tw - 10)])
        y = rng.choice([rng.randint(th + 10, 200), rng.randint(800, 1000)])
        if img[y - th : y + base_line, x : x + tw].mean() > 150:
            continue
        cv2.putText(img, word, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
        truth.append(Box(x, y - th, tw, th + base_line))
    return img.astype(np.float32) / 255.0, truth


def test_dark_text_on_a_bright_label_is_found(chest: XrayImage) -> None:
    """Black words on a white label or on the bright border of a CR plate (RG1's is)."""
    img = (np.clip(cv2.resize(chest.pixels, (1024, 1024)), 0, 1) * 255).astype(np.uint8)
    truth = []
    for word, (x, y) in (("SUPINE", (620, 90)), ("PA", (60, 980))):
        (tw, th), base_line = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, 1.6, 4)
        cv2.rectangle(img, (x - 12, y - th - 12), (x + tw + 12, y + base_line + 12), 245, -1)  # the label
        cv2.putText(img, word, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.6, 0, 4, cv2.LINE_AA)
        truth.append(Box(x, y - th, tw, th + base_line))
    boxes = detect_burned_in(img.astype(np.float32) / 255.0)
    assert all(_found(t, boxes) for t in truth), boxes


def _found(truth: Box, boxes: tuple[Box, ...]) -> bool:
    cx, cy = truth.x + truth.width / 2, truth.y + truth.height / 2
    return any(truth.iou(b) > 0.3 or (b.x <= cx <= b.x + b.width and b.y <= cy <= b.y + b.height) for b in boxes)


def test_text_detection_recall_on_rendered_text(chest: XrayImage) -> None:
    rng = random.Random(0)
    bases = [chest.pixels, np.rot90(chest.pixels, 0)[::-1].copy()]  # the film and its vertical mirror
    if SHARED_DATA.exists():
        bases += [read_image(p).pixels for p in sorted(SHARED_DATA.glob("test/normal/*.jpg"))[:20]]
    hits = total = 0
    for base in bases:
        for _ in range(3):
            film, truth = _with_text(base, rng)
            boxes = detect_burned_in(film)
            hits += sum(_found(t, boxes) for t in truth)
            total += len(truth)
    assert hits / total >= 0.8, f"recall {hits}/{total}"


def test_masking_removes_the_text(chest: XrayImage) -> None:
    film, truth = _with_text(chest.pixels, random.Random(3), n=2)
    boxes = detect_burned_in(film)
    masked = mask_boxes(film, boxes)
    assert masked.shape == film.shape and masked.dtype == np.float32
    after = detect_burned_in(masked)
    assert sum(_found(t, after) for t in truth) < sum(_found(t, boxes) for t in truth)
    found = [t for t in truth if _found(t, boxes)]
    assert found
    for t in found:
        assert masked[t.y : t.y + t.height, t.x : t.x + t.width].max() < 0.99  # the white strokes are gone


def test_clean_film_has_few_boxes(chest: XrayImage) -> None:
    assert len(detect_burned_in(chest.pixels)) <= 3


# --- The command line reports the gate ---------------------------------------------------------


def test_cli_reports_gate_and_uncertainty(use_weights: Path, dicom_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxr_core.cli import main

    assert main(["predict", str(dicom_data / "RG1_UNCR.dcm"), str(dicom_data / "693_UNCR.dcm"), "--json"]) == 0
    chest_row, ct_row = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert {"gate", "uncertain", "gate_reasons"} <= set(chest_row)
    assert chest_row["gate"] in (ACCEPTED, WARNING)
    assert ct_row["gate"] == REJECTED and ct_row["prediction"] is None and ct_row["probabilities"] == {}
    assert any("CT image" in r for r in ct_row["gate_reasons"])


def test_png_roundtrip_keeps_pixels_for_metadata_free_checks(chest: XrayImage) -> None:
    buffer = io.BytesIO()
    Image.fromarray(chest.to_uint8()).save(buffer, format="PNG")
    again = read_image(buffer.getvalue())
    assert again.metadata.modality is None and metadata_verdict(again.metadata)[0] == ACCEPTED


def test_training_can_mask_text_and_the_model_then_always_masks(chest: XrayImage, tmp_path: Path) -> None:
    import dataclasses

    from PIL import Image

    from cxr_core.imaging.preprocess import mask_burned_in, to_input
    from cxr_core.models.manifest import InputSpec
    from cxr_core.training.dataset import LabelPlan
    from cxr_core.training.prepare import prepare_data

    rng = random.Random(11)
    truths: dict[str, list[Box]] = {}
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("covid", "normal"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                film, truth = _with_text(chest.pixels, rng)
                Image.fromarray((film * 255).astype(np.uint8)).save(folder / f"{i}.png")
                truths[f"{split}/{cls}/{i}.png"] = truth
    plan = LabelPlan.multiclass(("covid", "normal"))
    plain = prepare_data(tmp_path / "data", plan, 256, near_duplicate_correlation=1.01)
    masked = prepare_data(tmp_path / "data", plan, 256, near_duplicate_correlation=1.01, mask_text=True)
    assert any("masked" in note for note in masked.report.notes) and not any("masked" in n for n in plain.report.notes)
    whiter = 0
    for a, b, record in zip(plain.train.pixels, masked.train.pixels, plain.train.records):
        for t in truths[Path(record.path).relative_to(tmp_path / "data").as_posix()]:
            s = 256 / 1024
            y0, y1, x0, x1 = int(t.y * s), int((t.y + t.height) * s) + 1, int(t.x * s), int((t.x + t.width) * s) + 1
            whiter += int(a[y0:y1, x0:x1].max()) > int(b[y0:y1, x0:x1].max()) + 20
    assert whiter >= 6  # of 12 rendered words, most lost their white strokes

    # Inference on a model trained so masks too: same tensor as masking by hand first.
    film, _ = _with_text(chest.pixels, random.Random(5))
    spec = InputSpec(size=(128, 128))
    assert torch.equal(to_input(film, dataclasses.replace(spec, mask_burned_in=True)), to_input(mask_burned_in(film), spec))
    assert not torch.equal(to_input(film, dataclasses.replace(spec, mask_burned_in=True)), to_input(film, spec))


def test_manifest_mask_flag_round_trips_and_is_checked(tmp_path: Path) -> None:
    import dataclasses
    import json

    from cxr_core.errors import ManifestError
    from cxr_core.models.manifest import read_manifest
    from tests.conftest import make_model_folder

    folder = make_model_folder(tmp_path, "densenet121", ("covid", "normal", "viral_pneumonia"), size=64)
    data = json.loads((folder / "manifest.json").read_text())
    data["input"]["mask_burned_in"] = True
    (folder / "manifest.json").write_text(json.dumps(data))
    manifest = read_manifest(folder)
    assert manifest.input.mask_burned_in and dataclasses.asdict(manifest.input)["mask_burned_in"] is True
    data["input"]["mask_burned_in"] = "yes"
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="mask_burned_in"):
        read_manifest(folder)


def test_rib_like_bars_on_the_lungs_are_not_text_but_a_saturated_marker_there_is(chest: XrayImage) -> None:
    """A graded bright bar on the lung field is a rib seen end-on (the old detector boxed
    them on most paediatric films); a marker drawn at full white on the lung still counts."""
    from cxr_core.imaging.lungs import lung_field

    img = np.clip(cv2.resize(chest.pixels, (1024, 1024)), 0, 1).astype(np.float32)
    lungs = lung_field(img.shape)
    ys, xs = np.nonzero(cv2.erode(lungs.astype(np.uint8), np.ones((61, 61), np.uint8)))  # well inside
    bars = np.zeros_like(img)
    spots = [(int(xs[i]), int(ys[i])) for i in np.linspace(0, len(xs) - 1, 8).astype(int)]
    for x, y in spots:
        cv2.ellipse(bars, (x, y), (28, 9), 20, 0, 360, 0.3, -1)
    bars = cv2.GaussianBlur(bars, (0, 0), 2)
    ribbed = np.clip(img + bars, 0, 0.9)  # graded, never at the end of the grey scale
    assert not [b for b in detect_burned_in(ribbed) if lungs[b.y + b.height // 2, b.x + b.width // 2]]

    marked = (ribbed * 255).astype(np.uint8)
    x, y = spots[3]
    (tw, th), base_line = cv2.getTextSize("R", cv2.FONT_HERSHEY_SIMPLEX, 2.0, 5)
    cv2.putText(marked, "R", (x - tw // 2, y + th // 2), cv2.FONT_HERSHEY_SIMPLEX, 2.0, 255, 5, cv2.LINE_AA)
    truth = Box(x - tw // 2, y - th // 2, tw, th + base_line)
    assert _found(truth, detect_burned_in(marked.astype(np.float32) / 255.0))


def test_a_large_near_white_marker_on_the_body_edge_is_found(chest: XrayImage) -> None:
    """A big "R" burned in near white (248 of 255: not saturated) across the edge between
    air and the shoulder, so its surround is not flat: the kind the detector missed on
    Kermany films (too tall for the old size limit, and neither flat-field nor saturated)."""
    img = (np.clip(cv2.resize(chest.pixels, (1024, 1024)), 0, 1) * 255).astype(np.float32)
    edge = np.where(np.arange(340) < 170, 60.0, 170.0).astype(np.float32)
    img[20:360, 20:360] = cv2.GaussianBlur(np.tile(edge, (340, 1)), (0, 0), 6)
    marked = img.astype(np.uint8)
    (tw, th), base_line = cv2.getTextSize("R", cv2.FONT_HERSHEY_SIMPLEX, 6.0, 14)
    cv2.putText(marked, "R", (110, 60 + th), cv2.FONT_HERSHEY_SIMPLEX, 6.0, 248, 14, cv2.LINE_AA)
    truth = Box(110, 60, tw, th + base_line)
    assert th > 120  # taller than the old size limit (60 px at the 512 px working size)
    assert _found(truth, detect_burned_in(marked.astype(np.float32) / 255.0))


def test_a_threshold_call_reads_as_a_flag_beside_the_most_probable_class() -> None:
    """Issue 33: "COVID-19 (p = 0.298)" beside "most probable: Normal" was easy to misread."""
    from cxr_core.inference import call_headline

    manifest = _manifest(thresholds={"covid": 0.2}, class_labels={"covid": "COVID-19", "normal": "Normal"})
    flagged = make_prediction(manifest, (0.30, 0.68, 0.02))
    assert flagged.predicted == "covid" and flagged.by_threshold
    text = call_headline(flagged, manifest)
    assert text.startswith("**Prediction: COVID-19 flagged for review** (p = 0.30, at or above its threshold 0.20")
    assert "most probable: **Normal** (p = 0.68)" in text
    plain = make_prediction(manifest, (0.02, 0.96, 0.02))
    assert call_headline(plain, manifest) == "**Prediction: Normal** (p = 0.960)"

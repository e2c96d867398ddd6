"""Explanations: shapes and ranges, equality with the library's slow per-class CAM, safety."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM

from cxr_core.errors import ExplanationError
from cxr_core.explain.cam import CAM_METHODS, class_targets, compute_raw_cams, explain, resize_maps, scale_minmax
from cxr_core.imaging.io import read_image
from cxr_core.imaging.preprocess import to_input
from cxr_core.models.loading import LoadedModel, load_model
from tests.conftest import make_model_folder

LIBRARY = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}


@pytest.fixture(scope="module")
def chest(dicom_data: Path):  # type: ignore[no-untyped-def]
    return read_image(dicom_data / "RG1_J2KR.dcm")


def library_cam(model: LoadedModel, batch: torch.Tensor, method: str, cls: str) -> np.ndarray:
    """pytorch-grad-cam the documented slow way: whole network, one class at a time."""
    network = copy.deepcopy(model.network).requires_grad_(True)
    layer = network.get_submodule(model.manifest.cam_target_layers[0])
    with LIBRARY[method](model=network, target_layers=[layer]) as cam:
        return cam(input_tensor=batch, targets=class_targets(model.manifest, [cls]))[0]


@pytest.mark.parametrize("method", sorted(LIBRARY))
@pytest.mark.parametrize("which", ["densenet", "resnet"])
def test_all_class_cam_equals_library_per_class(request, chest, method: str, which: str) -> None:  # type: ignore[no-untyped-def]
    model: LoadedModel = request.getfixturevalue(which)
    batch = to_input(chest.pixels, model.manifest.input).unsqueeze(0)
    classes = list(model.manifest.classes)
    raw, _ = compute_raw_cams(model, batch, method, classes)
    ours = scale_minmax(resize_maps(raw, tuple(batch.shape[-2:])))
    informative = 0
    for i, cls in enumerate(classes):
        reference = library_cam(model, batch, method, cls)
        np.testing.assert_allclose(ours[i], reference, atol=2e-3, err_msg=f"{method} {cls}")
        informative += int(reference.max() > 0.5)
    assert informative >= 1  # at least one map is not flat, so the comparison means something


def test_explanation_shapes_and_ranges(densenet, chest) -> None:  # type: ignore[no-untyped-def]
    explanation = explain(densenet, chest)
    assert explanation.model == "densenet121-test@0.0.1" and explanation.layer == "backbone.norm5"
    assert [h.target for h in explanation.heatmaps] == ["covid", "normal", "viral_pneumonia"]
    for heatmap in explanation.heatmaps:
        assert heatmap.raw.shape == heatmap.scaled.shape == chest.shape
        assert heatmap.raw.dtype == np.float32 and heatmap.raw.min() >= 0
        assert heatmap.scaled.min() >= 0 and heatmap.scaled.max() <= 1.0 + 1e-6
        assert heatmap.probability == explanation.prediction.probability(heatmap.target)
    assert abs(sum(explanation.prediction.probabilities) - 1) < 1e-6


def test_explanation_prediction_matches_plain_prediction(densenet, chest) -> None:  # type: ignore[no-untyped-def]
    from cxr_core.inference import predict

    plain = predict(densenet, [chest])[0]
    np.testing.assert_allclose(explain(densenet, chest).prediction.probabilities, plain.probabilities, atol=1e-5)


def test_raw_maps_keep_relative_strength(resnet, chest) -> None:  # type: ignore[no-untyped-def]
    # Binary head: the complement's Grad-CAM is the negated map, so after ReLU the two
    # raw maps cannot both be positive at the same place.
    explanation = explain(resnet, chest, method="gradcam")
    covid, other = (h.raw for h in explanation.heatmaps)
    assert float((np.minimum(covid, other) > 1e-6).mean()) < 0.05


def test_single_target_and_unknown_target(densenet, chest) -> None:  # type: ignore[no-untyped-def]
    explanation = explain(densenet, chest, targets=["normal"])
    assert [h.target for h in explanation.heatmaps] == ["normal"]
    with pytest.raises(ExplanationError, match="no class 'flu'"):
        explain(densenet, chest, targets=["flu"])
    with pytest.raises(ExplanationError, match="Unknown CAM method"):
        explain(densenet, chest, method="magic")


@pytest.mark.parametrize("which", ["densenet", "resnet"])
def test_every_depth_stage_gives_a_map(request, chest, which: str) -> None:  # type: ignore[no-untyped-def]
    from cxr_core.models.architectures import get_architecture

    model: LoadedModel = request.getfixturevalue(which)
    for layer in get_architecture(model.manifest.architecture).stage_layers:
        explanation = explain(model, chest, layer=layer, targets=[model.manifest.classes[0]])
        heatmap = explanation.heatmaps[0]
        assert explanation.layer == layer and heatmap.raw.shape == chest.shape
        assert np.isfinite(heatmap.raw).all()


def test_stage_layer_agrees_with_library(densenet, chest) -> None:  # type: ignore[no-untyped-def]
    """The full-network path on an inner layer matches pytorch-grad-cam too."""
    layer = "backbone.denseblock3"
    batch = to_input(chest.pixels, densenet.manifest.input).unsqueeze(0)
    raw, _ = compute_raw_cams(densenet, batch, "gradcam", ["covid", "normal"], layer=layer)
    ours = scale_minmax(resize_maps(raw, tuple(batch.shape[-2:])))
    network = copy.deepcopy(densenet.network).requires_grad_(True)
    with GradCAM(model=network, target_layers=[network.get_submodule(layer)]) as cam:
        for i, cls in enumerate(["covid", "normal"]):
            reference = cam(input_tensor=batch, targets=class_targets(densenet.manifest, [cls]))[0]
            np.testing.assert_allclose(ours[i], reference, atol=2e-3)


def test_score_cam_shares_masks_across_classes_and_matches_library(tmp_path: Path, chest, tiny_arch: str) -> None:  # type: ignore[no-untyped-def]
    folder = make_model_folder(tmp_path, tiny_arch, ("covid", "normal", "viral_pneumonia"), size=32, seed=3)
    model = load_model(folder, device="cpu")
    batch = to_input(chest.pixels, model.manifest.input).unsqueeze(0)
    seen: list[float] = []
    raw, _ = compute_raw_cams(model, batch, "scorecam", list(model.manifest.classes), progress=seen.append)
    assert raw.shape == (3, 8, 8)
    ours = scale_minmax(resize_maps(raw, (32, 32)))
    # One pass of masks serves all three classes: 64 channels / 32 per batch = 2 reports, not 6.
    assert seen == [0.5, 1.0]
    network = copy.deepcopy(model.network)
    layer = network.get_submodule("backbone.2")
    for i, cls in enumerate(model.manifest.classes):
        with ScoreCAM(model=network, target_layers=[layer]) as cam:
            reference = cam(input_tensor=batch, targets=class_targets(model.manifest, [cls]))[0]
        assert reference.max() > 0.5
        np.testing.assert_allclose(ours[i], reference, atol=2e-3)


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_hooks_are_released_even_on_error(densenet, chest) -> None:  # type: ignore[no-untyped-def]
    before = _hook_count(densenet.network)
    explain(densenet, chest, layer="backbone.denseblock2", targets=["covid"])
    explain(densenet, chest, method="eigencam")
    with pytest.raises(ExplanationError):
        explain(densenet, chest, layer="backbone.does_not_exist")
    assert _hook_count(densenet.network) == before == 0


def test_concurrent_explanations_do_not_mix(densenet, chest) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    films = [chest] + [
        read_image(__import__("tests.test_inference", fromlist=["_png"])._png(rng.random((160, 128), dtype=np.float32)))
        for _ in range(3)
    ]
    layers = [None, "backbone.denseblock3", None, "backbone.denseblock3"]
    serial = [explain(densenet, f, layer=layer).heatmaps[0].raw for f, layer in zip(films, layers)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(2):
            results[i] = explain(densenet, films[i], layer=layers[i]).heatmaps[0].raw

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(films))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):
        np.testing.assert_allclose(results[i], expected, atol=1e-5)


def test_method_table_covers_the_required_methods() -> None:
    assert {"gradcam", "gradcam++", "hirescam", "scorecam", "eigencam", "layercam"} <= set(CAM_METHODS)

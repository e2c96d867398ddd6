"""Model folders: manifest validation, checksum and head checks, discovery, devices, registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cxr_core.errors import (
    ChecksumMismatchError,
    HeadMismatchError,
    ManifestError,
    ModelError,
    ModelNotFoundError,
    NoModelInstalledError,
    UnknownArchitectureError,
)
from cxr_core.fileio import sha256_file
from cxr_core.models import architectures as registry
from cxr_core.models.loading import discover_models, load_model, resolve_model, select_device
from cxr_core.models.manifest import MANIFEST_NAME, read_manifest
from tests.conftest import make_model_folder


@pytest.fixture()
def model_copy(weights_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "densenet121-test"
    shutil.copytree(weights_root / "densenet121-test", folder)
    return folder


def edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_written_folder_is_complete_and_verifiable(weights_root: Path) -> None:
    folder = weights_root / "densenet121-test"
    manifest = read_manifest(folder)
    assert manifest.weights_sha256 == sha256_file(folder / "model.safetensors")
    assert manifest.cam_target_layers == ("backbone.norm5",)
    assert manifest.classes == ("covid", "normal", "viral_pneumonia") and manifest.head == "softmax"
    assert manifest.input.size == (128, 128) and manifest.created
    # Stored in half precision: about 2 bytes per parameter.
    params = sum(p.numel() for p in registry.build_network("densenet121", 3).parameters())
    assert (folder / "model.safetensors").stat().st_size < params * 2.2


def test_loaded_model_is_inference_only(densenet) -> None:  # type: ignore[no-untyped-def]
    assert not densenet.network.training
    assert not any(p.requires_grad for p in densenet.network.parameters())
    assert densenet.key == "densenet121-test@0.0.1"


def test_tampered_weights_are_refused(model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="does not match its manifest"):
        load_model(model_copy)


def test_wrong_class_count_is_refused(model_copy: Path) -> None:
    edit_manifest(model_copy, classes=["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"])
    with pytest.raises(HeadMismatchError, match="3 output"):
        load_model(model_copy)


def test_binary_manifest_on_a_three_way_head_is_refused(model_copy: Path) -> None:
    edit_manifest(model_copy, classes=["covid", "other"], head="sigmoid")
    with pytest.raises(HeadMismatchError):
        load_model(model_copy)


def test_unknown_architecture(model_copy: Path) -> None:
    edit_manifest(model_copy, architecture="alexnet9000")
    with pytest.raises(UnknownArchitectureError, match="alexnet9000"):
        load_model(model_copy)


def test_weights_of_another_architecture(model_copy: Path, weights_root: Path) -> None:
    shutil.copy(weights_root / "resnet50-test" / "model.safetensors", model_copy / "model.safetensors")
    edit_manifest(model_copy, weights_sha256=sha256_file(model_copy / "model.safetensors"), classes=["covid", "other"], head="sigmoid")
    with pytest.raises(ModelError, match="do not fit architecture densenet121"):
        load_model(model_copy)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"classes": ["covid"]}, "at least two"),
        ({"classes": ["a", "a", "b"]}, "duplicates"),
        ({"head": "relu"}, "head must be"),
        ({"weights_sha256": "abc"}, "sha256"),
        ({"thresholds": {"covid": 1.5}}, "thresholds"),
        ({"thresholds": {"flu": 0.5}}, "thresholds"),
        ({"temperature": -1}, "temperature"),
        ({"input": {"channels": 2}}, "channels"),
        ({"weights_file": "../../etc/passwd.safetensors"}, "weights_file"),
        ({"weights_file": "model.pt"}, "weights_file"),
        ({"id": "../escape"}, "not a valid folder name"),
        ({"schema_version": 99}, "schema_version"),
    ],
)
def test_manifest_validation(model_copy: Path, changes: dict, message: str) -> None:
    edit_manifest(model_copy, **changes)
    with pytest.raises(ManifestError, match=message):
        read_manifest(model_copy)


def test_missing_field_and_bad_json(model_copy: Path) -> None:
    data = json.loads((model_copy / MANIFEST_NAME).read_text())
    del data["architecture"]
    (model_copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="'architecture' is missing"):
        read_manifest(model_copy)
    (model_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(model_copy)


def test_bad_cam_layer(model_copy: Path) -> None:
    edit_manifest(model_copy, cam_target_layers=["backbone.nope"])
    with pytest.raises(ManifestError, match="backbone.nope"):
        load_model(model_copy)


def test_discovery_reports_broken_folders(weights_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "weights"
    shutil.copytree(weights_root, root)
    (root / "broken").mkdir()
    (root / "broken" / MANIFEST_NAME).write_text("[]")
    shutil.copytree(root / "resnet50-test", root / "zz-duplicate")
    (root / "densenet121-test" / "model.safetensors").rename(root / "densenet121-test" / "gone.safetensors")
    (root / "not-a-model").mkdir()
    found = {f.path.name: f for f in discover_models(root)}
    assert set(found) == {"broken", "densenet121-test", "resnet50-test", "zz-duplicate"}
    assert found["resnet50-test"].ok
    assert not found["broken"].ok and "JSON object" in (found["broken"].problem or "")
    assert "missing" in (found["densenet121-test"].problem or "")
    assert "already provides" in (found["zz-duplicate"].problem or "")


def test_resolve_model(weights_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_DEFAULT_MODEL", raising=False)
    assert resolve_model(None, weights_root).path.name == "densenet121-test"
    assert resolve_model("resnet50-test", weights_root).manifest.head == "sigmoid"  # type: ignore[union-attr]
    assert resolve_model("resnet50-test@0.0.1", weights_root).ok
    with pytest.raises(ModelNotFoundError, match="Installed: densenet121-test@0.0.1"):
        resolve_model("resnet50-test@9", weights_root)
    monkeypatch.setenv("CXR_DEFAULT_MODEL", "resnet50-test")
    assert resolve_model(None, weights_root).path.name == "resnet50-test"
    with pytest.raises(NoModelInstalledError, match="No trained model is installed"):
        resolve_model(None, tmp_path / "empty")


def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    monkeypatch.setenv("CXR_DEVICE", "cpu")
    assert select_device().type == "cpu"
    if not torch.cuda.is_available():
        monkeypatch.setenv("CXR_DEVICE", "cuda")
        with pytest.raises(ModelError, match="CUDA is not available"):
            select_device()
    monkeypatch.setenv("CXR_DEVICE", "warp-drive")
    with pytest.raises(ModelError, match="not a valid device"):
        select_device()


def test_registry_declares_both_product_architectures() -> None:
    for name, channels in (("densenet121", 1024), ("resnet50", 2048)):
        arch = registry.get_architecture(name)
        net = registry.build_network(name, 3)
        for layer in arch.stage_layers:
            net.get_submodule(layer)  # every declared stage resolves
        with torch.no_grad():
            features = net.backbone(torch.zeros(1, 3, 64, 64))
        assert features.shape[1] == channels
    one_channel = registry.build_network("densenet121", 3, in_channels=1)
    assert one_channel.backbone.conv0.in_channels == 1


def test_adding_an_architecture_takes_a_few_lines(tmp_path: Path, tiny_arch: str) -> None:
    # tiny_arch (conftest) is the whole recipe: a builder returning (backbone, channels) and one register call.
    folder = make_model_folder(tmp_path, tiny_arch, ("a", "b", "c"), size=32)
    model = load_model(folder, device="cpu")
    assert model.manifest.cam_target_layers == ("backbone.2",)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.get_architecture(tiny_arch))

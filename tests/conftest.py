"""Shared fixtures: real DICOM test files and small random-weight model folders.

Random weights are for exercising the code paths only; they are written to temporary
folders and never shipped as a model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch
from torch import nn

from cxr_core.models import architectures as registry
from cxr_core.models.architectures import build_network
from cxr_core.models.loading import LoadedModel, load_model, save_model_folder
from cxr_core.models.manifest import InputSpec, Manifest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
#: Where the app keeps its state unless told otherwise; a test run must never write there.
_STATE = ("CXR_VAR_DIR", "CXR_USERS_FILE", "CXR_JOBS_DIR", "CXR_REGISTRY_DIR")


@pytest.fixture(scope="session", autouse=True)
def private_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the app's state (database, users, jobs, registry) at a temporary folder for the run.

    Without it every test that predicts without setting CXR_VAR_DIR wrote into the checkout's
    var/ (15 audit rows per suite run): on a server that runs the app from its checkout, test
    predictions would join the real, append-only, hash-chained audit trail for good. Tests
    that need their own folder still set CXR_VAR_DIR; subprocesses inherit this one.
    """
    saved = {name: os.environ.get(name) for name in _STATE}
    for name in _STATE:
        os.environ.pop(name, None)
    var = tmp_path_factory.mktemp("var")
    os.environ["CXR_VAR_DIR"] = str(var)
    try:
        yield var
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _pydicom_data_dir() -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data"


def _pydicom_test_dir() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="session")
def dicom_data() -> Path:
    """pydicom-data's files (RG1 chest CR, RG3 extremity, CT, MR, US...)."""
    return _pydicom_data_dir()


@pytest.fixture(scope="session")
def dicom_tests() -> Path:
    """pydicom's own test files, shipped inside the pydicom wheel."""
    return _pydicom_test_dir()


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (not a package) as a module, to test its functions."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model_folder(
    root: Path,
    architecture: str,
    classes: tuple[str, ...],
    head: str = "softmax",
    size: int = 128,
    seed: int = 0,
    **manifest_fields: object,
) -> Path:
    torch.manual_seed(seed)
    n_out = 1 if head == "sigmoid" else len(classes)
    network = build_network(architecture, n_out)
    model_id = manifest_fields.pop("id", f"{architecture}-test")
    manifest = Manifest(
        id=str(model_id),
        version=str(manifest_fields.pop("version", "0.0.1")),
        name=f"{architecture} random-weight test model",
        architecture=architecture,
        classes=classes,
        head=head,
        weights_sha256="0" * 64,
        input=InputSpec(size=(size, size)),
        **manifest_fields,  # type: ignore[arg-type]
    )
    folder = root / manifest.id
    save_model_folder(network, manifest, folder)
    return folder


def tiny_site_adaptation(tmp_path: Path, films_per_class: int) -> tuple[Path, Path, dict[str, object]]:
    """(a 3-class cnn5 base model at 32 px, a site of ``films_per_class`` films of each of its
    classes without splits, the keyword arguments of a one-epoch ``adapt`` on the CPU)."""
    from tests.synthetic import make_labelled_folder

    classes = ("covid", "normal", "viral_pneumonia")
    base = make_model_folder(tmp_path / "weights", "cnn5", classes, size=32)
    site = make_labelled_folder(tmp_path / "site", classes, per_class={"all": films_per_class}, splits=False, size=48, seed=3)
    return base, site, dict(version="1.0.0-site", epochs=1, batch_size=8, device="cpu", lr=3e-2)


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder with a 3-class DenseNet121 and a binary ResNet50 (random weights)."""
    root = tmp_path_factory.mktemp("weights")
    make_model_folder(root, "densenet121", ("covid", "normal", "viral_pneumonia"), thresholds={"covid": 0.4})
    make_model_folder(root, "resnet50", ("covid", "other"), head="sigmoid")
    return root


@pytest.fixture(scope="session")
def densenet(weights_root: Path) -> LoadedModel:
    return load_model(weights_root / "densenet121-test", device="cpu")


@pytest.fixture(scope="session")
def resnet(weights_root: Path) -> LoadedModel:
    return load_model(weights_root / "resnet50-test", device="cpu")


@pytest.fixture()
def tiny_arch() -> Iterator[str]:
    """A registered 64-channel toy CNN (8x8 feature map at 32 px): fast where the backbone does not matter."""

    def build() -> tuple[nn.Module, int]:
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, stride=4, padding=1)), 64

    registry.register(registry.Architecture("tiny-test", build, head_activation=True, first_conv="0", stages=("0", "2")))
    try:
        yield "tiny-test"
    finally:
        registry.ARCHITECTURES.pop("tiny-test")


@pytest.fixture()
def use_weights(weights_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights_root))
    monkeypatch.delenv("CXR_DEFAULT_MODEL", raising=False)
    return weights_root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Keep CPU threads modest so parallel test processes don't oversubscribe 2 cores.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

"""Auxiliary classes: trained as extra outputs, dropped from the exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxr_core.cli import main
from cxr_core.models.architectures import build_network
from cxr_core.models.loading import load_model
from cxr_core.training.config import TrainConfig
from cxr_core.training.trainer import final_spec, predict_arrays
from tests.synthetic import make_labelled_folder

CLASSES = ("covid", "normal", "viral_pneumonia")


@pytest.fixture(scope="module")
def four_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("aux"), classes=CLASSES + ("bacterial_pneumonia",))


def test_config_rules() -> None:
    base = dict(data_dir="d", arch="cnn5", out="o", model_id="m")
    config = TrainConfig(**base, aux_classes=("bacterial_pneumonia",))  # type: ignore[arg-type]
    assert config.training_classes == CLASSES + ("bacterial_pneumonia",) and config.n_outputs == 4 and config.model_classes == CLASSES
    assert TrainConfig.from_dict(json.loads(json.dumps(config.as_dict()))) == config
    with pytest.raises(ValueError, match="multi-class"):
        TrainConfig(**base, binary_positive="covid", aux_classes=("x",)).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ"):
        TrainConfig(**base, aux_classes=("normal",)).validate()  # type: ignore[arg-type]
    # A run recorded before the option existed resumes with none.
    old = config.as_dict()
    del old["aux_classes"]
    assert TrainConfig.from_dict(old).aux_classes == ()


def test_trained_with_an_auxiliary_class_exported_without_it(
    four_labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, run = tmp_path / "weights" / "aux-model", tmp_path / "run"
    code = main(["train", str(four_labels), "--arch", "cnn5", "--out", str(out), "--size", "32", "--epochs", "3", "--batch-size", "8",
                 "--workers", "1", "--run-dir", str(run), "--device", "cpu", "--no-cpu-bf16", "--balance", "source",
                 "--aux-classes", "bacterial_pneumonia"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert tuple(manifest["classes"]) == CLASSES and manifest["training"]["config"]["aux_classes"] == ["bacterial_pneumonia"]
    # Trained on all four labels; judged on the model's three (6 test films each).
    validation = json.loads((run / "validation.json").read_text())
    assert validation["counts"]["train"]["bacterial_pneumonia"] == 16
    assert manifest["metrics"]["test"]["per_class"].keys() == set(CLASSES) and sum(map(sum, manifest["metrics"]["test"]["confusion_matrix"])) == 18
    assert all(set(h["val_recall"]) == set(CLASSES) for h in manifest["training"]["history"])
    assert "Auxiliary classes" in (out / "README.md").read_text()

    # The exported model is the trained network's first three outputs: its probabilities are
    # the softmax over those three logits (temperature applied), the fourth ignored.
    trained = build_network("cnn5", 4)
    trained.load_state_dict(load_file(str(run / "best.safetensors")))
    assert trained.head.fc.out_features == 4
    config = TrainConfig.from_dict(manifest["training"]["config"])
    rng = np.random.default_rng(3)
    films = rng.integers(0, 256, size=(5, 32, 32), dtype=np.uint8)
    logits = predict_arrays(trained, films, final_spec(config), torch.device("cpu"))
    expected = torch.softmax(torch.as_tensor(logits[:, :3], dtype=torch.float64) / manifest["temperature"], 1).numpy()
    model = load_model(out, device="cpu")
    assert model.network.head.fc.out_features == 3
    exported = predict_arrays(model.network, films, model.manifest.input, torch.device("cpu"))
    got = torch.softmax(torch.as_tensor(exported, dtype=torch.float64) / model.manifest.temperature, 1).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-2)  # fp16 weights

    # evaluate scores the model's classes only, and reports apart how the films of the
    # auxiliary folder (as of any folder that is not a model class) were called.
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(out.parent))
    capsys.readouterr()
    assert main(["evaluate", str(four_labels / "test"), "--model", "aux-model", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 18
    calls = summary["other_labels"]["bacterial_pneumonia"]
    assert sum(calls.values()) == len(list((four_labels / "test" / "bacterial_pneumonia").iterdir()))
    assert set(calls) <= set(CLASSES)


def test_cross_validation_judges_folds_on_the_model_classes(four_labels: Path, tmp_path: Path) -> None:
    from cxr_core.training.crossval import cross_validate
    from cxr_core.training.prepare import prepare_data
    from cxr_core.training.trainer import label_plan

    config = TrainConfig(data_dir=str(four_labels), arch="cnn5", out=str(tmp_path / "w"), model_id="cv", schedule=((32, 1),),
                         batch_size=8, workers=1, device="cpu", aux_classes=("bacterial_pneumonia",))
    data = prepare_data(four_labels, label_plan(config), 32)
    pool = data.train.records + data.val.records
    assert any(r.label == "bacterial_pneumonia" for r in pool)
    report = cross_validate(config, data, 2, tmp_path / "cv")
    assert sum(f["n_val"] for f in report["per_fold"]) == sum(r.label in CLASSES for r in pool)
    assert all(f["per_class"].keys() == set(CLASSES) for f in report["per_fold"])

"""Training end to end on tiny synthetic data: model folder, resume, cancel, progress, CLI."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxr_core.cli import main
from cxr_core.errors import CxrError
from cxr_core.models.loading import load_model
from cxr_core.training.config import TrainConfig
from cxr_core.training.finalize import finalize
from cxr_core.training.fit_gate import fit_gate, processed_copies
from cxr_core.training.run import RunDir
from cxr_core.training.trainer import TrainingCancelled, train
from tests.conftest import SHARED_DATA, load_script
from tests.synthetic import make_labelled_folder


def tiny_config(data: Path, out: Path, **changes: object) -> TrainConfig:
    base = dict(data_dir=str(data), arch="cnn5", out=str(out), model_id="tiny", schedule=((32, 3),), batch_size=8, lr=3e-3, workers=1, device="cpu")
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("data"))


def test_tiny_train_writes_a_loadable_calibrated_model(data_root: Path, tmp_path: Path) -> None:
    config = tiny_config(data_root, tmp_path / "weights" / "tiny", schedule=((32, 4),))
    result, data = train(config, tmp_path / "run")
    manifest = finalize(config, tmp_path / "run", data, result, command="pytest")
    model = load_model(tmp_path / "weights" / "tiny", device="cpu")
    assert model.manifest.classes == ("covid", "normal", "viral_pneumonia") and model.manifest.input.size == (32, 32)
    assert manifest.temperature > 0 and 0 < manifest.thresholds["covid"] <= 0.5
    test = manifest.metrics["test"]
    assert set(test) >= {"accuracy", "per_class", "confusion_matrix", "auroc_macro", "ece"}
    assert test["accuracy"] > 0.6  # the blob's position is learnable in a few epochs; chance is 0.33
    assert (tmp_path / "weights" / "tiny" / "README.md").read_text().count("Confusion matrix") >= 1
    assert (tmp_path / "weights" / "tiny" / "figures" / "test_roc.json").exists()
    events = [e["event"] for e in RunDir(tmp_path / "run").events()]
    assert events[0] == "preparing" and "start" in events and events.count("epoch") == 4
    assert json.loads((tmp_path / "run" / "status.json").read_text())["event"] == "epoch"


def test_the_gate_can_be_refitted_on_processed_copies_of_the_training_films(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights" / "tiny"
    config = tiny_config(data_root, out, schedule=((32, 1),))
    result, data = train(config, tmp_path / "run")
    plain = finalize(config, tmp_path / "run", data, result).ood
    films = data.train.resized(32)
    copies = processed_copies(films, 0.2)
    assert copies.shape == films.shape and copies.dtype == np.uint8
    assert np.array_equal(copies, processed_copies(films, 0.2))  # reproducible from its seed
    # five steps drawn at 0.2 each leave about a third of the films as they were
    assert 0.4 < np.mean(np.any(copies != films, axis=(1, 2))) < 0.9
    refitted = fit_gate(out, data, processing=0.5).ood
    assert refitted["processing"] == 0.5 and "processing" not in plain
    assert refitted["fitted_on"]["train"] == refitted["fitted_on"]["train_processed_copies"] == plain["fitted_on"]["train"]
    assert refitted["sha256"] != plain["sha256"]
    assert load_model(out, device="cpu").feature_gate is not None  # the manifest's digest matches the new file
    with pytest.raises(ValueError, match="probability"):
        fit_gate(out, data, processing=1.5)


def test_sealed_test_split_is_left_unread_until_the_card_refresh_evaluates_it(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "weights" / "tiny"
    config = tiny_config(data_root, out, schedule=((32, 2),))
    result, data = train(config, tmp_path / "run")
    n_test = len(data.test.records)
    assert n_test > 0
    manifest = finalize(config, tmp_path / "run", data, result, seal_test=True)
    assert "test" not in manifest.metrics and manifest.metrics["test_sealed"] == {"n": n_test}
    assert "accuracy" in manifest.metrics["val"]
    assert manifest.ood and "test_rates" not in manifest.ood  # the input gate's rates on test are not read either
    assert not (out / "figures" / "test_roc.json").exists() and (out / "figures" / "training_loss.json").exists()
    card = (out / "README.md").read_text()
    assert f"The test split ({n_test} films) was sealed" in card and "### test split" not in card

    monkeypatch.setattr(sys, "argv", ["refresh_model_card.py", str(out), "--abstention", str(data_root), "--split", "test"])
    assert load_script("refresh_model_card").main() == 0
    unsealed = json.loads((out / "manifest.json").read_text())["metrics"]
    assert "test_sealed" not in unsealed and unsealed["test"]["n"] == n_test
    assert set(unsealed["test"]) >= {"accuracy", "per_class", "confusion_matrix", "ece", "abstention"}
    card = (out / "README.md").read_text()
    assert "### test split" in card and "was sealed" not in card


def test_resume_after_interruption_matches_uninterrupted(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(data_root, tmp_path / "unused")
    train(config, tmp_path / "straight")

    stop = threading.Event()
    original = RunDir.save_checkpoint

    def checkpoint_then_crash(self: RunDir, state: dict) -> None:
        original(self, state)
        if state["epoch"] == 0:
            stop.set()  # as if the process died after epoch 1's checkpoint

    monkeypatch.setattr(RunDir, "save_checkpoint", checkpoint_then_crash)
    with pytest.raises(TrainingCancelled):
        train(config, tmp_path / "interrupted", stop=stop)
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    result, _ = train(config, tmp_path / "interrupted")
    assert result.epochs_run == 3
    events = [e["event"] for e in RunDir(tmp_path / "interrupted").events()]
    assert "cancelled" in events and "resumed" in events
    a = load_file(str(tmp_path / "straight" / "best.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "best.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_a_run_folder_refuses_a_different_config(data_root: Path, tmp_path: Path) -> None:
    train(tiny_config(data_root, tmp_path / "x", schedule=((32, 1),)), tmp_path / "run")
    with pytest.raises(CxrError, match="different configuration"):
        train(tiny_config(data_root, tmp_path / "x", schedule=((32, 1),), lr=1e-4), tmp_path / "run")


def test_binary_progressive_resizing_and_frozen_backbone(data_root: Path, tmp_path: Path) -> None:
    config = tiny_config(data_root, tmp_path / "w" / "bin", binary_positive="covid", schedule=((32, 1), (48, 2)), freeze_epochs=1, layer_decay=0.5)
    result, data = train(config, tmp_path / "run")
    assert [h["size"] for h in result.history] == [32, 48, 48] and result.history[0]["frozen"]
    assert result.best_epoch in (1, 2)  # chosen within the final phase only
    manifest = finalize(config, tmp_path / "run", data, result)
    assert manifest.head == "sigmoid" and manifest.classes == ("covid", "other") and manifest.input.size == (48, 48)


def test_frozen_epoch_leaves_backbone_unchanged(data_root: Path, tmp_path: Path) -> None:
    from cxr_core.models.architectures import build_network

    torch.manual_seed(0)
    initial = build_network("cnn5", 3).state_dict()
    config = tiny_config(data_root, tmp_path / "w", schedule=((32, 1),), freeze_epochs=1)
    train(config, tmp_path / "run")
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    for key, value in initial.items():
        if key.startswith("backbone.") and value.is_floating_point():
            torch.testing.assert_close(trained[key], value)
    assert not torch.equal(trained["head.fc.weight"], initial["head.fc.weight"])


def test_train_and_evaluate_commands(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights"
    code = main(["train", str(data_root), "--arch", "cnn5", "--out", str(weights / "cli-model"), "--size", "32", "--epochs", "2",
                 "--batch-size", "8", "--workers", "1", "--run-dir", str(tmp_path / "run"), "--device", "cpu", "--zoom", "0.85,1.35",
                 "--aspect", "0.2", "--edge-crop", "0.15", "--balance", "source", "--no-cpu-bf16"])
    out = capsys.readouterr().out
    assert code == 0 and "wrote" in out and "; test accuracy " in out
    manifest = json.loads((weights / "cli-model" / "manifest.json").read_text())
    assert manifest["training"]["config"]["augment"]["scale"] == [0.85, 1.35]
    assert manifest["training"]["config"]["augment"]["aspect"] == 0.2
    assert manifest["training"]["config"]["augment"]["edge_crop"] == 0.15
    assert manifest["training"]["config"]["balance"] == "source"
    assert manifest["training"]["config"]["amp_cpu"] is False
    assert manifest["training"]["command"].startswith("python -m cxr_core train ")
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights))
    assert main(["evaluate", str(data_root / "test"), "--model", "cli-model", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report)[:8] == ["model", "n", "classes", "accuracy", "per_class", "confusion_matrix", "auroc_macro", "ece"]
    assert report["n"] == 18 and report["model"] == "cli-model@1.0.0"
    # Same films through the app's own reading path as through training's evaluation.
    assert report["accuracy"] == pytest.approx(manifest["metrics"]["test"]["accuracy"], abs=1e-6)
    # ...and the "uncertain" rule abstains on the same films in both.
    assert report["abstention"] == manifest["metrics"]["test"]["abstention"]
    assert report["abstention"]["n_abstained"] == round((1 - report["abstention"]["answered"]) * 18)
    assert main(["train", str(data_root), "--arch", "cnn5", "--out", str(weights / "x"), "--schedule", "32-2"]) == 2
    for zoom in ("1.3", "1.3,0.9", "0,2", "a,b"):
        assert main(["train", str(data_root), "--arch", "cnn5", "--out", str(weights / "x"), "--zoom", zoom]) == 2
        assert "--zoom" in capsys.readouterr().err
    for aspect in ("-0.1", "0.6"):
        assert main(["train", str(data_root), "--arch", "cnn5", "--out", str(weights / "x"), "--aspect", aspect]) == 2
        assert "--aspect" in capsys.readouterr().err
    for crop in ("-0.1", "0.5"):
        assert main(["train", str(data_root), "--arch", "cnn5", "--out", str(weights / "x"), "--edge-crop", crop]) == 2
        assert "--edge-crop" in capsys.readouterr().err
    for extra in (["--acquisition-positive", "0"], ["--acquisition", "0.3", "--acquisition-positive", "1.5"]):
        assert main(["train", str(data_root), "--arch", "cnn5", "--out", str(weights / "x"), *extra]) == 2
        assert "--acquisition-positive" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/cxr is not present")
def test_a_few_steps_on_shared_images(tmp_path: Path) -> None:
    import csv
    import shutil

    rows = list(csv.DictReader(open(SHARED_DATA / "metadata.csv")))
    picked = []
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for label in ("covid", "normal", "viral_pneumonia"):
            picked += [r for r in rows if r["split"] == split and r["label"] == label][:n]
    root = tmp_path / "subset"
    for r in picked:
        (root / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_DATA / r["file"], root / r["file"])
    config = tiny_config(root, tmp_path / "w" / "shared", arch="densenet121", schedule=((64, 1),), batch_size=6)
    result, data = train(config, tmp_path / "run")
    manifest = finalize(config, tmp_path / "run", data, result)
    assert load_model(tmp_path / "w" / "shared", device="cpu").manifest.key == manifest.key
    assert np.isfinite(result.history[0]["train_loss"])


def test_an_epoch_checkpointed_but_not_logged_is_logged_on_resume(data_root: Path, tmp_path: Path) -> None:
    """Killed after saving an epoch's checkpoint and before logging it: the resumed run starts
    after that epoch, so the progress file must get the epoch from the checkpoint's history."""
    from cxr_core.training.run import RunDir

    config = tiny_config(data_root, tmp_path / "w", schedule=((32, 2),))
    train(config, tmp_path / "run")
    progress = RunDir(tmp_path / "run").progress
    lines = progress.read_text(encoding="utf-8").splitlines()
    last = max(i for i, line in enumerate(lines) if json.loads(line)["event"] == "epoch")
    progress.write_text("\n".join(lines[:last]) + "\n", encoding="utf-8")  # as if killed before this line
    assert [e["epoch"] for e in RunDir(tmp_path / "run").events() if e["event"] == "epoch"] == [0]
    result, _ = train(config, tmp_path / "run")
    events = RunDir(tmp_path / "run").events()
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [0, 1] and result.epochs_run == 2
    assert next(e for e in events if e["event"] == "epoch" and e["epoch"] == 1)["recovered"] is True


def test_cross_validation_folds_by_patient(data_root: Path, tmp_path: Path) -> None:
    from cxr_core.training.crossval import cross_validate, fold_of
    from cxr_core.training.prepare import prepare_data
    from cxr_core.training.trainer import label_plan

    config = tiny_config(data_root, tmp_path / "w", schedule=((32, 1),))
    data = prepare_data(data_root, label_plan(config), 32)
    report = cross_validate(config, data, 2, tmp_path / "cv")
    assert report["folds"] == 2 and len(report["per_fold"]) == 2
    assert sum(f["n_val"] for f in report["per_fold"]) == len(data.train.records) + len(data.val.records)
    assert report["accuracy"]["mean"] is not None and (tmp_path / "cv" / "crossval.json").exists()
    from cxr_core.training.dataset import Record

    same_patient = [Record(Path(f"f{i}.png"), "covid", None, "patient-7") for i in range(10)]
    assert len({fold_of(r, 5) for r in same_patient}) == 1


def test_train_summary_names_validation_when_the_test_split_is_sealed(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "weights" / "sealed"
    assert main(["train", str(data_root), "--arch", "cnn5", "--out", str(out), "--size", "32", "--epochs", "1", "--batch-size", "8",
                 "--workers", "1", "--run-dir", str(tmp_path / "run"), "--device", "cpu", "--seal-test"]) == 0
    line = capsys.readouterr().out
    val = json.loads((out / "manifest.json").read_text())["metrics"]["val"]
    assert f"; val accuracy {val['accuracy']}, ECE {val['ece']};" in line and "test accuracy" not in line


def test_mask_text_option_reaches_the_model_folder(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "weights" / "masked"
    assert main(["train", str(data_root), "--arch", "cnn5", "--out", str(out), "--size", "32", "--epochs", "1", "--batch-size", "8",
                 "--workers", "1", "--run-dir", str(tmp_path / "run"), "--device", "cpu", "--mask-text"]) == 0
    assert json.loads((out / "manifest.json").read_text())["input"]["mask_burned_in"] is True
    assert load_model(out, device="cpu").manifest.input.mask_burned_in
    assert any("masked" in n for n in json.loads((tmp_path / "run" / "validation.json").read_text())["notes"])


def test_the_positive_class_films_are_marked_for_their_own_artefact_rate(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    import cxr_core.training.trainer as trainer_module
    from cxr_core.training.augment import AugmentConfig

    masks: list[np.ndarray] = []
    real = trainer_module.augment

    def spy(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator, positive: torch.Tensor | None = None) -> torch.Tensor:
        assert positive is not None and positive.dtype == torch.bool and positive.shape == (batch.shape[0],)
        masks.append(positive.numpy().copy())
        return real(batch, config, generator, positive=positive)

    monkeypatch.setattr(trainer_module, "augment", spy)
    config = tiny_config(data_root, tmp_path / "w", schedule=((32, 1),),
                         augment=replace(AugmentConfig(), acquisition=0.5, acquisition_positive=0.0))
    _, data = train(config, tmp_path / "run")
    # The batches the loop drew, film by film: the marked films are the COVID-19 ones, and only they.
    labels = np.array([r.label for r in data.train.records])
    order = trainer_module._epoch_order(config, np.zeros(len(labels), dtype=np.int64), 0)
    expected = [labels[np.sort(order[i : i + config.batch_size])] == "covid" for i in range(0, len(order), config.batch_size)]
    assert len(masks) == len(expected) and all(np.array_equal(m, e) for m, e in zip(masks, expected))
    assert 0 < sum(int(m.sum()) for m in masks) < len(labels)

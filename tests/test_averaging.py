"""Weight averaging (SWA) over the final phase: the running mean, batch-norm re-estimation,
the exported weights, and resume."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxr_core.models.manifest import InputSpec
from cxr_core.training.averaging import WeightAverage, recompute_batchnorm
from cxr_core.training.finalize import finalize
from cxr_core.training.run import RunDir
from cxr_core.training.trainer import TrainingCancelled, train
from tests.synthetic import make_labelled_folder
from tests.test_training_run import tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("avgdata"))


def test_running_mean_matches_the_plain_mean_and_leaves_buffers_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    snapshots = []
    average = WeightAverage()
    for k in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.full_like(p, float(k * k)) + torch.arange(p.numel()).view_as(p))
        snapshots.append({n: p.detach().clone() for n, p in net.named_parameters()})
        average.update(net)
    net[1].running_mean.fill_(7.0)
    average.apply_to(net)
    # Mean of k^2 for k = 0..3 is 3.5, on top of the per-element offsets.
    for name, p in net.named_parameters():
        expected = torch.stack([s[name] for s in snapshots]).mean(0)
        torch.testing.assert_close(p.detach(), expected)
        torch.testing.assert_close(p.detach() - torch.arange(p.numel()).view_as(p).float(), torch.full_like(p, 3.5))
    assert torch.all(net[1].running_mean == 7.0) and average.count == 4
    restored = WeightAverage.from_state(average.state())
    assert restored.count == 4 and set(restored.mean) == {n for n, _ in net.named_parameters()}
    with pytest.raises(ValueError):
        WeightAverage().apply_to(net)


def test_batchnorm_statistics_are_re_estimated_from_the_images() -> None:
    spec = InputSpec(size=(8, 8), channels=1, mean=(0.5,), std=(0.25,))
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(1)).eval()
    net[0].running_mean.fill_(100.0)
    net[0].running_var.fill_(100.0)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
    used = recompute_batchnorm(net, pixels, spec, torch.device("cpu"), batch_size=4)
    assert used == 12 and net[0].momentum == 0.1 and not net.training  # mode and momentum restored
    x = (pixels.astype(np.float64) / 255.0 - 0.5) / 0.25
    # momentum None: a cumulative average of the per-batch mean and unbiased variance.
    batches = x.reshape(3, 4, 8, 8)
    mean = np.mean([b.mean() for b in batches])
    var = np.mean([b.var(ddof=1) for b in batches])
    assert net[0].running_mean.item() == pytest.approx(mean, rel=1e-5)
    assert net[0].running_var.item() == pytest.approx(var, rel=1e-5)
    # A sample when there are more images than the limit.
    assert recompute_batchnorm(net, pixels, spec, torch.device("cpu"), limit=5) == 5
    assert recompute_batchnorm(torch.nn.Sequential(torch.nn.Identity()), pixels, spec, torch.device("cpu")) == 0


def test_averaged_run_exports_the_average_with_fresh_batchnorm(data_root: Path, tmp_path: Path) -> None:
    config = tiny_config(data_root, tmp_path / "weights" / "avg", schedule=((32, 1), (32, 2)), average_every=2)
    result, data = train(config, tmp_path / "run")
    n_train = len(data.train.records)
    steps = -(-n_train // config.batch_size)
    last_batch = n_train - config.batch_size * (steps - 1)
    per_epoch = sum(1 for s in range(steps) if (s + 1) % 2 == 0 and (s + 1 < steps or last_batch >= 2))
    assert result.averaged is not None and result.averaged["snapshots"] == 2 * per_epoch  # final phase only
    assert result.averaged["batchnorm_images"] == n_train and 0 <= result.averaged["val_accuracy"] <= 1
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    for name, mean in checkpoint["average"]["mean"].items():
        torch.testing.assert_close(best[name], mean)
    # Batch-norm statistics were re-estimated, not kept from the last step.
    bn = "backbone.block1.1.running_mean"
    assert not torch.allclose(best[bn], checkpoint["model"][bn])
    assert [e["event"] for e in RunDir(tmp_path / "run").events()][-1] == "averaged"
    manifest = finalize(config, tmp_path / "run", data, result, command="pytest")
    assert manifest.training["averaged"]["snapshots"] == 2 * per_epoch
    card = (tmp_path / "weights" / "avg" / "README.md").read_text()
    assert f"the average of {2 * per_epoch} snapshots, one every 2 steps of the last 2 epochs" in card


def test_averaged_run_resumes_with_its_average(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(data_root, tmp_path / "unused", schedule=((32, 3),), average_every=3)
    straight, _ = train(config, tmp_path / "straight")

    stop = threading.Event()
    original = RunDir.save_checkpoint

    def checkpoint_then_crash(self: RunDir, state: dict) -> None:
        original(self, state)
        if state["epoch"] == 1:
            stop.set()

    monkeypatch.setattr(RunDir, "save_checkpoint", checkpoint_then_crash)
    with pytest.raises(TrainingCancelled):
        train(config, tmp_path / "interrupted", stop=stop)
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    resumed, _ = train(config, tmp_path / "interrupted")
    assert resumed.averaged is not None and straight.averaged is not None
    assert resumed.averaged["snapshots"] == straight.averaged["snapshots"]
    a = load_file(str(tmp_path / "straight" / "best.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "best.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_negative_average_interval_is_refused(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="average_every"):
        tiny_config(data_root, tmp_path / "x", average_every=-1).validate()

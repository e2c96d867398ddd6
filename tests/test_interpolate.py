"""WiSE-FT: the adapted weights moved toward the base model's along the straight line between them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxr_core.models.architectures import build_network
from cxr_core.training.config import TrainConfig
from cxr_core.training.interpolate import interpolate_weights
from tests.synthetic import make_labelled_folder


def _network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build_network("cnn5", 3)
    with torch.no_grad():
        for m in network.modules():  # batch-norm statistics that differ between the two networks
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(seed + 1)
    return network


def test_every_float_tensor_lies_on_the_line_between_the_two_networks(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base, tuned = _network(0), _network(1)
    base_state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(base_state, str(tmp_path / "base.safetensors"))
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
    mixed = interpolate_weights(tuned, tmp_path / "base.safetensors", 0.25).state_dict()
    floats = [k for k, v in tuned_state.items() if v.is_floating_point()]
    assert any("running_var" in k for k in floats) and any(k.endswith("weight") for k in floats)
    for k in floats:
        assert torch.allclose(mixed[k], 0.75 * base_state[k] + 0.25 * tuned_state[k], atol=1e-6), k
    counters = [k for k in tuned_state if k.endswith("num_batches_tracked")]
    assert counters and all(int(mixed[k]) == int(tuned_state[k]) for k in counters)
    # The two ends: 1 leaves the tuned network, 0 gives the base model.
    again = _network(1)
    assert all(torch.equal(v, tuned_state[k]) for k, v in interpolate_weights(again, tmp_path / "base.safetensors", 1.0).state_dict().items())
    back = interpolate_weights(_network(1), tmp_path / "base.safetensors", 0.0).state_dict()
    assert all(torch.allclose(back[k], base_state[k]) for k in floats)


def test_a_base_of_another_shape_or_an_alpha_outside_0_1_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_network("cnn5", 4).state_dict().items()}, str(tmp_path / "four.safetensors"))
    with pytest.raises(ValueError, match="does not match"):
        interpolate_weights(_network(1), tmp_path / "four.safetensors", 0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_weights(_network(1), tmp_path / "four.safetensors", 1.5)
    with pytest.raises(ValueError, match="init must be"):
        TrainConfig(data_dir="x", arch="cnn5", out="o", model_id="m", interpolate=0.5).validate()


def test_an_adaptation_exports_the_interpolated_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.training.adapt import AdaptationError, adapt
    from tests.conftest import tiny_site_adaptation

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base, site, common = tiny_site_adaptation(tmp_path, 16)
    with pytest.raises(AdaptationError, match="between 0 and 1"):
        adapt(base, site, tmp_path / "bad", run_dir=tmp_path / "run-bad", interpolate=-0.1, **common)
    adapt(base, site, tmp_path / "full", run_dir=tmp_path / "run-full", **common)
    adapt(base, site, tmp_path / "half", run_dir=tmp_path / "run-half", interpolate=0.5, **common)
    assert json.loads((tmp_path / "run-half" / "run" / "config.json").read_text())["interpolate"] == 0.5
    _assert_half_way(base / "model.safetensors", tmp_path / "full" / "model.safetensors", tmp_path / "half" / "model.safetensors")


def _assert_half_way(start_file: Path, full_file: Path, half_file: Path) -> None:
    """Every tensor the run moved sits half way between start and run in the half-way export."""
    start, full, half = (load_file(str(f)) for f in (start_file, full_file, half_file))
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.allclose(v.float(), full[k].float(), atol=1e-2)]
    assert moved, "the run changed nothing: the test would not see the interpolation"
    # The same seed trains the same weights; the half-way export sits half way (fp16 files: a loose tolerance).
    for k in moved:
        assert torch.allclose(half[k].float(), (start[k].float() + full[k].float()) / 2, atol=2e-2, rtol=1e-2), k


def test_train_exports_the_interpolated_weights_and_a_finished_run_can_be_exported_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train --interpolate A``: how candidate W of 2026-12-06 was exported from Z2's finished run."""
    from cxr_core.cli import main
    from tests.conftest import make_model_folder

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base = make_model_folder(tmp_path / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    data = make_labelled_folder(tmp_path / "data")
    common = ["train", str(data), "--arch", "cnn5", "--init", str(base / "model.safetensors"), "--size", "32", "--epochs", "1",
              "--batch-size", "8", "--workers", "1", "--device", "cpu", "--lr", "3e-2", "--seal-test", "--no-cpu-bf16"]
    assert main([*common, "--out", str(tmp_path / "full"), "--run-dir", str(tmp_path / "run-full")]) == 0
    # The finished run, exported again half way: its folder copied, config.json edited to match the new command.
    import shutil

    shutil.copytree(tmp_path / "run-full", tmp_path / "run-half")
    config = json.loads((tmp_path / "run-half" / "config.json").read_text())
    config.update(out=str(tmp_path / "half"), model_id="half", interpolate=0.5)
    (tmp_path / "run-half" / "config.json").write_text(json.dumps(config))
    epochs_before = (tmp_path / "run-half" / "progress.jsonl").read_text().count('"event": "epoch"')
    assert main([*common, "--interpolate", "0.5", "--out", str(tmp_path / "half"), "--run-dir", str(tmp_path / "run-half")]) == 0
    assert (tmp_path / "run-half" / "progress.jsonl").read_text().count('"event": "epoch"') == epochs_before  # nothing trained again
    manifest = json.loads((tmp_path / "half" / "manifest.json").read_text())
    assert manifest["training"]["config"]["interpolate"] == 0.5 and manifest["id"] == "half"
    assert "covid" in manifest["thresholds"] and manifest["temperature"] > 0  # chosen again, for the exported weights
    _assert_half_way(base / "model.safetensors", tmp_path / "full" / "model.safetensors", tmp_path / "half" / "model.safetensors")
    capsys.readouterr()
    assert main([*common, "--interpolate", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--interpolate" in capsys.readouterr().err
    assert main(["train", str(data), "--arch", "cnn5", "--interpolate", "0.5", "--out", str(tmp_path / "y")]) == 2
    assert "init must be" in capsys.readouterr().err


def test_an_adaptation_at_another_input_size_trains_and_predicts_at_that_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``adapt --size``: the run trains at it and the adapted model's manifest says it, so every
    prediction (and the held-out scoring after adapting) is made at that size."""
    from cxr_core.models.loading import load_model
    from cxr_core.training.adapt import AdaptationError, adapt
    from tests.conftest import tiny_site_adaptation

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base, site, common = tiny_site_adaptation(tmp_path, 16)
    for bad in (32, 1024):
        with pytest.raises(AdaptationError, match="input size between"):
            adapt(base, site, tmp_path / f"bad-{bad}", run_dir=tmp_path / f"run-bad-{bad}", size=bad, **common)
    result = adapt(base, site, tmp_path / "big", run_dir=tmp_path / "run-big", size=64, **common)
    assert load_model(base, device="cpu").manifest.input.size == (32, 32)
    assert load_model(tmp_path / "big", device="cpu").manifest.input.size == (64, 64)
    epochs = [json.loads(line) for line in (tmp_path / "run-big" / "run" / "progress.jsonl").read_text().splitlines()
              if '"event": "epoch"' in line]
    assert epochs and all(e["size"] == 64 for e in epochs)
    assert result.after["n"] == result.before["n"] > 0

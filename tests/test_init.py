"""Initialising from checkpoints in the layouts people actually have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from cxr_core.models.architectures import build_network
from cxr_core.training.init import CheckpointError, initialise, load_into, read_checkpoint


@pytest.fixture(scope="module")
def tv_densenet() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.densenet121(weights=None).state_dict()


def _same_backbone(net: torch.nn.Module, reference: dict[str, torch.Tensor], prefix: str = "features.") -> None:
    assert torch.equal(net.backbone.denseblock3.denselayer7.conv2.weight, reference[prefix + "denseblock3.denselayer7.conv2.weight"])
    assert torch.equal(net.backbone.norm5.running_var, reference[prefix + "norm5.running_var"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_layout(tmp_path: Path, tv_densenet: dict[str, torch.Tensor], suffix: str) -> None:
    path = tmp_path / f"tv{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tv_densenet.items()}, str(path))
    else:
        torch.save({"state_dict": tv_densenet}, path)
    net = build_network("densenet121", 3)
    report = initialise(net, "densenet121", str(path))
    _same_backbone(net, tv_densenet)
    assert report.missing == () and not report.head_loaded  # ImageNet's 1000-way head is not ours


def test_chexnet_layout(tmp_path: Path, tv_densenet: dict[str, torch.Tensor]) -> None:
    # arnoweng/CheXNet: DataParallel prefix, a densenet121 attribute, pre-0.4 names, 14-way head.
    old = {}
    for key, value in tv_densenet.items():
        for new, legacy in (("norm1.", "norm.1."), ("norm2.", "norm.2."), ("conv1.", "conv.1."), ("conv2.", "conv.2.")):
            if "denselayer" in key:
                key = key.replace(f".{new}", f".{legacy}")
        if key.startswith("classifier."):
            old[f"module.densenet121.classifier.0.{key.split('.')[-1]}"] = torch.zeros(14, 1024) if key.endswith("weight") else torch.zeros(14)
        else:
            old[f"module.densenet121.{key}"] = value
    torch.save({"state_dict": old, "epoch": 9}, tmp_path / "chexnet.pth.tar")
    net = build_network("densenet121", 14)
    report = initialise(net, "densenet121", str(tmp_path / "chexnet.pth.tar"))
    _same_backbone(net, tv_densenet)
    assert report.head_loaded and report.missing == ()


def test_torchxrayvision_layout_one_channel_adapted(tmp_path: Path) -> None:
    torch.manual_seed(2)
    xrv = torchvision.models.densenet121(weights=None, num_classes=18)
    xrv.features.conv0 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    state = xrv.state_dict()
    state["op_threshs"] = torch.rand(18)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "xrv.safetensors"))
    net3 = build_network("densenet121", 3, in_channels=3)
    report = initialise(net3, "densenet121", str(tmp_path / "xrv.safetensors"))
    assert report.adapted_first_conv == "1 -> 3 channels"
    # A grey image repeated into 3 channels gives the 1-channel network's response.
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(net3.backbone.conv0(x.repeat(1, 3, 1, 1)), xrv.features.conv0(x), atol=1e-5, rtol=1e-4)
    net1 = build_network("densenet121", 3, in_channels=1)
    assert load_into(net1, "densenet121", state).adapted_first_conv is None


def test_three_to_one_channel(tv_densenet: dict[str, torch.Tensor]) -> None:
    net1 = build_network("densenet121", 3, in_channels=1)
    report = load_into(net1, "densenet121", tv_densenet)
    assert report.adapted_first_conv == "3 -> 1 channels"
    torch.testing.assert_close(net1.backbone.conv0.weight, tv_densenet["features.conv0.weight"].sum(1, keepdim=True))


def test_resnet_and_our_own_layout(tmp_path: Path) -> None:
    torch.manual_seed(3)
    tv = torchvision.models.resnet50(weights=None).state_dict()
    net = build_network("resnet50", 1)
    initialise_report = load_into(net, "resnet50", tv)
    assert torch.equal(net.backbone.layer3[2].conv2.weight, tv["layer3.2.conv2.weight"]) and initialise_report.missing == ()
    ours = net.state_dict()
    again = build_network("resnet50", 1)
    assert load_into(again, "resnet50", ours).head_loaded
    assert torch.equal(again.head.fc.weight, net.head.fc.weight)


def test_refusals(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None), tmp_path / "whole-model.pth")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_checkpoint(tmp_path / "whole-model.pth")
    with pytest.raises(CheckpointError, match="only 0 of"):
        load_into(build_network("densenet121", 3), "densenet121", torchvision.models.resnet18(weights=None).state_dict())
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_other_seed_paper_architectures_build_and_train_a_step() -> None:
    for arch in ("vgg16", "xception", "cnn5"):
        net = build_network(arch, 1)
        out = net(torch.rand(2, 3, 96, 96))
        out.sum().backward()
        assert out.shape == (2, 1) and net.head.fc.weight.grad is not None


def test_a_model_fine_tuned_with_an_auxiliary_class_keeps_its_heads_rows() -> None:
    torch.manual_seed(5)
    base = build_network("cnn5", 3).state_dict()
    wider = build_network("cnn5", 4)
    fresh_row = wider.head.fc.weight[3].detach().clone()
    assert load_into(wider, "cnn5", base).head_loaded
    assert torch.equal(wider.head.fc.weight[:3], base["head.fc.weight"]) and torch.equal(wider.head.fc.bias[:3], base["head.fc.bias"])
    assert torch.equal(wider.head.fc.weight[3], fresh_row)  # the auxiliary output starts as initialised
    # A binary (one-logit) head means something else: not spread over a softmax.
    binary = build_network("cnn5", 1).state_dict()
    assert not load_into(build_network("cnn5", 4), "cnn5", binary).head_loaded

"""The architecture registry: every network the project can build, declared once.

An :class:`Architecture` says how to build the backbone (torchvision layout, random
weights: nothing is downloaded here), where its first convolution is (to adapt the
number of input channels), and which backbone stages a Grad-CAM can look at, shallow
to deep (the last one is the default CAM layer). Adding an architecture is one
builder function and one :func:`register` call.

Every model is a :class:`CxrNet`: ``backbone`` (image -> feature map) followed by a
:class:`ClassifierHead` (feature map -> logits). Splitting there lets the explainer
run the backbone once and compute class heatmaps on the small head alone.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

from cxr_core.errors import UnknownArchitectureError


class ClassifierHead(nn.Module):
    """Feature map (N, C, h, w) -> logits (N, n_outputs).

    ``feature_map`` is an identity whose output is the backbone's last feature map:
    the default Grad-CAM target. ``act`` is a ReLU for backbones that end before their
    final activation (DenseNet's norm5); it is not in-place, because an in-place ReLU
    would overwrite the activations the CAM hooks keep (pytorch-grad-cam issue #147).
    """

    def __init__(self, in_features: int, n_outputs: int, activation: bool) -> None:
        super().__init__()
        self.feature_map = nn.Identity()
        self.act: nn.Module = nn.ReLU(inplace=False) if activation else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_features, n_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.act(self.feature_map(features))
        return self.fc(self.flatten(self.pool(x)))


class CxrNet(nn.Module):
    """Image (N, C, H, W) -> logits (N, n_outputs): ``head(backbone(x))``."""

    def __init__(self, backbone: nn.Module, head: ClassifierHead, architecture: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.architecture = architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class Architecture:
    """How to build one network family and where to look inside it."""

    name: str
    #: () -> (backbone with a 3-channel first conv, channels of its output feature map)
    build_backbone: Callable[[], tuple[nn.Module, int]]
    #: the backbone's output still needs a ReLU before pooling
    head_activation: bool
    #: dotted path of the first convolution, relative to the backbone
    first_conv: str
    #: CAM-able stages relative to the backbone, shallow to deep; the last is the output
    stages: tuple[str, ...]
    default_input_size: int = 224
    description: str = ""

    @property
    def default_cam_layer(self) -> str:
        """Dotted path, from the model root, of the default Grad-CAM target."""
        return f"backbone.{self.stages[-1]}"

    @property
    def stage_layers(self) -> tuple[str, ...]:
        return tuple(f"backbone.{s}" for s in self.stages)


ARCHITECTURES: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    if architecture.name in ARCHITECTURES:
        raise ValueError(f"architecture {architecture.name!r} is registered twice")
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitectureError(f"Unknown architecture {name!r}; known: {known}.") from None


def _adapt_first_conv(backbone: nn.Module, path: str, in_channels: int) -> None:
    """Replace the first conv so it takes ``in_channels``; its weights are re-initialised."""
    conv = backbone.get_submodule(path)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{path} is a {type(conv).__name__}, not a Conv2d")
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    parent_path, _, leaf = path.rpartition(".")
    parent = backbone.get_submodule(parent_path) if parent_path else backbone
    setattr(parent, leaf, new)


def build_network(architecture: str, n_outputs: int, in_channels: int = 3) -> CxrNet:
    """A randomly initialised :class:`CxrNet` (weights are loaded separately)."""
    arch = get_architecture(architecture)
    backbone, features = arch.build_backbone()
    _adapt_first_conv(backbone, arch.first_conv, in_channels)
    head = ClassifierHead(features, n_outputs, activation=arch.head_activation)
    return CxrNet(backbone, head, arch.name)


# --- The architectures --------------------------------------------------------------------


def _densenet121() -> tuple[nn.Module, int]:
    net = torchvision.models.densenet121(weights=None)
    # torchvision's DenseNet forward applies F.relu(inplace=True) after `features`; our
    # head owns that ReLU instead, so the backbone is `features` alone (ends at norm5).
    return net.features, net.classifier.in_features


def _resnet50() -> tuple[nn.Module, int]:
    net = torchvision.models.resnet50(weights=None)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    backbone = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    return backbone, net.fc.in_features


register(
    Architecture(
        name="densenet121",
        build_backbone=_densenet121,
        head_activation=True,
        first_conv="conv0",
        # Lang et al.'s five-layer progression: stem, dense blocks, final norm.
        stages=("relu0", "denseblock1", "denseblock2", "denseblock3", "norm5"),
        description="DenseNet-121 (Huang et al. 2017), torchvision layout",
    )
)

register(
    Architecture(
        name="resnet50",
        build_backbone=_resnet50,
        head_activation=False,
        first_conv="conv1",
        stages=("relu", "layer1", "layer2", "layer3", "layer4"),
        description="ResNet-50 (He et al. 2016), torchvision layout",
    )
)

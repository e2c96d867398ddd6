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

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, C): the vector the classifier sees (also the OOD gate's feature)."""
        return self.flatten(self.pool(self.act(self.feature_map(features))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(features))


class CxrNet(nn.Module):
    """Image (N, C, H, W) -> logits (N, n_outputs): ``head(backbone(x))``."""

    def __init__(self, backbone: nn.Module, head: ClassifierHead, architecture: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.architecture = architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, n_outputs), pooled features (N, C)) from one pass."""
        pooled = self.head.pooled(self.backbone(x))
        return self.head.fc(pooled), pooled


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
    #: key prefix of the backbone in the upstream (torchvision/timm) state dict, and the
    #: upstream classifier's name: used to load upstream or third-party checkpoints
    source_prefix: str = ""
    source_classifier: str | None = None
    #: () -> upstream ImageNet state dict (downloads; None when there is none)
    imagenet_weights: Callable[[], dict[str, torch.Tensor]] | None = None

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


def _sequential(net: nn.Module, names: tuple[str, ...]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))


def _torchvision_imagenet(name: str) -> Callable[[], dict[str, torch.Tensor]]:
    def load() -> dict[str, torch.Tensor]:
        # torchvision downloads to the torch hub cache and loads with weights_only=True.
        weights = torchvision.models.get_model_weights(name).DEFAULT
        return weights.get_state_dict(progress=False, check_hash=True)

    return load


def _densenet121() -> tuple[nn.Module, int]:
    net = torchvision.models.densenet121(weights=None)
    # torchvision's DenseNet forward applies F.relu(inplace=True) after `features`; our
    # head owns that ReLU instead, so the backbone is `features` alone (ends at norm5).
    return net.features, net.classifier.in_features


def _resnet50() -> tuple[nn.Module, int]:
    net = torchvision.models.resnet50(weights=None)
    return _sequential(net, ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")), net.fc.in_features


def _vgg16() -> tuple[nn.Module, int]:
    net = torchvision.models.vgg16(weights=None)
    # Up to conv5_3's ReLU (index 29): the last max-pool would halve the CAM resolution,
    # and global average pooling in the head replaces VGG's 4096-wide classifier.
    return net.features[:30], 512


_XCEPTION_CHILDREN = (
    "conv1", "bn1", "act1", "conv2", "bn2", "act2",
    *(f"block{i}" for i in range(1, 13)),
    "conv3", "bn3", "act3", "conv4", "bn4", "act4",
)


def _xception() -> tuple[nn.Module, int]:
    import timm  # imported here: only this architecture needs it

    net = timm.create_model("legacy_xception", pretrained=False, num_classes=0)
    return _sequential(net, _XCEPTION_CHILDREN), net.num_features


def _xception_imagenet() -> dict[str, torch.Tensor]:
    import timm

    return timm.create_model("legacy_xception", pretrained=True).state_dict()


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.MaxPool2d(2),
    )


def _cnn5() -> tuple[nn.Module, int]:
    """Five conv blocks (Arshad et al.'s binary custom model, sized for 224 px): 224 -> 7 px maps."""
    widths = (32, 64, 128, 256, 512)
    blocks, c_in = OrderedDict(), 3
    for i, c_out in enumerate(widths, start=1):
        blocks[f"block{i}"] = _conv_block(c_in, c_out)
        c_in = c_out
    return nn.Sequential(blocks), widths[-1]


register(
    Architecture(
        name="densenet121",
        build_backbone=_densenet121,
        head_activation=True,
        first_conv="conv0",
        # Lang et al.'s five-layer progression: stem, dense blocks, final norm.
        stages=("relu0", "denseblock1", "denseblock2", "denseblock3", "norm5"),
        description="DenseNet-121 (Huang et al. 2017), torchvision layout",
        source_prefix="features.",
        source_classifier="classifier",
        imagenet_weights=_torchvision_imagenet("densenet121"),
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
        source_classifier="fc",
        imagenet_weights=_torchvision_imagenet("resnet50"),
    )
)

register(
    Architecture(
        name="vgg16",
        build_backbone=_vgg16,
        head_activation=False,
        first_conv="0",
        stages=("3", "8", "15", "22", "29"),  # the ReLU closing each of the five conv blocks
        description="VGG-16 (Simonyan & Zisserman 2015) features with a global-average-pool head",
        source_prefix="features.",
        imagenet_weights=_torchvision_imagenet("vgg16"),
    )
)

register(
    Architecture(
        name="xception",
        build_backbone=_xception,
        head_activation=False,
        first_conv="conv1",
        stages=("act2", "block3", "block8", "block12", "act4"),
        default_input_size=299,
        description="Xception (Chollet 2017), timm legacy_xception layout",
        source_classifier="fc",
        imagenet_weights=_xception_imagenet,
    )
)

register(
    Architecture(
        name="cnn5",
        build_backbone=_cnn5,
        head_activation=False,
        first_conv="block1.0",
        stages=("block1", "block2", "block3", "block4", "block5"),
        description="Small custom CNN: five conv blocks (as in Arshad et al.'s binary custom model)",
    )
)


# --- Segmenters ---------------------------------------------------------------------------
#
# Networks that map a film to a per-pixel logit map, (N, C, H, W) -> (N, 1, H, W). They
# take no classifier head, so they are declared apart from the classifiers above.

SEGMENTERS: dict[str, Callable[[], nn.Module]] = {}


def _unet_resnet18() -> nn.Module:
    """U-Net (Ronneberger et al. 2015) on a ResNet-18's first four stages, one grey channel.

    segmentation-models-pytorch builds it; ResNet-18's fifth stage (layer4, 8.4 M of its
    11.7 M weights) is unused at ``encoder_depth=4`` but still built there, so it is
    replaced by an identity: 3.6 M weights, enough for lungs at 224 px.
    """
    import segmentation_models_pytorch as smp  # imported here: only the segmenter needs it

    net = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=1,
                   encoder_depth=4, decoder_channels=(128, 64, 32, 16))
    net.encoder.layer4 = nn.Identity()
    return net


SEGMENTERS["unet-resnet18"] = _unet_resnet18


def build_segmenter(architecture: str) -> nn.Module:
    """A randomly initialised segmenter (weights are loaded separately)."""
    try:
        return SEGMENTERS[architecture]()
    except KeyError:
        known = ", ".join(sorted(SEGMENTERS))
        raise UnknownArchitectureError(f"Unknown segmentation architecture {architecture!r}; known: {known}.") from None

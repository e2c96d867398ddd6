"""Initialise a network from ImageNet or from a checkpoint in someone else's layout.

Layouts understood (the first conv adapted between 1 and 3 input channels):

* ours (``backbone.*``, ``head.fc.*``: a model folder's safetensors);
* torchvision / timm (``features.conv0...`` for DenseNet and VGG, ``conv1``/``layer1`` for
  ResNet, timm's names for Xception);
* CheXNet (Rajpurkar et al.; arnoweng's release): ``module.densenet121.features...`` with the
  old torchvision names ``norm.1``/``conv.2``;
* torchxrayvision DenseNet: torchvision names with a 1-channel ``conv0`` and an ``op_threshs``
  buffer.

Reading never executes code: safetensors, or ``torch.load(weights_only=True)``, which
refuses pickled objects (a whole saved model) with a clear message here.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cxr_core.errors import CxrError
from cxr_core.models.architectures import Architecture, CxrNet, get_architecture

log = logging.getLogger(__name__)

_WRAPPERS = ("module.", "densenet121.", "model.", "net.")
_OLD_DENSENET = re.compile(r"\.(norm|relu|conv)\.(\d)\.")


class CheckpointError(CxrError):
    """A checkpoint that cannot be read or does not fit the architecture."""


@dataclass(frozen=True)
class InitReport:
    loaded: int  # backbone tensors taken from the checkpoint
    missing: tuple[str, ...]  # backbone tensors left at their random initialisation
    head_loaded: bool
    adapted_first_conv: str | None  # e.g. "1 -> 3 channels"


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a safetensors file or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path.name} is not a readable safetensors file.") from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path.name} holds pickled Python objects (e.g. a whole saved model), which are not loaded "
            "because unpickling can run code. Save its state_dict() instead, ideally as safetensors."
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint.") from exc
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path.name} does not hold a state dict of tensors.")
    return dict(data)


def _canonical(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for wrapper in _WRAPPERS:
            if key.startswith(wrapper):
                key = key[len(wrapper) :]
                changed = True
    # Pre-0.4 torchvision DenseNet names (CheXNet): "norm.1." -> "norm1."
    return _OLD_DENSENET.sub(lambda m: f".{m.group(1)}{m.group(2)}.", key)


def to_cxrnet_layout(state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """Rename upstream keys to ``backbone.*`` / ``head.fc.*``; unknown keys are dropped."""
    out: dict[str, torch.Tensor] = {}
    for raw_key, tensor in state.items():
        key = _canonical(raw_key)
        if key.startswith(("backbone.", "head.")):
            out[key] = tensor
        elif arch.source_classifier and key.startswith(arch.source_classifier + "."):
            leaf = key.rsplit(".", 1)[-1]
            out[f"head.fc.{leaf}"] = tensor
        elif key.startswith(arch.source_prefix):
            out["backbone." + key[len(arch.source_prefix) :]] = tensor
    return out


def _adapt_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    have = weight.shape[1]
    if have == channels:
        return weight
    if have == 1:
        # Grey replicated into C channels gives the same response when each copy gets w / C.
        return weight.repeat(1, channels, 1, 1) / channels
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise CheckpointError(f"Cannot adapt a first convolution from {have} to {channels} input channels.")


def _widen_head(mapped: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """A multi-class head with fewer outputs than the network fills its first rows.

    Fine-tuning a model with auxiliary classes (``TrainConfig.aux_classes``) gives the
    network the base model's classes first and the auxiliary ones after, so the base's
    rows keep their meaning; the new rows keep their random initialisation. Binary
    (one-logit) heads and wider heads are left to the shape check (not loaded).
    """
    weight, bias = mapped.get("head.fc.weight"), mapped.get("head.fc.bias")
    want = target.get("head.fc.weight")
    if weight is None or bias is None or want is None or weight.ndim != 2 or want.ndim != 2:
        return
    rows = weight.shape[0]
    if not (1 < rows < want.shape[0]) or weight.shape[1] != want.shape[1]:
        return
    wide_w, wide_b = want.clone(), target["head.fc.bias"].clone()
    wide_w[:rows], wide_b[:rows] = weight.to(wide_w.dtype), bias.to(wide_b.dtype)
    mapped["head.fc.weight"], mapped["head.fc.bias"] = wide_w, wide_b
    log.info("head widened from %d to %d outputs: the checkpoint's rows first, the rest as initialised", rows, want.shape[0])


def load_into(network: CxrNet, arch_name: str, state: dict[str, torch.Tensor]) -> InitReport:
    """Copy matching tensors of ``state`` (any known layout) into ``network``."""
    arch = get_architecture(arch_name)
    mapped = to_cxrnet_layout(state, arch)
    target = network.state_dict()
    first = f"backbone.{arch.first_conv}.weight"
    adapted = None
    if first in mapped and first in target and mapped[first].shape[1] != target[first].shape[1]:
        adapted = f"{mapped[first].shape[1]} -> {target[first].shape[1]} channels"
        mapped[first] = _adapt_conv(mapped[first], target[first].shape[1])
    _widen_head(mapped, target)
    usable: dict[str, torch.Tensor] = {}
    for key, tensor in mapped.items():
        if key in target and target[key].shape == tensor.shape:
            usable[key] = tensor.to(target[key].dtype)
    backbone_keys = [k for k in target if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    loaded = [k for k in backbone_keys if k in usable]
    if len(loaded) < 0.9 * len(backbone_keys):
        raise CheckpointError(
            f"The checkpoint does not fit {arch_name}: only {len(loaded)} of {len(backbone_keys)} backbone tensors match."
        )
    network.load_state_dict(usable, strict=False)
    head_loaded = "head.fc.weight" in usable
    missing = tuple(k for k in backbone_keys if k not in usable)
    log.info("initialised %s: %d backbone tensors, head %s, first conv %s", arch_name, len(loaded), head_loaded, adapted or "as is")
    return InitReport(len(loaded), missing, head_loaded, adapted)


def initialise(network: CxrNet, arch_name: str, init: str) -> InitReport:
    """``init`` is "imagenet" (downloaded from torchvision/timm) or a checkpoint path."""
    arch = get_architecture(arch_name)
    if init == "imagenet":
        if arch.imagenet_weights is None:
            raise CheckpointError(f"No ImageNet weights are published for {arch_name}; use --init random.")
        try:
            state = arch.imagenet_weights()
        except (OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"ImageNet weights for {arch_name} could not be downloaded ({type(exc).__name__}); "
                "this machine may be offline. Use --init random or a local checkpoint file."
            ) from exc
    else:
        state = read_checkpoint(init)
    return load_into(network, arch_name, state)

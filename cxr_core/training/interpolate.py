"""Weight-space interpolation between a fine-tuned network and the network it started from.

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022, WiSE-FT): a fine-tune from
a shared start stays in one basin of the loss, so the straight line between the two weight sets
holds networks that keep much of what the fine-tune learned and much of what the start knew. A
site adaptation exports θ = (1 − α)·θ_base + α·θ_adapted; its temperature and threshold are then
chosen on validation like any other export (cxr_core.training.finalize).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cxr_core.models.architectures import CxrNet

log = logging.getLogger(__name__)


def interpolate_weights(network: CxrNet, base_weights: Path | str, alpha: float) -> CxrNet:
    """``network`` with every floating-point tensor (parameters and batch-norm statistics) set to
    ``(1 - alpha) * base + alpha * network``; integer buffers (batch counters) stay the network's.

    ``base_weights``: a safetensors file holding exactly ``network``'s architecture and outputs (a
    model folder's weights). ``alpha`` in [0, 1]: 1 returns ``network`` unchanged, 0 the base model.
    Raises ValueError when the base does not fit ``network`` tensor for tensor.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: need 0 <= alpha <= 1")
    if alpha == 1.0:
        return network
    from cxr_core.training.init import read_checkpoint

    base = read_checkpoint(base_weights)
    own = network.state_dict()
    wrong = sorted(k for k, v in own.items() if k not in base or tuple(base[k].shape) != tuple(v.shape))
    if wrong:
        raise ValueError(f"{Path(base_weights).name} does not match the network to interpolate ({len(wrong)} tensors differ, e.g. {wrong[0]})")
    mixed = {}
    for name, value in own.items():
        if value.is_floating_point():
            start = base[name].to(value.device, torch.float32)
            mixed[name] = (start + alpha * (value.float() - start)).to(value.dtype)
        else:
            mixed[name] = value
    network.load_state_dict(mixed)
    log.info("weights interpolated toward %s: alpha %.2f of the fine-tuned weights", Path(base_weights).name, alpha)
    return network

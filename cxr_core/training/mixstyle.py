"""MixStyle: mix the feature statistics of films within a batch while training.

Zhou et al., "Domain Generalization with MixStyle" (ICLR 2021). In a CNN's early layers
the per-channel mean and spread of a feature map (over its spatial positions) carry
much of an image's "style": exposure, processing, detector texture. Here those are
exactly what tells the shared data's collections apart, and so COVID-19 from the rest.
Each training forward pass, with probability ``p``, replaces the statistics of every
film at the chosen stages by a random convex mix of its own and those of another film
of the batch (whatever its class), so the label can no longer be read from them.

Hooks only: nothing is added to the network's state, inference is unchanged, and the
hooks are removed when the ``with`` block ends (as pytorch-grad-cam releases its own).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Beta(alpha, alpha) for the mixing weight: 0.1 (the paper's) puts most draws near 0 or
#: 1, so a film mostly keeps its own statistics or mostly takes the other's
ALPHA = 0.1
#: added to the variance before the square root (the paper's)
EPS = 1e-6


def channel_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> (mean, spread), each (N, C, 1, 1) float32: the "style" MixStyle mixes
    (and scripts/probe_style.py transplants), over each feature map's spatial positions."""
    x = features.float()
    return x.mean(dim=(2, 3), keepdim=True), (x.var(dim=(2, 3), keepdim=True) + EPS).sqrt()


def restyle(features: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W): each film's channel statistics replaced by ``mean`` and ``spread``
    ((N or 1, C, 1, 1)), the spatial pattern kept: a style transplant (scripts/probe_style.py and
    the experiments built on it). Computed in float32, returned in the input's dtype."""
    x = features.float()
    mu, sigma = channel_statistics(x)
    return ((x - mu) / sigma * spread.to(x.device) + mean.to(x.device)).to(features.dtype)


def mix_styles(features: torch.Tensor, generator: torch.Generator, alpha: float = ALPHA) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W): each film's channel statistics mixed with another's.

    The statistics are detached (as in the paper): the network is not trained through
    the mixing weights. Computed in float32 whatever the autocast dtype.
    """
    n = features.shape[0]
    x = features.float()
    mu, sigma = (t.detach() for t in channel_statistics(x))
    normed = (x - mu) / sigma
    # Drawn on the CPU (the generator's device), used where the features are.
    lam = _beta(n, alpha, generator).to(x.device)
    perm = torch.randperm(n, generator=generator).to(x.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return (normed * sigma_mix + mu_mix).to(features.dtype)


def _beta(n: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, 1, 1) draws of Beta(alpha, alpha), reproducible from ``generator``.

    torch's Beta sampler takes no generator, so it runs on the global RNG forked and
    seeded from ``generator``: a run replays exactly and the global stream is untouched.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(alpha, alpha).sample((n, 1, 1, 1))


@contextmanager
def mixing_styles(network: nn.Module, layers: tuple[str, ...], p: float, generator: torch.Generator) -> Iterator[None]:
    """While the block runs, the outputs of ``layers`` (dotted paths from ``network``) are
    style-mixed with probability ``p`` per forward pass, in training mode only.

    One draw per forward pass decides for every layer at once (the paper's "random" mix).
    """
    if p <= 0 or not layers:
        yield
        return
    state = {"on": False}

    def pre_hook(module: nn.Module, args: tuple) -> None:
        state["on"] = module.training and bool(torch.rand((), generator=generator) < p)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not (module.training and state["on"]) or output.shape[0] < 2:
            return None
        return mix_styles(output, generator)

    handles = [network.register_forward_pre_hook(pre_hook)]
    handles += [network.get_submodule(path).register_forward_hook(hook) for path in layers]
    log.info("MixStyle p=%.2f at %s", p, ", ".join(layers))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

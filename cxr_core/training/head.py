"""Refit a trained network's last linear layer on pooled features, balanced across sources.

Deep feature reweighting (Kirichenko, Izmailov and Wilson, ICLR 2023): the backbone's features
are kept and only ``head.fc`` is refitted on a set in which the groups a spurious cue separates
(here the collections the films came from) carry equal weight. It runs in seconds on features
extracted once, so candidates can be compared by leave-one-source-out validation.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr_core.errors import ModelError
from cxr_core.models.loading import load_model, save_model_folder
from cxr_core.models.manifest import Manifest

log = logging.getLogger(__name__)

#: target of a film known not to be COVID-19 but of none of a softmax head's classes
NOT_POSITIVE = -1


@dataclass(frozen=True)
class LinearHead:
    """``logits = features @ weight.T + bias``: weight (K, C), bias (K,)."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, C) features -> (N, K) logits."""
        return features.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64)


def group_weights(is_positive: np.ndarray, groups: Sequence[str], positive_share: float = 0.5) -> np.ndarray:
    """(N,) weights summing to 1: positive films carry ``positive_share`` of the total, and each
    group of the other films (e.g. "source/label") an equal part of the rest."""
    is_positive = np.asarray(is_positive, dtype=bool)
    groups = np.asarray(groups)
    weights = np.zeros(len(groups), dtype=np.float64)
    if is_positive.any():
        weights[is_positive] = positive_share / is_positive.sum()
    negative_groups = sorted(set(groups[~is_positive]))
    for group in negative_groups:
        members = (groups == group) & ~is_positive
        weights[members] = (1.0 - positive_share if is_positive.any() else 1.0) / len(negative_groups) / members.sum()
    return weights / weights.sum()


def direction_projection(means: np.ndarray) -> np.ndarray:
    """(C, C) projection removing the span of the differences between the rows of ``means`` (G, C)."""
    differences = means[1:] - means[:1]
    basis, _ = np.linalg.qr(differences.T)  # (C, G-1), orthonormal columns
    return np.eye(means.shape[1]) - basis @ basis.T


def fit_linear_head(
    features: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    start: LinearHead,
    *,
    head: str,
    l2: float,
    positive_index: int = 0,
    max_iter: int = 300,
) -> LinearHead:
    """Refit a linear head by weighted maximum likelihood with an L2 pull toward ``start``.

    ``features`` (N, C); ``targets`` (N,): a class index, or :data:`NOT_POSITIVE` for a film known
    not to be the positive class but of none of the head's classes (loss -log(1 - p(positive))).
    A sigmoid head (one output, for ``classes[positive_index]``) takes 1 for positive, 0 otherwise.
    ``l2`` weighs ``||W - W0||² + ||b - b0||²`` against the weighted mean loss.
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    w = torch.as_tensor(weights / np.sum(weights), dtype=torch.float64)
    w0 = torch.as_tensor(start.weight, dtype=torch.float64)
    b0 = torch.as_tensor(start.bias, dtype=torch.float64)
    weight = w0.clone().requires_grad_(True)
    bias = b0.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
    known = y >= 0

    def loss_fn() -> torch.Tensor:
        logits = x @ weight.T + bias
        if head == "sigmoid":
            per_film = F.binary_cross_entropy_with_logits(logits[:, 0], y.double(), reduction="none")
        else:
            log_p = torch.log_softmax(logits, dim=1)
            per_film = torch.zeros(len(y), dtype=torch.float64)
            per_film[known] = -log_p[known, y[known]]
            # log(1 - p_pos) = logsumexp over the other classes' log-probabilities
            others = torch.cat([log_p[~known, :positive_index], log_p[~known, positive_index + 1:]], dim=1)
            per_film[~known] = -torch.logsumexp(others, dim=1)
        return (w * per_film).sum() + l2 * (((weight - w0) ** 2).sum() + ((bias - b0) ** 2).sum())

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        log.info("head refitted: loss %.4f (l2 %.3g)", float(loss_fn()), l2)
    return LinearHead(weight.detach().numpy().copy(), bias.detach().numpy().copy())


def write_refitted_folder(
    base: Path | str,
    out: Path | str,
    head: LinearHead,
    *,
    version: str,
    temperature: float,
    threshold: float,
    training: Mapping[str, Any],
    training_data: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> Manifest:
    """A new model folder: ``base``'s network with ``head`` as ``head.fc``, its calibration, and
    ``base``'s out-of-distribution gate (the backbone, hence the pooled features, is unchanged).

    ``head.weight`` is (n_outputs, C) for ``base``'s architecture. The card is written from the
    manifest (:func:`cxr_core.training.finalize.refresh_model_card`) by the caller.
    """
    base, out = Path(base), Path(out)
    model = load_model(base, device="cpu")
    fc = model.network.head.fc
    if tuple(fc.weight.shape) != head.weight.shape:
        raise ModelError(f"{base.name}: a head of shape {head.weight.shape} does not fit {tuple(fc.weight.shape)}.")
    with torch.no_grad():
        fc.weight.copy_(torch.as_tensor(head.weight, dtype=fc.weight.dtype))
        fc.bias.copy_(torch.as_tensor(head.bias, dtype=fc.bias.dtype))
    positive = model.manifest.classes[0]
    manifest = replace(
        model.manifest, version=version, created="", temperature=round(float(temperature), 4),
        thresholds={positive: round(float(threshold), 4)}, training=dict(training),
        training_data=dict(training_data), metrics=dict(metrics),
    )
    if model.manifest.ood:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(base / str(model.manifest.ood["file"]), out / str(model.manifest.ood["file"]))
    written = save_model_folder(model.network, manifest, out)
    log.info("wrote %s: %s's network with a refitted head", out, model.manifest.key)
    return written

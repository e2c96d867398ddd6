"""Temperature scaling (Guo et al. 2017) and the sensitivity-first decision threshold."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float, head: str) -> float:
    scaled = logits / temperature
    if head == "sigmoid":
        # classes[0] is the positive class: label 0 means target 1 for the single logit.
        return float(F.binary_cross_entropy_with_logits(scaled[:, 0], (labels == 0).float()))
    return float(F.cross_entropy(scaled, labels))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, head: str) -> float:
    """The temperature T > 0 minimising validation NLL of ``logits / T``.

    A log-spaced grid then a finer one around the best point: one parameter, so a
    search is exact enough and, unlike LBFGS, cannot wander off on a flat loss.
    """
    x = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    losses = [_nll(x, y, t, head) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fine = np.linspace(lo, hi, 81)
    losses = [_nll(x, y, t, head) for t in fine]
    return float(fine[int(np.argmin(losses))])


def choose_threshold(positive_probability: np.ndarray, is_positive: np.ndarray, target_sensitivity: float, cap: float = 0.5) -> float:
    """Largest threshold whose sensitivity on these (validation) cases is >= target, at most ``cap``.

    The cap keeps the rule no stricter than "call it when it is the likelier answer"
    when the model is already sensitive enough; below it, the threshold trades
    specificity for the stated sensitivity.
    """
    scores = np.sort(np.asarray(positive_probability, dtype=np.float64)[np.asarray(is_positive, dtype=bool)])
    if scores.size == 0:
        raise ValueError("no positive cases to choose a threshold on")
    # Calling every case with p >= scores[m] catches the n - m highest positives.
    allowed_misses = int(np.floor((1.0 - target_sensitivity) * scores.size + 1e-9))
    threshold = float(scores[allowed_misses])
    # Manifests hold thresholds in the open interval (0, 1).
    return float(min(max(threshold, 1e-4), cap))

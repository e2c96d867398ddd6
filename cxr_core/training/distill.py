"""Learning without forgetting: keep a fine-tuned network's answers near the model it started from.

Li and Hoiem, "Learning without Forgetting", TPAMI 40 (2018); the term is Hinton et al.'s
distillation loss ("Distilling the knowledge in a neural network", 2015): the KL divergence from
the teacher's class probabilities to the student's, both at temperature T, times T² so that its
gradients keep their scale as T changes. A site adaptation adds it on every film it trains on, so
what the public collections taught (including a class the site has no film of) is pulled back
towards the base model's view while the site's films move the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from cxr_core.models.architectures import CxrNet, build_network

TEMPERATURE = 2.0


def load_teacher(arch: str, n_outputs: int, weights: Path | str, device: torch.device) -> CxrNet:
    """The frozen model in ``weights`` (a model folder's safetensors), in eval mode on ``device``."""
    from cxr_core.training.init import load_into, read_checkpoint

    state = read_checkpoint(weights)
    head = state.get("head.fc.weight")
    teacher = build_network(arch, n_outputs)
    report = load_into(teacher, arch, state)
    # Exactly the model's own head: a narrower one would be widened with random rows (fine-tuning's rule, not ours).
    if head is None or head.shape[0] != n_outputs or not report.head_loaded or report.missing:
        raise ValueError(f"{Path(weights).name} does not hold every weight of a {arch} with {n_outputs} outputs to distil from")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _grouped(log_p: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """(N, K) log-probabilities -> (N, len(kept) + 1): the kept classes, then all the others as one."""
    rest = [i for i in range(log_p.shape[1]) if i not in set(kept)]
    return torch.cat([log_p[:, list(kept)], torch.logsumexp(log_p[:, rest], dim=1, keepdim=True)], dim=1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, head: str, weights: torch.Tensor | None = None,
                      temperature: float = TEMPERATURE, classes: Sequence[int] | None = None) -> torch.Tensor:
    """Mean (or ``weights``-weighted mean) over films of T² · KL(teacher ‖ student) at temperature T.

    ``student`` (N, K + A) logits, of which the first K are the model's classes (A auxiliary outputs
    are ignored: the exported model renormalises over its K classes); ``teacher`` (N, K) logits of the
    model being kept. A sigmoid head (K = 1) compares the two Bernoulli distributions.
    ``classes`` (softmax only): compare only the probabilities of these class indices, every other
    class pooled into one outcome, so the student is free to move probability among the others
    (a site adaptation keeps the base model's view of the classes the site has no films of).
    """
    k = teacher.shape[1]
    s = student[:, :k].float() / temperature
    t = teacher.float() / temperature
    if classes is not None:
        if head == "sigmoid" or not 0 < len(classes) < k:
            raise ValueError("classes: some, not all, of a softmax head's classes")
        log_p = _grouped(F.log_softmax(t, dim=1), classes)
        per_film = (log_p.exp() * (log_p - _grouped(F.log_softmax(s, dim=1), classes))).sum(dim=1)
    elif head == "sigmoid":
        p = torch.sigmoid(t[:, 0])
        # KL of Bernoullis = cross-entropy(p, q) - entropy(p); the entropy has no gradient but keeps the value a KL.
        per_film = (F.binary_cross_entropy_with_logits(s[:, 0], p, reduction="none")
                    - F.binary_cross_entropy_with_logits(t[:, 0], p, reduction="none"))
    else:
        log_p = F.log_softmax(t, dim=1)
        per_film = (log_p.exp() * (log_p - F.log_softmax(s, dim=1))).sum(dim=1)
    per_film = per_film * temperature**2
    if weights is None:
        return per_film.mean()
    return (per_film * weights).sum() / weights.sum()

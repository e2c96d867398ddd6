"""A classifier's own out-of-distribution check, stored in its model folder (``ood.safetensors``).

The class-conditional Mahalanobis distance (Lee et al. 2018) of the pooled features, in the
top principal components of the training features, to the nearest class mean; thresholds
come from the validation films' distances. The input gate (:mod:`cxr_core.imaging.gate`) combines it
with the film's metadata, appearance and quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cxr_core.errors import ModelError
from cxr_core.fileio import sha256_file


@dataclass(frozen=True, eq=False)
class FeatureGate:
    """Class-conditional Mahalanobis distance in a PCA subspace of the pooled features."""

    center: np.ndarray  # (C,) mean of training features
    components: np.ndarray  # (C, D) principal axes
    class_means: np.ndarray  # (K, D) in the subspace
    precision: np.ndarray  # (D, D) inverse of the shared within-class covariance
    warn: float
    reject: float

    def distances(self, pooled: np.ndarray) -> np.ndarray:
        """(N, C) pooled features -> (N,) distance to the nearest class mean."""
        z = (np.asarray(pooled, np.float64) - self.center) @ self.components
        diffs = z[:, None, :] - self.class_means[None, :, :]  # (N, K, D)
        d2 = np.einsum("nkd,de,nke->nk", diffs, self.precision, diffs)
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))

    def save(self, path: Path) -> None:
        tensors = {
            "center": torch.from_numpy(self.center.astype(np.float32)),
            "components": torch.from_numpy(self.components.astype(np.float32)),
            "class_means": torch.from_numpy(self.class_means.astype(np.float32)),
            "precision": torch.from_numpy(self.precision.astype(np.float32)),
            "thresholds": torch.tensor([self.warn, self.reject], dtype=torch.float64),
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: Path) -> "FeatureGate":
        t = load_file(str(path))
        warn, reject = (float(v) for v in t["thresholds"])
        return cls(
            t["center"].double().numpy(), t["components"].double().numpy(), t["class_means"].double().numpy(),
            t["precision"].double().numpy(), warn, reject,
        )


def fit_feature_gate(
    train_pooled: np.ndarray,
    train_labels: np.ndarray,
    val_pooled: np.ndarray,
    *,
    dims: int = 128,
    warn_quantile: float = 0.99,
    reject_quantile: float = 0.999,
    reject_margin: float = 1.2,
) -> FeatureGate:
    """Fit on training features; thresholds from validation films (chest films by construction).

    Warning above the ``warn_quantile`` of validation distances; rejection above
    ``reject_margin`` x their ``reject_quantile``, so that ordinary chest films from a
    shifted source are warned about rather than turned away.
    """
    x = np.asarray(train_pooled, np.float64)
    center = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - center, full_matrices=False)
    dims = min(dims, vt.shape[0])
    components = vt[:dims].T  # (C, D)
    z = (x - center) @ components
    labels = np.asarray(train_labels)
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(axis=0) for c in classes])
    within = z - means[np.searchsorted(classes, labels)]
    covariance = np.cov(within, rowvar=False)
    # Ledoit-Wolf-style shrinkage towards a scaled identity keeps the inverse stable.
    shrink = 0.1
    covariance = (1 - shrink) * covariance + shrink * np.trace(covariance) / dims * np.eye(dims)
    precision = np.linalg.inv(covariance)
    gate = FeatureGate(center, components, means, precision, 0.0, 0.0)
    val = gate.distances(val_pooled)
    warn = float(np.quantile(val, warn_quantile))
    reject = float(np.quantile(val, reject_quantile) * reject_margin)
    return FeatureGate(center, components, means, precision, warn, max(reject, warn))


def load_gate_for(folder: Path, ood: dict[str, object]) -> FeatureGate | None:
    """The folder's fitted gate, verified against the manifest's digest; None when none is fitted."""
    name = str(ood.get("file") or "")
    if not name:
        return None
    path = folder / name
    if Path(name).name != name or not path.is_file():
        raise ModelError(f"{folder.name}: the OOD gate file {name!r} is missing.")
    if sha256_file(path) != ood.get("sha256"):
        raise ModelError(f"{folder.name}: the OOD gate file does not match its manifest.")
    return FeatureGate.load(path)

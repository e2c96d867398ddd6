"""Fit a model's out-of-distribution gate on its training data and store it in the model folder."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cxr_core.fileio import sha256_file
from cxr_core.imaging.preprocess import normalise, to_network_input
from cxr_core.models.feature_gate import fit_feature_gate
from cxr_core.models.loading import LoadedModel, load_model, update_manifest
from cxr_core.models.manifest import Manifest
from cxr_core.training.augment import acquire
from cxr_core.training.prepare import PreparedData

log = logging.getLogger(__name__)

GATE_FILE = "ood.safetensors"


def pooled_features(model: LoadedModel, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, C) pooled features of uint8 films (N, S, S) already at the model's input size."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            x = to_network_input(normalise(torch.from_numpy(pixels[start : start + batch_size])), model.manifest.input)
            out.append(model.network.forward_with_features(x.to(model.device))[1].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def processed_copies(pixels: np.ndarray, probability: float, seed: int = 0) -> np.ndarray:
    """(N, S, S) uint8 films -> the same films as another site's equipment might have left them
    (each of :func:`acquire`'s steps drawn with ``probability``: frame, CLAHE, box, lower
    resolution, JPEG), reproducibly from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    out = np.empty_like(pixels)
    for start in range(0, len(pixels), 256):
        chunk = torch.from_numpy(pixels[start : start + 256]).float().div(255.0).unsqueeze(1)
        out[start : start + 256] = (acquire(chunk, probability, generator)[:, 0] * 255.0 + 0.5).clamp(0, 255).byte().numpy()
    return out


def fit_gate(folder: Path | str, data: PreparedData, read_test: bool = True, processing: float = 0.0) -> Manifest:
    """Fit on ``data.train``, set thresholds on ``data.val``; report the test split's outcome rates
    unless ``read_test`` is False (a test split sealed at training stays unread).

    ``processing`` > 0 adds a processed copy of every training film to the fit (see
    :func:`processed_copies`), so that a chest film processed the way another hospital processes
    its films is not taken for a stranger to the model: the covariance then spans those changes
    too. The thresholds still come from the validation films as they are."""
    if not 0.0 <= processing <= 1.0:
        raise ValueError("processing is a probability, 0 to 1")
    folder = Path(folder)
    model = load_model(folder)
    size = model.manifest.input.size[0]
    classes = {c: i for i, c in enumerate(model.manifest.classes)}
    films = data.train.resized(size)
    n_films = len(films)
    train = pooled_features(model, films)
    labels = np.array([classes[r.label] for r in data.train.records])
    if processing > 0:
        train = np.concatenate([train, pooled_features(model, processed_copies(films, processing))])
        labels = np.concatenate([labels, labels])
    val = pooled_features(model, data.val.resized(size))
    gate = fit_feature_gate(train, labels, val)
    gate.save(folder / GATE_FILE)
    record: dict[str, object] = {
        "file": GATE_FILE,
        "sha256": sha256_file(folder / GATE_FILE),
        "method": "class-conditional Mahalanobis distance, 128 principal components of the pooled features",
        "warn": round(gate.warn, 3),
        "reject": round(gate.reject, 3),
        "fitted_on": {"train": n_films, **({"train_processed_copies": n_films} if processing > 0 else {}), "val": len(val)},
    }
    if processing > 0:
        record["processing"] = processing
    if read_test and data.test is not None and len(data.test.records):
        test = gate.distances(pooled_features(model, data.test.resized(size)))
        record["test_rates"] = {"warned_or_rejected": round(float(np.mean(test > gate.warn)), 4), "rejected": round(float(np.mean(test > gate.reject)), 4), "n": len(test)}
    manifest = update_manifest(folder, replace(model.manifest, ood=record))
    log.info("gate for %s: warn > %.2f, reject > %.2f", manifest.key, gate.warn, gate.reject)
    return manifest

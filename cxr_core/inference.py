"""Class probabilities for one or many images, batched, under ``torch.inference_mode``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from cxr_core.io import XrayImage
from cxr_core.manifest import Manifest
from cxr_core.models import LoadedModel
from cxr_core.preprocess import to_batch

DISCLAIMER = (
    "Decision support only: this result is not a diagnosis and must be interpreted by a "
    "qualified clinician together with the clinical picture and other findings."
)


@dataclass(frozen=True)
class Prediction:
    """One image's result. ``probabilities`` follow ``classes`` (the model's output order)."""

    model: str  # "id@version"
    model_name: str
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    predicted: str | None
    thresholds: Mapping[str, float] = field(default_factory=dict)

    def probability(self, cls: str) -> float:
        return self.probabilities[self.classes.index(cls)]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.classes, self.probabilities))


def logits_to_probabilities(logits: torch.Tensor, manifest: Manifest) -> np.ndarray:
    """(N, n_outputs) logits -> (N, n_classes) temperature-scaled probabilities, float64."""
    scaled = logits.float() / manifest.temperature
    if manifest.head == "sigmoid":
        positive = torch.sigmoid(scaled[:, 0])
        probs = torch.stack([positive, 1.0 - positive], dim=1)
    else:
        probs = torch.softmax(scaled, dim=1)
    return probs.cpu().double().numpy()


def decide(probabilities: Sequence[float], manifest: Manifest) -> str:
    """The predicted class.

    A class with a decision threshold (the COVID threshold, chosen on validation for a
    stated sensitivity) wins whenever its probability reaches the threshold; otherwise
    the most probable of the remaining classes. For a binary head the positive class's
    threshold defaults to 0.5.
    """
    probs = dict(zip(manifest.classes, probabilities))
    thresholds = dict(manifest.thresholds)
    if manifest.head == "sigmoid":
        positive = manifest.classes[0]
        return positive if probs[positive] >= thresholds.get(positive, 0.5) else manifest.classes[1]
    for cls, threshold in sorted(thresholds.items(), key=lambda kv: -probs[kv[0]]):
        if probs[cls] >= threshold:
            return cls
    remaining = [c for c in manifest.classes if c not in thresholds] or list(manifest.classes)
    return max(remaining, key=lambda c: probs[c])


def make_prediction(manifest: Manifest, probabilities: Sequence[float]) -> Prediction:
    values = tuple(float(p) for p in probabilities)
    return Prediction(
        model=manifest.key,
        model_name=manifest.name,
        classes=manifest.classes,
        probabilities=values,
        predicted=decide(values, manifest),
        thresholds=dict(manifest.thresholds),
    )


def _chunks(items: Sequence[XrayImage], size: int) -> Iterator[Sequence[XrayImage]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_logits(model: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) normalised input -> (N, n_outputs) logits on CPU."""
    with torch.inference_mode():
        return model.network(batch.to(model.device)).float().cpu()


def predict(model: LoadedModel, images: Iterable[XrayImage], batch_size: int = 16) -> list[Prediction]:
    """Predictions for ``images``, in order, ``batch_size`` images per forward pass."""
    images = list(images)
    results: list[Prediction] = []
    for chunk in _chunks(images, max(1, batch_size)):
        batch = to_batch([im.pixels for im in chunk], model.manifest.input)
        probs = logits_to_probabilities(predict_logits(model, batch), model.manifest)
        results.extend(make_prediction(model.manifest, row) for row in probs)
    return results

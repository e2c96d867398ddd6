"""Class probabilities for one or many images, batched, under ``torch.inference_mode``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.gate import ACCEPTED, GateResult, judge
from cxr_core.imaging.preprocess import to_batch
from cxr_core.imaging.quality import assess_quality
from cxr_core.models.loading import LoadedModel
from cxr_core.models.manifest import Manifest

DISCLAIMER = (
    "Decision support only: this result is not a diagnosis and must be interpreted by a "
    "qualified clinician together with the clinical picture and other findings."
)


#: Say "uncertain" rather than name a class when the top calibrated probability is below
#: this, or (multi-class) the top two are closer than the margin. A manifest's
#: ``abstention`` overrides.
DEFAULT_MIN_PROBABILITY = 0.6
DEFAULT_MIN_MARGIN = 0.15


@dataclass(frozen=True)
class Prediction:
    """One image's result. ``probabilities`` follow ``classes`` (the model's output order).

    ``decision`` is what the decision rule picks; ``predicted`` is what may be shown as the
    answer: None when the gate rejected the image or the model is uncertain.
    """

    model: str  # "id@version"
    model_name: str
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    predicted: str | None
    thresholds: Mapping[str, float] = field(default_factory=dict)
    decision: str | None = None
    uncertain: bool = False
    gate: GateResult | None = None
    #: the decision was made by a class's own threshold (e.g. COVID at a sensitivity-first
    #: threshold), possibly while another class is more probable
    by_threshold: bool = False

    def probability(self, cls: str) -> float:
        return self.probabilities[self.classes.index(cls)]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.classes, self.probabilities))

    @property
    def most_probable(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]

    @property
    def gate_outcome(self) -> str:
        return self.gate.outcome if self.gate is not None else ACCEPTED


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


def called_by_threshold(probabilities: Sequence[float], manifest: Manifest) -> bool:
    """Whether the decision comes from a class reaching its own manifest threshold."""
    decision = decide(probabilities, manifest)
    threshold = manifest.thresholds.get(decision)
    return threshold is not None and probabilities[manifest.classes.index(decision)] >= threshold


def abstention_rule(manifest: Manifest) -> tuple[float, float]:
    """(min_probability, min_margin) of the model's "uncertain" rule: its manifest's, else the defaults."""
    return (manifest.abstention.get("min_probability", DEFAULT_MIN_PROBABILITY),
            manifest.abstention.get("min_margin", DEFAULT_MIN_MARGIN))


def is_uncertain(probabilities: Sequence[float], manifest: Manifest) -> bool:
    """Top probability below the floor, or the top two too close to call."""
    floor, margin = abstention_rule(manifest)
    ranked = sorted(probabilities, reverse=True)
    return ranked[0] < floor or (len(ranked) > 2 and ranked[0] - ranked[1] < margin)


def make_prediction(manifest: Manifest, probabilities: Sequence[float], gate: GateResult | None = None) -> Prediction:
    values = tuple(float(p) for p in probabilities)
    decision = decide(values, manifest)
    # A call made at a sensitivity-first threshold (COVID at p >= 0.24, say) is never hidden
    # as "uncertain": the threshold exists because a missed case costs more than a false
    # alarm, and the model card's sensitivity counts these calls as made.
    by_threshold = called_by_threshold(values, manifest)
    uncertain = not by_threshold and is_uncertain(values, manifest)
    rejected = gate is not None and gate.rejected
    return Prediction(
        model=manifest.key,
        model_name=manifest.name,
        classes=manifest.classes,
        probabilities=values,
        predicted=None if (rejected or uncertain) else decision,
        thresholds=dict(manifest.thresholds),
        decision=decision,
        uncertain=uncertain,
        gate=gate,
        by_threshold=by_threshold,
    )


def call_headline(prediction: Prediction, manifest: Manifest) -> str:
    """The answer in one markdown line, for a prediction that names a class.

    A call made by a class's sensitivity-first threshold while another class is more
    probable reads as a flag for review, with the threshold and the more probable class
    beside it, so that "COVID-19 (p = 0.30)" is not read as the model's best guess.
    """
    called = prediction.predicted
    if called is None:
        raise ValueError("this prediction names no class (uncertain or rejected)")
    p = prediction.probability(called)
    top = prediction.most_probable
    if prediction.by_threshold and called != top:
        return (
            f"**Prediction: {manifest.label(called)} flagged for review** (p = {p:.2f}, at or above its threshold "
            f"{manifest.thresholds[called]:.2f}, set for sensitivity); most probable: **{manifest.label(top)}** "
            f"(p = {prediction.probability(top):.2f})"
        )
    return f"**Prediction: {manifest.label(called)}** (p = {p:.3f})"


def _chunks(items: Sequence[XrayImage], size: int) -> Iterator[Sequence[XrayImage]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _on_device(model: LoadedModel, batch: torch.Tensor) -> tuple[torch.Tensor, torch.autocast]:
    """The batch moved to the model's device, and the autocast to run it under: bf16 with
    channels_last on CUDA (tensor cores; outputs are cast back to float32 before softmax),
    full float32 on CPU, where bf16 is slower and changes the figures."""
    cuda = model.device.type == "cuda"
    x = batch.to(model.device, non_blocking=cuda)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=cuda)


def predict_logits(model: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) normalised input -> (N, n_outputs) logits on CPU."""
    x, autocast = _on_device(model, batch)
    with torch.inference_mode(), autocast:
        return model.network(x).float().cpu()


def predict_with_features(model: LoadedModel, batch: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(logits (N, n_outputs), pooled features (N, C) as numpy), both on CPU, from one pass."""
    x, autocast = _on_device(model, batch)
    with torch.inference_mode(), autocast:
        logits, pooled = model.network.forward_with_features(x)
        return logits.float().cpu(), pooled.float().cpu().numpy()


def lung_objections(images: Sequence[XrayImage]) -> list[str | None]:
    """The lung segmenter's objection to each film (cxr_core.imaging.lungs.implausible_lungs); all None when it is not installed."""
    from cxr_core.imaging.lungs import implausible_lungs, load_default_segmenter, lung_views

    segmenter = load_default_segmenter()
    if segmenter is None or not images:
        return [None] * len(images)
    return [implausible_lungs(view, segmenter) for view in lung_views([im.pixels for im in images], segmenter)]


def gate_images(model: LoadedModel, images: Sequence[XrayImage], pooled: np.ndarray) -> list[GateResult]:
    distances = model.feature_gate.distances(pooled) if model.feature_gate is not None else [None] * len(images)
    lungs = lung_objections(images)
    return [
        judge(im.metadata, None if d is None else float(d), model.feature_gate, assess_quality(im), lung)
        for im, d, lung in zip(images, distances, lungs)
    ]


def predict(model: LoadedModel, images: Iterable[XrayImage], batch_size: int = 16) -> list[Prediction]:
    """Predictions for ``images``, in order, ``batch_size`` images per forward pass, each gated."""
    images = list(images)
    results: list[Prediction] = []
    for chunk in _chunks(images, max(1, batch_size)):
        batch = to_batch([im.pixels for im in chunk], model.manifest.input)
        logits, pooled = predict_with_features(model, batch)
        probs = logits_to_probabilities(logits, model.manifest)
        gates = gate_images(model, chunk, pooled)
        results.extend(make_prediction(model.manifest, row, gate) for row, gate in zip(probs, gates))
    return results

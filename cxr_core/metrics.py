"""Classification metrics from labels and probabilities, overall and per source.

Predictions follow the deployed decision rule (:func:`cxr_core.inference.decide`:
thresholds included), so the figures describe what a user would see. AUROC and ECE
use the probabilities themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float  # sensitivity
    specificity: float
    f1: float
    n: int


@dataclass(frozen=True)
class Abstention:
    """How the app's "uncertain" rule behaves on a labelled set: the share of films it
    names a class for, and accuracy on those against the films it abstains on."""

    answered: float  # share of films given a class, 0..1
    accuracy_answered: float | None  # None when nothing was answered
    accuracy_abstained: float | None  # of the decision it withheld; None when it never abstained
    n_abstained: int

    def as_dict(self) -> dict[str, object]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        return {"answered": r(self.answered), "accuracy_answered": r(self.accuracy_answered),
                "accuracy_abstained": r(self.accuracy_abstained), "n_abstained": self.n_abstained}


def abstention_summary(labels: np.ndarray, predicted: np.ndarray, answered: np.ndarray) -> Abstention:
    """``answered`` (N,) bool: the films the app named a class for (not "uncertain")."""
    correct = np.asarray(labels) == np.asarray(predicted)
    answered = np.asarray(answered, dtype=bool)
    return Abstention(
        answered=float(answered.mean()) if answered.size else 0.0,
        accuracy_answered=float(correct[answered].mean()) if answered.any() else None,
        accuracy_abstained=float(correct[~answered].mean()) if (~answered).any() else None,
        n_abstained=int((~answered).sum()),
    )


@dataclass(frozen=True)
class Metrics:
    classes: tuple[str, ...]
    n: int
    accuracy: float
    per_class: Mapping[str, ClassMetrics]
    confusion_matrix: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted
    auroc_macro: float | None
    ece: float
    by_source: Mapping[str, "Metrics"] = field(default_factory=dict)
    abstention: Abstention | None = None
    #: films of labels the model has no class for (a JSRT nodule for the 3-class model):
    #: label -> {decided class: films}; they are in no other figure
    other_labels: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "n": self.n,
            "classes": list(self.classes),
            "accuracy": round(self.accuracy, 4),
            "per_class": {
                c: {"precision": round(m.precision, 4), "recall": round(m.recall, 4), "specificity": round(m.specificity, 4), "f1": round(m.f1, 4), "n": m.n}
                for c, m in self.per_class.items()
            },
            "confusion_matrix": [list(r) for r in self.confusion_matrix],
            "auroc_macro": None if self.auroc_macro is None else round(self.auroc_macro, 4),
            "ece": round(self.ece, 4),
        }
        if self.abstention is not None:
            out["abstention"] = self.abstention.as_dict()
        if self.by_source:
            out["by_source"] = {s: m.as_dict() for s, m in self.by_source.items()}
        if self.other_labels:
            out["other_labels"] = {label: dict(calls) for label, calls in self.other_labels.items()}
        return out


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): |accuracy - confidence| averaged over equal-width confidence bins."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence >= lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Per bin: mean confidence, accuracy and count, for a reliability diagram."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence >= lo) & (confidence <= hi)
        if inside.any():
            out.append({"lo": float(lo), "hi": float(hi), "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean()), "n": int(inside.sum())})
    return out


def compute_metrics(
    labels: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    sources: Sequence[str | None] | None = None,
    answered: Sequence[bool] | np.ndarray | None = None,
) -> Metrics:
    """Metrics of integer ``labels`` vs ``predicted`` (indices into ``classes``); ``probabilities`` (N, K).

    ``answered`` (N,) marks the films the app would name a class for (not "uncertain"):
    given, the metrics also say how the abstention rule behaves. Every other figure
    scores the decision on every film, abstained or not.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    shown = None if answered is None else np.asarray(answered, dtype=bool)
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    per_class: dict[str, ClassMetrics] = {}
    total = int(cm.sum())
    for i, cls in enumerate(classes):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = total - tp - fn - fp
        precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
        per_class[cls] = ClassMetrics(precision, recall, _safe_div(tn, tn + fp), _safe_div(2 * precision * recall, precision + recall), int(cm[i].sum()))
    auroc: float | None
    try:
        present = [i for i in range(k) if (y == i).any() and (y != i).any()]
        if not present:
            auroc = None
        elif k == 2:
            auroc = float(roc_auc_score(y == 0, probs[:, 0]))
        else:
            auroc = float(np.mean([roc_auc_score(y == i, probs[:, i]) for i in present]))
    except ValueError:
        auroc = None
    by_source: dict[str, Metrics] = {}
    if sources is not None:
        names = np.array([s or "unknown" for s in sources])
        for source in sorted(set(names)):
            mask = names == source
            if mask.sum() and len(set(names)) > 1:
                by_source[source] = compute_metrics(y[mask], p[mask], probs[mask], classes, answered=None if shown is None else shown[mask])
    return Metrics(
        classes=tuple(classes),
        n=total,
        accuracy=_safe_div(np.trace(cm), total),
        per_class=per_class,
        confusion_matrix=tuple(tuple(int(v) for v in row) for row in cm),
        auroc_macro=auroc,
        ece=expected_calibration_error(probs, y) if total else 0.0,
        by_source=by_source,
        abstention=None if shown is None or not total else abstention_summary(y, p, shown),
    )


#: scripts/measure_external.py's report, kept in a model folder
EXTERNAL_MEASUREMENT = "external_measurement.json"


def external_rows(folder: Path, model_key: str) -> list[dict[str, object]]:
    """The per-source table of films called COVID-19 for ``model_key`` (from its folder's
    external_measurement.json), one row per source/label; empty when not measured or stale."""
    path = Path(folder) / EXTERNAL_MEASUREMENT
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if data.get("model") != model_key:
        return []
    return [{"source / label": group, "films": row["n"], "called COVID-19": row["called_covid"],
             "share": row.get("called_covid_rate")} for group, row in data.get("groups", {}).items()]


@dataclass(frozen=True)
class UnseenSource:
    """How a model called the films of a source it never fitted on (not trained, calibrated or
    thresholded on), none of them of its positive class: a hospital it never saw."""

    source: str
    films: int
    called_positive: int

    @property
    def share(self) -> float:
        return self.called_positive / self.films if self.films else 0.0


def _fitted_sources(training_data: Mapping[str, object]) -> set[str]:
    """Every source a model's manifest says it was trained on or calibrated on."""
    fitted: set[str] = set()
    for per_split in dict(training_data.get("sources", {}) or {}).values():  # type: ignore[union-attr]
        fitted.update(dict(per_split or {}))
    calibration = dict(training_data.get("calibration", {}) or {})  # type: ignore[arg-type]
    fitted.update(dict(calibration.get("val_sources", {}) or {}))
    return fitted


def unseen_sources(folder: Path, model_key: str, positive: str, training_data: Mapping[str, object]) -> tuple[UnseenSource, ...]:
    """The sources of ``folder``'s external_measurement.json that the model never fitted on, each
    with how many of its films (none of class ``positive``) were called ``positive``; largest share
    first. Empty when the folder has no current measurement or every measured source was fitted on."""
    fitted = _fitted_sources(training_data)
    totals: dict[str, list[int]] = {}
    for row in external_rows(folder, model_key):
        source, _, label = str(row["source / label"]).partition("/")
        if source in fitted:
            continue
        total = totals.setdefault(source, [0, 0, 0])
        total[0] += int(row["films"])  # type: ignore[call-overload]
        total[1] += int(row["called COVID-19"])  # type: ignore[call-overload]
        total[2] += label == positive
    found = [UnseenSource(source, n, called) for source, (n, called, has_positive) in totals.items() if n and not has_positive]
    return tuple(sorted(found, key=lambda s: (-s.share, s.source)))


def unseen_hospital_note(sources: Sequence[UnseenSource], positive_label: str) -> str:
    """The plain sentence Diagnose shows beside a model no one has validated at this site; "" when
    nothing was measured at a hospital the model never saw."""
    if not sources:
        return ""
    worst = sources[0]
    return (f"At a hospital it was never trained on ({worst.source}: {worst.films} films, none of them {positive_label}), "
            f"this model called {worst.called_positive} ({worst.share:.0%}) {positive_label}. "
            f"A {positive_label} call here may be false: validate the model on this hospital's own films "
            "(Models page, \"Validate at this site\") before relying on it.")

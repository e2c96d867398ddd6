"""Metrics against hand-computed values; calibration; threshold choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr_core.metrics import (
    UnseenSource,
    compute_metrics,
    expected_calibration_error,
    unseen_hospital_note,
    unseen_sources,
)
from cxr_core.training.calibration import choose_threshold, fit_temperature

CLASSES = ("covid", "normal", "viral_pneumonia")
# Ten cases. True:      c c c c n n n v v v
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDICTED = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])
PROBS = np.array(
    [
        [0.9, 0.05, 0.05],
        [0.8, 0.1, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.7, 0.1],
        [0.5, 0.4, 0.1],
        [0.1, 0.1, 0.8],
        [0.1, 0.2, 0.7],
        [0.1, 0.5, 0.4],
    ]
)


def test_metrics_match_hand_computation() -> None:
    m = compute_metrics(LABELS, PREDICTED, PROBS, CLASSES, sources=["a"] * 5 + ["b"] * 5)
    assert m.confusion_matrix == ((3, 1, 0), (1, 2, 0), (0, 1, 2))
    assert m.accuracy == pytest.approx(7 / 10)
    covid = m.per_class["covid"]
    # covid: TP 3, FN 1, FP 1, TN 5
    assert (covid.precision, covid.recall, covid.specificity) == pytest.approx((3 / 4, 3 / 4, 5 / 6))
    assert covid.f1 == pytest.approx(0.75) and covid.n == 4
    normal = m.per_class["normal"]
    # normal: TP 2, FN 1, FP 2, TN 5
    assert (normal.precision, normal.recall, normal.specificity) == pytest.approx((2 / 4, 2 / 3, 5 / 7))
    viral = m.per_class["viral_pneumonia"]
    assert (viral.precision, viral.recall, viral.specificity) == pytest.approx((1.0, 2 / 3, 1.0))
    # AUROC per class one-vs-rest, macro-averaged; covid: 4 positives, 6 negatives.
    from sklearn.metrics import roc_auc_score

    expected = np.mean([roc_auc_score(LABELS == i, PROBS[:, i]) for i in range(3)])
    assert m.auroc_macro == pytest.approx(expected)
    assert set(m.by_source) == {"a", "b"} and m.by_source["a"].n == 5
    assert m.by_source["a"].accuracy == pytest.approx(4 / 5)


def test_ece_by_hand() -> None:
    # Two bins used: confidences 0.9 (right) and 0.6, 0.6 (one right, one wrong).
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 0, 1])
    # bin (0.867, 0.933]: 1 case, |1 - 0.9| = 0.1; bin (0.533, 0.6]: 2 cases, |0.5 - 0.6| = 0.1
    assert expected_calibration_error(probs, labels) == pytest.approx(1 / 3 * 0.1 + 2 / 3 * 0.1)


def test_temperature_recovers_the_true_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, (4000, 3))
    labels = np.array([rng.choice(3, p=np.exp(z) / np.exp(z).sum()) for z in true_logits])
    overconfident = true_logits * 2.5  # a model 2.5x too sharp
    assert fit_temperature(overconfident, labels, "softmax") == pytest.approx(2.5, rel=0.1)


def test_binary_temperature() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2.0, 3000)
    positive = rng.random(3000) < 1 / (1 + np.exp(-z))
    labels = np.where(positive, 0, 1)  # class 0 is the positive class
    assert fit_temperature((z * 0.5)[:, None], labels, "sigmoid") == pytest.approx(0.5, rel=0.1)


def test_threshold_reaches_the_target_sensitivity() -> None:
    p = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.45, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02])
    positive = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    t = choose_threshold(p, positive, target_sensitivity=0.9)
    assert t == pytest.approx(0.2)  # keeps 9 of 10 positives
    assert (p[positive] >= t).mean() >= 0.9
    assert choose_threshold(p, positive, target_sensitivity=0.5) == 0.5  # capped: never stricter than 0.5
    with pytest.raises(ValueError):
        choose_threshold(p, np.zeros(12, dtype=bool), 0.9)


def test_abstention_by_hand() -> None:
    # The app abstains on cases 2, 3, 6 and 9 (0-based).
    answered = np.array([1, 1, 0, 0, 1, 1, 0, 1, 1, 0], dtype=bool)
    m = compute_metrics(LABELS, PREDICTED, PROBS, CLASSES, sources=["a"] * 5 + ["b"] * 5, answered=answered)
    assert m.accuracy == pytest.approx(7 / 10)  # every film still scored
    # answered: 0,1,4,5,7,8 all right; abstained: 2 right, 3, 6, 9 wrong.
    assert m.abstention is not None
    assert (m.abstention.answered, m.abstention.accuracy_answered, m.abstention.accuracy_abstained) == pytest.approx((0.6, 1.0, 0.25))
    assert m.abstention.n_abstained == 4
    assert m.by_source["b"].abstention.n_abstained == 2  # type: ignore[union-attr]
    assert m.as_dict()["abstention"] == {"answered": 0.6, "accuracy_answered": 1.0, "accuracy_abstained": 0.25, "n_abstained": 4}
    assert compute_metrics(LABELS, PREDICTED, PROBS, CLASSES).abstention is None


def _external(folder: Path, model: str, groups: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"model": model, "groups": {g: {"n": n, "called_covid": c, "called_covid_rate": c / n} for g, (n, c) in groups.items()}}
    (folder / "external_measurement.json").write_text(json.dumps(data))
    return folder


def test_unseen_sources_leave_out_what_the_model_was_trained_or_calibrated_on(tmp_path: Path) -> None:
    training_data = {"sources": {"train": {"c19rdb": 10, "kermany": 5}, "val": {"c19rdb": 2}},
                     "calibration": {"val_sources": {"c19rdb": 2, "openist": 3}}}
    folder = _external(tmp_path / "m", "m@1.0", {
        "c19rdb/covid": (400, 380), "c19rdb/normal": (269, 3),   # trained on
        "openist/normal": (35, 13),                              # calibrated on
        "jsrt/normal": (93, 44), "jsrt/nodule": (154, 77),       # never seen: one source, two labels
        "site/normal": (10, 1),                                  # never seen, a smaller share
        "other/covid": (20, 18), "other/normal": (20, 2),        # never seen, but has COVID-19 films
    })
    found = unseen_sources(folder, "m@1.0", "covid", training_data)
    assert found == (UnseenSource("jsrt", 247, 121), UnseenSource("site", 10, 1))
    assert found[0].share == pytest.approx(121 / 247)
    note = unseen_hospital_note(found, "COVID-19")
    assert note.startswith("At a hospital it was never trained on (jsrt: 247 films, none of them COVID-19), this model called 121 (49%) COVID-19.")
    # A measurement of another version is stale; a folder without one, or nothing unseen, says nothing.
    assert unseen_sources(folder, "m@1.1", "covid", training_data) == ()
    assert unseen_sources(tmp_path / "none", "m@1.0", "covid", training_data) == ()
    assert unseen_hospital_note((), "COVID-19") == ""
    seen_all = {"sources": {"train": {"jsrt": 1, "site": 1, "other": 1, "c19rdb": 1, "openist": 1}}}
    assert unseen_sources(folder, "m@1.0", "covid", seen_all) == ()


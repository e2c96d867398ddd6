"""Model card facts derived from the metrics: training time across resumes, and test-vs-validation shift."""

from __future__ import annotations

from cxr_core.training.finalize import _shift_notes, _training_hours


def _source(acc: float, recalls: dict[str, tuple[float, int]]) -> dict:
    return {"accuracy": acc, "per_class": {c: {"recall": r, "n": n} for c, (r, n) in recalls.items()}}


def test_training_hours_sum_epochs_across_resumes() -> None:
    # The last process ran 1 h; the epochs (some from earlier processes) add up to 3 h.
    training = {"seconds": 3600.0, "history": [{"seconds": 3600.0}, {"seconds": 5400.0}, {"seconds": 1800.0}]}
    assert _training_hours(training) == 3.0
    assert _training_hours({"seconds": 7200.0, "history": []}) == 2.0


def test_shift_note_names_the_source_and_its_weakest_class() -> None:
    metrics = {
        "val": {"by_source": {"a": _source(0.96, {"x": (0.97, 10)}), "b": _source(0.95, {"x": (0.97, 10), "y": (0.93, 5), "z": (0.0, 0)})}},
        "test": {"by_source": {"a": _source(0.94, {"x": (0.95, 10)}), "b": _source(0.76, {"x": (0.61, 10), "y": (1.0, 5), "z": (0.0, 0)})}},
    }
    notes = _shift_notes(metrics)
    assert len(notes) == 1  # source a dropped 0.02: within noise, no note
    assert "`b`" in notes[0] and "0.760" in notes[0] and "0.950" in notes[0] and "weakest class there is x" in notes[0]
    assert _shift_notes({"test": metrics["test"]}) == []  # nothing to compare against

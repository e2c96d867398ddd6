"""Tabular results for many studies: one row per file, and their CSV export.

File names often carry patient names or record numbers, so they are left out of
exports unless the user asks for them; the image's sha256 identifies the study instead.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Callable, Sequence

from cxr_core.inference import DISCLAIMER, Prediction

#: a class key -> the name shown to people (Manifest.label); the key itself when none is given
Labeller = Callable[[str], str]


@dataclass(frozen=True)
class StudyResult:
    """What one uploaded file produced: a prediction, or the error that stopped it."""

    name: str
    sha256: str | None
    prediction: Prediction | None
    warnings: tuple[str, ...] = ()
    error: str | None = None


def study_status(result: StudyResult) -> tuple[str, str]:
    """(status, reason): why a study needs a look, in words a clinician reads.

    status is one of "unreadable", "rejected", "check" (the gate or the reader warned),
    "uncertain" (the model will not name a class) and "ok"; reason says why ("" when ok).
    """
    prediction = result.prediction
    if result.error or prediction is None:
        return "unreadable", result.error or "not read"
    gate = prediction.gate
    if gate is not None and gate.rejected:
        return "rejected", "; ".join(gate.reasons) or "not a frontal chest radiograph"
    if (gate is not None and gate.outcome == "warning") or result.warnings:
        return "check", "; ".join(result.warnings) or "; ".join(gate.reasons if gate else ())
    if prediction.uncertain:
        return "uncertain", "the model's top classes are too close to call"
    return "ok", ""


def _classes(results: Sequence[StudyResult]) -> list[str]:
    classes: list[str] = []
    for result in results:
        if result.prediction:
            classes.extend(c for c in result.prediction.classes if c not in classes)
    return classes


def worklist_rows(results: Sequence[StudyResult], label: Labeller = str) -> list[dict[str, object]]:
    """The on-screen worklist: one dict per study with why it needs a look next to its number
    (Study, File, Status, Why, Call, one "<class name> %" column per class, Model), class names
    as ``label`` gives them and no empty-value placeholders ("" where a value does not apply)."""
    classes = _classes(results)
    rows: list[dict[str, object]] = []
    for number, result in enumerate(results, start=1):
        status, reason = study_status(result)
        prediction = result.prediction
        shown = prediction is not None and status != "rejected"
        row: dict[str, object] = {"Study": number, "File": result.name, "Status": status, "Why": reason,
                                  "Call": label(prediction.predicted) if prediction and prediction.predicted else ""}
        for cls in classes:
            has = shown and prediction is not None and cls in prediction.classes
            row[f"{label(cls)} %"] = f"{100 * prediction.probability(cls):.1f}" if has and prediction else ""
        row["Model"] = prediction.model if prediction else ""
        rows.append(row)
    return rows


def result_rows(results: Sequence[StudyResult], *, include_names: bool = False, label: Labeller = str) -> list[dict[str, object]]:
    """One dict per study, columns in a stable order: study, [file], image_sha256, model, prediction,
    status, reason, p_<class>..., gate, uncertain, warnings, error. ``prediction`` is the class as
    ``label`` names it; a rejected image's probabilities are left empty."""
    classes = _classes(results)
    rows: list[dict[str, object]] = []
    for number, result in enumerate(results, start=1):
        row: dict[str, object] = {"study": number}
        if include_names:
            row["file"] = result.name
        row["image_sha256"] = result.sha256 or ""
        row["model"] = result.prediction.model if result.prediction else ""
        row["prediction"] = label(result.prediction.predicted) if result.prediction and result.prediction.predicted else ""
        row["status"], row["reason"] = study_status(result)
        for cls in classes:
            rejected = result.prediction is not None and result.prediction.gate is not None and result.prediction.gate.rejected
            has = result.prediction is not None and cls in result.prediction.classes and not rejected
            row[f"p_{cls}"] = round(result.prediction.probability(cls), 4) if has and result.prediction else None
        gate = result.prediction.gate if result.prediction else None
        row["gate"] = gate.outcome if gate else ""
        row["uncertain"] = bool(result.prediction.uncertain) if result.prediction else False
        row["warnings"] = " | ".join(result.warnings)
        row["error"] = result.error or ""
        rows.append(row)
    return rows


def results_csv(results: Sequence[StudyResult], *, include_names: bool = False, label: Labeller = str) -> str:
    """The rows of :func:`result_rows` as CSV, each with the decision-support disclaimer in a last
    column: a row copied on its own into a report or a spreadsheet still says what it is (a
    comment line above the header would break CSV readers)."""
    rows = [{**row, "disclaimer": DISCLAIMER} for row in result_rows(results, include_names=include_names, label=label)]
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def worklist_order(results: Sequence[StudyResult]) -> list[int]:
    """Indices of ``results`` with the studies that need a look first: unreadable, rejected,
    warned, uncertain, then the rest; upload order within each group."""

    def rank(result: StudyResult) -> float:
        if result.error:
            return 0.0
        prediction = result.prediction
        gate = prediction.gate.outcome if prediction and prediction.gate else ""
        base = {"rejected": 1.0, "warning": 2.0}.get(gate, 3.0)
        return base - (0.5 if prediction and prediction.uncertain and gate != "rejected" else 0.0)

    return sorted(range(len(results)), key=lambda i: (rank(results[i]), i))


def short_status(result: StudyResult) -> str:
    """A few words for a thumbnail caption."""
    if result.error:
        return "unreadable"
    prediction = result.prediction
    if prediction is None:
        return "…"
    if prediction.gate is not None and prediction.gate.rejected:
        return "REJECTED"
    answer = "uncertain" if prediction.uncertain or not prediction.predicted else prediction.predicted.replace("_", " ")
    return answer + (" ⚠" if prediction.gate is not None and prediction.gate.outcome == "warning" else "")

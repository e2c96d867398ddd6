"""Tabular results for many studies: one row per file, and their CSV export.

File names often carry patient names or record numbers, so they are left out of
exports unless the user asks for them; the image's sha256 identifies the study instead.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Sequence

from cxr_core.inference import DISCLAIMER, Prediction


@dataclass(frozen=True)
class StudyResult:
    """What one uploaded file produced: a prediction, or the error that stopped it."""

    name: str
    sha256: str | None
    prediction: Prediction | None
    warnings: tuple[str, ...] = ()
    error: str | None = None


def result_rows(results: Sequence[StudyResult], *, include_names: bool = False) -> list[dict[str, object]]:
    """One dict per study, columns in a stable order: study, [file], image_sha256, model, prediction,
    p_<class>..., gate, uncertain, warnings, error. A rejected image's probabilities are left empty."""
    classes: list[str] = []
    for result in results:
        if result.prediction:
            classes.extend(c for c in result.prediction.classes if c not in classes)
    rows: list[dict[str, object]] = []
    for number, result in enumerate(results, start=1):
        row: dict[str, object] = {"study": number}
        if include_names:
            row["file"] = result.name
        row["image_sha256"] = result.sha256 or ""
        row["model"] = result.prediction.model if result.prediction else ""
        row["prediction"] = (result.prediction.predicted or "") if result.prediction else ""
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


def results_csv(results: Sequence[StudyResult], *, include_names: bool = False) -> str:
    """The rows of :func:`result_rows` as CSV, each with the decision-support disclaimer in a last
    column: a row copied on its own into a report or a spreadsheet still says what it is (a
    comment line above the header would break CSV readers)."""
    rows = [{**row, "disclaimer": DISCLAIMER} for row in result_rows(results, include_names=include_names)]
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

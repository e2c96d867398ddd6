"""Results table and CSV export."""

from __future__ import annotations

import csv
import io

from cxr_core.inference import Prediction
from cxr_core.report import StudyResult, result_rows, results_csv


def _prediction(p_covid: float) -> Prediction:
    return Prediction("m@1", "M", ("covid", "normal"), (p_covid, 1 - p_covid), "covid" if p_covid >= 0.5 else "normal")


RESULTS = [
    StudyResult("Smith_John_MRN123.dcm", "a" * 64, _prediction(0.8), ("Colour image converted",)),
    StudyResult("broken.dcm", None, None, (), "This DICOM has no pixel data"),
    StudyResult("x.png", "b" * 64, _prediction(0.1)),
]


def test_csv_leaves_file_names_out_unless_asked() -> None:
    text = results_csv(RESULTS)
    assert "Smith" not in text and "broken.dcm" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["study", "image_sha256", "model", "prediction", "status", "reason", "p_covid", "p_normal", "gate", "uncertain", "warnings", "error", "disclaimer"]
    assert all(r["disclaimer"].startswith("Decision support only") for r in rows)
    assert [r["prediction"] for r in rows] == ["covid", "", "normal"]
    assert rows[0]["p_covid"] == "0.8" and rows[1]["error"] == "This DICOM has no pixel data"
    named = list(csv.DictReader(io.StringIO(results_csv(RESULTS, include_names=True))))
    assert [r["file"] for r in named] == ["Smith_John_MRN123.dcm", "broken.dcm", "x.png"]


def test_csv_names_classes_as_the_model_does_and_says_why_a_study_is_flagged() -> None:
    labels = {"covid": "COVID-19", "normal": "Normal"}
    rows = list(csv.DictReader(io.StringIO(results_csv(RESULTS, label=lambda c: labels[c]))))
    assert [r["prediction"] for r in rows] == ["COVID-19", "", "Normal"]
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("check", "Colour image converted"), ("unreadable", "This DICOM has no pixel data"), ("ok", "")]
    assert "None" not in results_csv(RESULTS)


def test_worklist_puts_the_reason_beside_the_study_with_display_names() -> None:
    from cxr_core.imaging.gate import GateResult
    from cxr_core.report import worklist_rows

    rejected = Prediction("m@1", "M", ("covid", "viral_pneumonia"), (0.7, 0.3), None, decision="covid",
                          gate=GateResult("rejected", ("Modality is MR, not a radiograph",)))
    uncertain = Prediction("m@1", "M", ("covid", "viral_pneumonia"), (0.5, 0.5), None, uncertain=True)
    results = [StudyResult("mr.dcm", "c" * 64, rejected), StudyResult("u.png", "d" * 64, uncertain), RESULTS[1]]
    labels = {"covid": "COVID-19", "viral_pneumonia": "Viral pneumonia"}
    rows = worklist_rows(results, lambda c: labels[c])
    assert list(rows[0])[:5] == ["Study", "File", "Status", "Why", "Call"]
    assert list(rows[0])[5:] == ["COVID-19 %", "Viral pneumonia %", "Model"]
    assert (rows[0]["Status"], rows[0]["Why"], rows[0]["COVID-19 %"]) == ("rejected", "Modality is MR, not a radiograph", "")
    assert (rows[1]["Status"], rows[1]["Call"], rows[1]["Viral pneumonia %"]) == ("uncertain", "", "50.0")
    assert (rows[2]["Status"], rows[2]["Why"]) == ("unreadable", "This DICOM has no pixel data")
    assert not any(v is None for row in rows for v in row.values())


def test_rows_keep_order_and_numbering() -> None:
    rows = result_rows(RESULTS)
    assert [r["study"] for r in rows] == [1, 2, 3]
    assert rows[1]["p_covid"] is None and rows[0]["warnings"] == "Colour image converted"
    assert results_csv([]) == ""


def test_threshold_labels_sit_above_their_bars() -> None:
    """The first class is drawn on top (reversed axis); its threshold label goes in the gap above
    the bar, with a top margin to hold it, not over the bar's colour."""
    from cxr_core.explain.charts import probability_chart
    from cxr_core.inference import Prediction

    prediction = Prediction(
        model="m@1", model_name="m", classes=("covid", "normal", "viral_pneumonia"), probabilities=(0.3, 0.69, 0.01),
        predicted="covid", thresholds={"covid": 0.2},
    )
    fig = probability_chart(prediction)
    assert fig.layout.yaxis.autorange == "reversed"
    (label,) = fig.layout.annotations
    (mark,) = fig.layout.shapes
    assert label.text == "threshold 0.20" and label.x == 0.2
    assert label.yanchor == "bottom" and label.y == min(mark.y0, mark.y1)  # the bar's upper edge
    assert fig.layout.margin.t >= 20

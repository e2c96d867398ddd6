"""Reviewer feedback on a prediction and its heatmap, kept in the app database.

Rows carry the model's id@version and the image's sha256, never a file name or any
other patient identifier; the comment is free text the reviewer writes.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from cxr_core.errors import CxrError
from cxr_core.state.db import connect

MAX_COMMENT = 2000


@dataclass(frozen=True)
class Feedback:
    model: str
    image_sha256: str
    method: str
    target: str
    layer: str
    predicted: str | None
    agree_prediction: bool | None
    agree_heatmap: bool | None
    comment: str = ""
    user: str = "anonymous"
    created: str = ""
    id: int | None = None


def record_feedback(item: Feedback, db: Path | None = None, role: str = "anonymous") -> Feedback:
    if len(item.image_sha256) != 64:
        raise CxrError("Feedback needs the image's sha256.")
    if item.agree_prediction is None and item.agree_heatmap is None and not item.comment.strip():
        raise CxrError("Nothing to record: give an opinion on the prediction or the heatmap, or a comment.")
    if len(item.comment) > MAX_COMMENT:
        raise CxrError(f"The comment is longer than {MAX_COMMENT} characters.")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with connect(db) as conn:
        cursor = conn.execute(
            "INSERT INTO feedback (created, user, model, image_sha256, method, target, layer, predicted, agree_prediction, agree_heatmap, comment)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (created, item.user, item.model, item.image_sha256, item.method, item.target, item.layer, item.predicted,
             None if item.agree_prediction is None else int(item.agree_prediction),
             None if item.agree_heatmap is None else int(item.agree_heatmap), item.comment.strip()),
        )
        new_id = int(cursor.lastrowid or 0)
    from cxr_core.state import audit
    # A review is a clinical opinion on the model's output: it belongs in the audit trail
    # too (the verdicts, not the free-text comment, which may name a patient).
    audit.record("review", user=item.user, role=role, image_sha256=item.image_sha256, model=item.model, db=db,
                 details={"feedback_id": new_id, "method": item.method, "target": item.target, "predicted": item.predicted,
                          "agree_prediction": item.agree_prediction, "agree_heatmap": item.agree_heatmap,
                          "has_comment": bool(item.comment.strip())})
    return Feedback(**{**asdict(item), "created": created, "id": new_id})


def review_verdict(value: bool | None) -> str:
    """How a review's opinion reads in a table: agree, disagree or no opinion."""
    return "no opinion" if value is None else "agree" if value else "disagree"


def list_feedback(image_sha256: str | None = None, limit: int = 500, db: Path | None = None) -> list[Feedback]:
    query = "SELECT * FROM feedback"
    args: tuple[object, ...] = ()
    if image_sha256:
        query += " WHERE image_sha256 = ?"
        args = (image_sha256,)
    query += " ORDER BY id DESC LIMIT ?"
    with connect(db) as conn:
        rows = conn.execute(query, args + (limit,)).fetchall()

    def flag(value: object) -> bool | None:
        return None if value is None else bool(value)

    return [
        Feedback(
            model=r["model"], image_sha256=r["image_sha256"], method=r["method"], target=r["target"], layer=r["layer"],
            predicted=r["predicted"], agree_prediction=flag(r["agree_prediction"]), agree_heatmap=flag(r["agree_heatmap"]),
            comment=r["comment"], user=r["user"], created=r["created"], id=r["id"],
        )
        for r in rows
    ]


def feedback_csv(items: list[Feedback]) -> str:
    buffer = io.StringIO()
    fields = ["id", "created", "user", "model", "image_sha256", "method", "target", "layer", "predicted", "agree_prediction", "agree_heatmap", "comment"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for item in items:
        writer.writerow({k: v for k, v in asdict(item).items() if k in fields})
    return buffer.getvalue()

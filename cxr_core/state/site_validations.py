"""Site validations as records: stored in the app database and the audit trail, listed on the
Models page, and summarised beside the model's name on Diagnose."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cxr_core.state import audit
from cxr_core.state.db import connect
from cxr_core.training.validation import SiteValidation, validation_report


@dataclass(frozen=True)
class StoredValidation:
    """A validation as recorded: who ran it, when, on what data (name and content hash)."""

    id: int
    created: str
    user: str
    model: str
    data_name: str
    data_sha256: str
    n: int
    result: dict[str, Any]

    def badge(self) -> str:
        """The line Diagnose shows beside the model's name."""
        sens, spec = self.result["covid_sensitivity"], self.result["non_covid_specificity"]

        def part(name: str, e: dict[str, Any]) -> str:
            if e["value"] is None:
                return f"{name} not measurable"
            return f"{name} {e['value']:.2f} (95% CI {e['ci95'][0]:.2f}-{e['ci95'][1]:.2f})"

        return (f"Validated at this site on {self.n} films ({self.data_name}, {self.created[:10]}): "
                f"{part('COVID-19 sensitivity', sens)}, {part('specificity', spec)}")

    def report(self, label: Callable[[str], str] = lambda c: c.replace("_", " ")) -> str:
        """This validation as a Markdown document for the hospital's records (:func:`validation_report`)."""
        return validation_report(self.result, data_name=self.data_name, user=self.user, created=self.created, label=label)


#: what Diagnose says of a model nobody has validated here
NOT_VALIDATED = "Not validated at this site: its figures come from public data only (see the model card)."
#: what Diagnose says of a model validated here only on films it was fitted on (a fine-tune's or
#: an adaptation's own films, the films that chose its site threshold): those figures flatter it
NOT_INDEPENDENT = ("Not validated at this site on films it has not seen: its validations here used films it was trained on "
                   "or had its threshold chosen on, whose figures flatter it (see the Models page).")
#: the badges that say no validation here can be relied on
UNVALIDATED = (NOT_VALIDATED, NOT_INDEPENDENT)


def record_validation(result: SiteValidation, *, user: str, role: str = "admin", data_name: str, db: Path | None = None) -> StoredValidation:
    """Store ``result`` in the app database and the audit trail; returns the stored record."""
    return record_validation_figures(result.as_dict(), user=user, role=role, data_name=data_name, db=db)


def record_validation_figures(data: dict[str, Any], *, user: str, role: str = "admin", data_name: str,
                              db: Path | None = None) -> StoredValidation:
    """:func:`record_validation` for a validation already in its JSON form (``SiteValidation.as_dict()``,
    as ``adapt`` reports its before and after)."""
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model, sha, n = data["model"], data["data_sha256"], int(data["n"])
    with connect(db) as conn:
        cursor = conn.execute(
            "INSERT INTO site_validation (created, user, model, data_name, data_sha256, n, result) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (created, user, model, data_name, sha, n, json.dumps(data)))
        new_id = int(cursor.lastrowid or 0)
    audit.record("validate_site", user=user, role=role, model=model, db=db,
                 details={"validation_id": new_id, "data_name": data_name, "data_sha256": sha, "n": n,
                          "counts": data["counts"], "covid_sensitivity": data["covid_sensitivity"]["value"],
                          "non_covid_specificity": data["non_covid_specificity"]["value"], "auroc": data["auroc"]["value"]})
    return StoredValidation(new_id, created, user, model, data_name, sha, n, data)


def record_held_out_validations(before: dict[str, Any] | None, after: dict[str, Any], *, user: str, role: str = "admin",
                                data_name: str, db: Path | None = None) -> list[StoredValidation]:
    """Store a site adaptation's two scorings of its held-out half (the base model's ``before``, if
    any, and the adapted model's ``after``, each ``SiteValidation.as_dict()``) as site validations:
    both are, the held-out patients being ones neither model trained, calibrated or chose a threshold on."""
    return [record_validation_figures(figures, user=user, role=role, data_name=data_name, db=db)
            for figures in (before, after) if figures is not None]


def list_validations(model: str | None = None, db: Path | None = None) -> list[StoredValidation]:
    """Recorded validations, newest first; only ``model`` (id@version) when given."""
    query = "SELECT id, created, user, model, data_name, data_sha256, n, result FROM site_validation"
    args: tuple[Any, ...] = ()
    if model:
        query, args = query + " WHERE model = ?", (model,)
    with connect(db) as conn:
        rows = conn.execute(query + " ORDER BY id DESC", args).fetchall()
    return [StoredValidation(*row[:7], json.loads(row[7])) for row in rows]


def site_badge(model: str, db: Path | None = None) -> str:
    """"Validated at this site on N films: ..." for the newest validation of ``model`` (id@version)
    on films it was not fitted on; NOT_INDEPENDENT when every validation of it included such films
    (``fitted_films``, :mod:`cxr_core.models.fitted_films`); NOT_VALIDATED when there is none."""
    found = list_validations(model, db)
    independent = [v for v in found if not v.result.get("fitted_films")]
    if independent:
        return independent[0].badge()
    return NOT_INDEPENDENT if found else NOT_VALIDATED

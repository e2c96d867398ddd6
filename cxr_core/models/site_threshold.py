"""A site's own COVID-19 threshold, adopted as a new version of a model.

A site validation offers the threshold that would reach a target sensitivity on the site's
films (:func:`cxr_core.training.validation.suggest_threshold`). Adopting it changes every
decision the model makes, so it is never applied in place: it becomes a new version with the
same weights, temperature and input gate and a different threshold, registered as a candidate
that goes through the same evaluation, promotion and rollback as a retrained one. Every
prediction then names the version, and so the threshold, that made it.

The figures that came with the base version were measured at its own threshold, so the
new version keeps none of them (its card says so); the films that chose the threshold
flatter it, so it needs figures from other films (the fixed evaluation set, another
validation) before anyone relies on it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr_core.errors import CxrError
from cxr_core.fileio import atomic_write
from cxr_core.models.fitted_films import with_fitted_films
from cxr_core.models.manifest import MANIFEST_NAME, Manifest, read_manifest
from cxr_core.models.versions import Version, candidate_folder, find_version, staging_folder

#: the manifest's ``training`` entry that says where a site threshold came from
SITE_THRESHOLD_KEY = "site_threshold"
#: what the films that chose it were used for, in :mod:`cxr_core.models.fitted_films`'s record
THRESHOLD_USE = "COVID-19 threshold"


class SiteThresholdError(CxrError):
    """The site threshold cannot become a version (no threshold to replace, out of range, no reason given)."""


def adopt_site_threshold(model_id: str, version: str, threshold: float, *, new_version: str, user: str, reason: str,
                         chosen_on: dict[str, Any] | None = None, chosen_films: Iterable[Path] = ()) -> Version:
    """Register ``model_id@new_version``: ``model_id@version`` with its COVID-19 threshold set to
    ``threshold``. ``reason``: why the site adopts it (required, as a promotion override is);
    ``chosen_on``: the validation that offered it (model, data name and hash, films, the
    sensitivity and specificity it reached there), kept in the manifest and the card;
    ``chosen_films``: that validation's films, recorded by fingerprint
    (:mod:`cxr_core.models.fitted_films`) so that a later validation on any of them is flagged and
    never shown on Diagnose as this version's.

    The candidate is built in a hidden folder and renamed into the registry when complete, as a
    training job's is. It is neither evaluated here (the Models page's Evaluate, or
    :func:`cxr_core.training.evaluation_set.evaluate_candidate`) nor active."""
    if not reason or not reason.strip():
        raise SiteThresholdError("Say why this site adopts its own threshold: the reason is kept with the version.")
    if not 0.0 < threshold < 1.0:
        raise SiteThresholdError(f"Threshold {threshold}: a COVID-19 threshold is a probability between 0 and 1 (exclusive).")
    base = find_version(model_id, version)
    manifest = base.manifest
    positive = manifest.classes[0]
    if positive not in manifest.thresholds:
        raise SiteThresholdError(f"{base.key} decides by the most probable class; it has no {manifest.label(positive)} "
                                 "threshold to replace.")
    out = candidate_folder(model_id, new_version)
    record = {
        "base": base.key, "threshold": round(float(threshold), 4), "base_threshold": manifest.thresholds[positive],
        "user": user, "reason": reason.strip(), "chosen_on": chosen_on or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    training = {**manifest.training, SITE_THRESHOLD_KEY: record}
    films = list(chosen_films)
    if films:
        training = with_fitted_films(training, films, THRESHOLD_USE)
    adopted = replace(
        manifest, version=new_version, thresholds={**manifest.thresholds, positive: record["threshold"]},
        metrics={}, training=training, created=record["created"],
    )
    staging = staging_folder(model_id, new_version)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files = [manifest.weights_file] + ([str(manifest.ood["file"])] if manifest.ood.get("file") else [])
        for name in files:
            shutil.copy2(base.path / name, staging / name)
        atomic_write(staging / MANIFEST_NAME, lambda p: p.write_text(adopted.to_json(), encoding="utf-8"))
        card = base.path / "README.md"
        base_card = card.read_text(encoding="utf-8") if card.is_file() else ""
        (staging / "README.md").write_text(site_threshold_card(record, manifest.label(positive)) + base_card, encoding="utf-8")
        read_manifest(staging)  # what the registry will read
        os.rename(staging, out)  # atomic; refuses a folder that appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return find_version(model_id, new_version)


def site_threshold_card(record: dict[str, Any], positive_label: str) -> str:
    """The section that heads an adopted version's card, above its base version's card."""
    chosen = record.get("chosen_on") or {}
    where = ""
    if chosen:
        where = (f" It was offered by a validation of {chosen.get('model', record['base'])} on {chosen.get('data_name', 'site films')} "
                 f"({chosen.get('n', '?')} films, data sha256 {str(chosen.get('data_sha256', ''))[:12]}), where it reached "
                 f"{positive_label} sensitivity {chosen.get('sensitivity')} at specificity {chosen.get('specificity')} "
                 f"(target {chosen.get('target_sensitivity')}).")
    return (
        f"# Site threshold: {positive_label} at p >= {record['threshold']} (base {record['base']}: p >= {record['base_threshold']})\n\n"
        f"- Adopted by {record['user']} on {record['created'][:10]}. Reason: {record['reason']}\n"
        f"- The same weights, temperature and input check as {record['base']}; only the {positive_label} threshold differs.{where}\n"
        "- **Those films chose the threshold, so the figures they give it are optimistic.** Judge this version by the fixed "
        "evaluation set and by a validation on other films of the site. Every figure in the card below was measured at the "
        f"base version's threshold ({record['base_threshold']}), not at this one; probabilities, AUROC and calibration are unchanged.\n\n"
    )


def site_threshold_of(version: Version) -> dict[str, Any] | None:
    """Where ``version``'s threshold came from, when it is an adopted site threshold."""
    record = version.manifest.training.get(SITE_THRESHOLD_KEY)
    return dict(record) if record else None


def threshold_origin(manifest: Manifest, cls: str) -> str:
    """Where ``manifest``'s threshold for ``cls`` came from, in words for the page that draws it."""
    record = manifest.training.get(SITE_THRESHOLD_KEY)
    if record and cls == manifest.classes[0]:
        films = (record.get("chosen_on") or {}).get("n")
        return f"adopted at this site on {record['created'][:10]} from a validation" + (f" on {films} films" if films else "")
    return "chosen on validation for sensitivity"

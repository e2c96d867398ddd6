"""The model registry: every trained version kept, one active version per model id.

    weights/<id>/                      shipped versions (in git)
    var/registry/<id>/<version>/       versions trained here (model folder + evaluation.json)
    var/registry/active.json           {"active": {id: version}, "history": [...]}
    var/registry/evaluations/<id>@<version>.json
                                       evaluations of shipped versions (weights/ stays as in git)

Which version the app uses is a pointer in ``active.json``; without an entry, the shipped
folder (promoting or rolling back to the shipped version removes the entry). Which model
Diagnose offers first is ``active.json``'s ``default``, set by an admin and audited, never
an accident of sorting. Promotion and rollback only rewrite that small file (temporary file, fsync,
rename): a crash leaves either the old or the new pointer, and both name complete,
verified folders, so the app always has a working model. Versions are kept until an
admin deletes them; the active and shipped versions cannot be deleted.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr_core import config
from cxr_core.errors import ModelError
from cxr_core.models.fitted_films import fitted_uses_text
from cxr_core.models.manifest import Manifest, read_manifest
from cxr_core.models.pointer import RegistryError, read_pointer, registry_dir, write_pointer

EVALUATION_NAME = "evaluation.json"


@dataclass(frozen=True)
class Version:
    model_id: str
    version: str
    path: Path
    manifest: Manifest
    shipped: bool  # lives in weights/ (in git)
    active: bool
    evaluation: dict[str, Any] | None  # metrics on the fixed evaluation set, if measured
    #: a site adaptation's before/after (cxr_core.state.jobs), when this version is one
    site_adaptation: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.model_id}@{self.version}"


def evaluation_path(folder: Path, manifest: Manifest, shipped: bool) -> Path:
    """Where a version's evaluation lives: in its registry folder, or under var/ for a
    shipped folder (weights/ is part of the checkout and stays untouched)."""
    return registry_dir() / "evaluations" / f"{manifest.key}.json" if shipped else folder / EVALUATION_NAME


#: the file in an adapted candidate's folder with its before/after figures on the site
SITE_ADAPTATION_NAME = "site_adaptation.json"


def _evaluation(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _folders(model_id: str | None = None) -> list[tuple[Path, bool]]:
    out: list[tuple[Path, bool]] = []
    weights = config.weights_dir()
    if weights.is_dir():
        out += [(p, True) for p in sorted(weights.iterdir()) if (p / "manifest.json").is_file()]
    reg = registry_dir()
    if reg.is_dir():
        for model_dir in sorted(p for p in reg.iterdir() if p.is_dir()):
            # Dot-folders are jobs' staging areas: not versions until renamed into place.
            out += [(p, False) for p in sorted(model_dir.iterdir()) if not p.name.startswith(".") and (p / "manifest.json").is_file()]
    return out


def list_versions(model_id: str | None = None) -> list[Version]:
    """Every readable version (shipped and trained), grouped by model id, newest last."""
    pointer = read_pointer()["active"]
    versions: list[Version] = []
    for folder, shipped in _folders():
        try:
            manifest = read_manifest(folder)
        except ModelError:
            continue
        if model_id and manifest.id != model_id:
            continue
        versions.append(Version(manifest.id, manifest.version, folder, manifest, shipped, False,
                                _evaluation(evaluation_path(folder, manifest, shipped)), _evaluation(folder / SITE_ADAPTATION_NAME)))
    out = []
    for v in versions:
        wanted = pointer.get(v.model_id)
        active = (v.version == wanted) if wanted else v.shipped
        out.append(replace(v, active=active))
    return sorted(out, key=lambda v: (v.model_id, v.manifest.created, v.version))


def active_folders() -> list[Path]:
    """The folder of each model id's active version (what the app loads)."""
    return [v.path for v in list_versions() if v.active]


#: what a model id or version may be: it names a folder under the registry, so no separators,
#: no leading dot (hidden staging folders) and nothing that reads as a path
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,79}")


def candidate_folder(model_id: str, version: str) -> Path:
    """Where a new version ``model_id@version`` goes; RegistryError when either name could not
    be a folder of its own, or the version exists."""
    for what, name in (("model id", model_id), ("version", version)):
        if not SAFE_NAME.fullmatch(name) or ".." in name:
            raise RegistryError(f"{what.capitalize()} {name!r}: use letters, digits, '.', '_', '+' and '-' (up to 80, "
                                "starting with a letter or digit).")
    folder = registry_dir() / model_id / version
    if folder.exists() or any(v.version == version for v in list_versions(model_id)):
        raise RegistryError(f"Version {model_id}@{version} already exists: choose another version.")
    return folder


def staging_folder(model_id: str, version: str) -> Path:
    """Where a new version is built before it is renamed into :func:`candidate_folder`: a dot-folder,
    so the registry never lists a half-written version (see ``_folders``)."""
    return registry_dir() / model_id / f".staging-{version}"


def find_version(model_id: str, version: str) -> Version:
    """The registered version ``model_id@version``, shipped or trained; RegistryError when there is none."""
    for v in list_versions(model_id):
        if v.version == version:
            return v
    raise RegistryError(f"No version {model_id}@{version} in the registry.")


def not_evaluated(candidate: Version) -> str | None:
    """Why ``candidate`` cannot be promoted at all: a trained version never measured on the
    fixed evaluation set (a shipped version is a release with its own card and may always return)."""
    if candidate.evaluation is None and not candidate.shipped:
        return (f"{candidate.key} has not been evaluated on the fixed evaluation set, so it cannot be promoted: "
                "evaluate it first")
    return None


def promotion_problems(candidate: Version, active: Version | None) -> list[str]:
    """Why the candidate is not shown to be better than the active model on the fixed evaluation
    set (measured worse, measured elsewhere, or measured on films it was fitted on) and, for an
    adapted model, :func:`site_adaptation_problems` (empty: none; see :func:`not_evaluated` first)."""
    problems = site_adaptation_problems(candidate)
    fitted = (candidate.evaluation or {}).get("fitted_films")
    if fitted:
        problems.append(f"{fitted} films of its evaluation set were used for its {fitted_uses_text(candidate.manifest)}: its figures there flatter it "
                        "(evaluate it on films it has not seen)")
    if candidate.evaluation is None or active is None:
        return problems  # nothing measured, or a new model id: nothing it would replace
    if active.evaluation is None:
        return problems + [f"The active version {active.key} has no evaluation to compare with"]
    where = lambda e: (e.get("evaluation_set"), e.get("split"))  # noqa: E731
    if where(candidate.evaluation) != where(active.evaluation):
        return problems + [f"The candidate and the active version were evaluated on different sets ({where(candidate.evaluation)} vs "
                           f"{where(active.evaluation)}): their figures are not comparable"]
    ca, aa = candidate.evaluation.get("accuracy"), active.evaluation.get("accuracy")
    if ca is not None and aa is not None and ca < aa:
        problems.append(f"accuracy {ca:.4f} is below the active model's {aa:.4f}")
    cs = candidate.evaluation.get("per_class", {}).get("covid", {}).get("recall")
    as_ = active.evaluation.get("per_class", {}).get("covid", {}).get("recall")
    if cs is not None and as_ is not None and cs < as_:
        problems.append(f"COVID sensitivity {cs:.4f} is below the active model's {as_:.4f}")
    return problems


#: an adapted model must keep this COVID-19 sensitivity on the shared test split
SHARED_TEST_SENSITIVITY = 0.95


def _balanced(figures: dict[str, Any]) -> float | None:
    """Mean of COVID-19 sensitivity and specificity (either alone when the other is not measurable)."""
    parts = [figures[k]["value"] for k in ("covid_sensitivity", "non_covid_specificity") if figures[k]["value"] is not None]
    return sum(parts) / len(parts) if parts else None


def site_adaptation_problems(candidate: Version) -> list[str]:
    """For an adapted model: not better than its base on the site's held-out films (the mean of
    COVID-19 sensitivity and specificity), or COVID-19 sensitivity on the shared test split below
    SHARED_TEST_SENSITIVITY or not measured. Empty for any other version."""
    record = candidate.site_adaptation
    if not record:
        return []
    problems = []
    before, after = record.get("before"), record["after"]
    b, a = (_balanced(before) if before else None), _balanced(after)
    if a is None or (b is not None and a <= b):
        problems.append(f"on the site's held-out films it is not better than before (sensitivity and specificity averaged: "
                        f"{'n/a' if b is None else f'{b:.3f}'} before, {'n/a' if a is None else f'{a:.3f}'} after)")
    shared = record.get("shared_test") or {}
    sensitivity = shared.get("covid_sensitivity")
    if sensitivity is None:
        problems.append("its COVID-19 sensitivity on the shared test split was not measured (no replay data with a test split)")
    elif sensitivity < SHARED_TEST_SENSITIVITY:
        problems.append(f"its COVID-19 sensitivity on the shared test split is {sensitivity:.3f}, below {SHARED_TEST_SENSITIVITY}")
    return problems


def promote(model_id: str, version: str, *, user: str, override_reason: str | None = None, gate: bool = True) -> Version:
    """Make ``version`` active. With ``gate``, refuse a candidate that was never evaluated, and
    one measured worse than the active one unless a reason is given. (A rollback passes
    ``gate=False``: it returns to a version that was active before.)"""
    from cxr_core.models.loading import load_model

    candidate = find_version(model_id, version)
    if gate and (reason := not_evaluated(candidate)):
        raise RegistryError(f"Promotion refused: {reason}.")
    load_model(candidate.path, device="cpu")  # verify it loads before anything points at it
    active = next((v for v in list_versions(model_id) if v.active), None)
    problems = promotion_problems(candidate, active) if gate else []
    if problems and not (override_reason and override_reason.strip()):
        raise RegistryError("Promotion refused: " + "; ".join(problems) + ". Give a reason to override.")
    pointer = read_pointer()
    previous = pointer["active"].get(model_id) or (active.version if active else None)
    if candidate.shipped:
        # The shipped folder is what the app uses without an entry: no registry folder to name.
        pointer["active"].pop(model_id, None)
    else:
        pointer["active"][model_id] = version
    pointer["history"].append(
        {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "user": user, "model": model_id, "from": previous,
         "to": version, "problems": problems, "override_reason": override_reason or None}
    )
    write_pointer(pointer)
    return find_version(model_id, version)


def rollback_target(model_id: str) -> str | None:
    """The version a rollback of ``model_id`` returns to: the one active before its latest
    promotion, if it still exists (a deleted version is nothing to go back to)."""
    promotions = [h for h in read_pointer()["history"] if h["model"] == model_id and h.get("action", "promote") == "promote"]
    target = promotions[-1].get("from") if promotions else None
    if not target or not any(v.version == target for v in list_versions(model_id)):
        return None
    return str(target)


def rollback(model_id: str, *, user: str) -> Version:
    """Back to the version active before the latest promotion of ``model_id``."""
    target = rollback_target(model_id)
    if target is None:
        raise RegistryError(f"Nothing to roll back to for {model_id}.")
    return promote(model_id, target, user=user, gate=False)


def delete_version(model_id: str, version: str) -> None:
    v = find_version(model_id, version)
    if v.active:
        raise RegistryError("The active version cannot be deleted; promote another one first.")
    if v.shipped:
        raise RegistryError("Shipped versions (in weights/) are not deleted from the app.")
    shutil.rmtree(v.path)


def set_default_model(model_id: str, *, user: str) -> None:
    """Make ``model_id`` (an installed model) the one clinicians get first; recorded in ``active.json``'s history."""
    if not any(v.model_id == model_id and v.active for v in list_versions(model_id)):
        raise RegistryError(f"No installed model {model_id!r} to make the default.")
    pointer = read_pointer()
    previous = pointer.get("default")
    pointer["default"] = model_id
    pointer["history"].append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "user": user, "model": model_id,
                               "action": "default", "from": previous, "to": model_id})
    write_pointer(pointer)

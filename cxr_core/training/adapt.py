"""Site adaptation: fine-tune a model on one hospital's films, and show what it changed there.

The site's films are split by patient (a hash of the patient id, or of the file name): half
held out to judge before and after, the rest adapted on, a quarter of those kept for
validation, where temperature and the COVID-19 threshold are chosen again. A folder with its
own train/val/test folders keeps them. Films of the original training collections can be
mixed in (``replay``): without them a fine-tune on a few hundred films of one hospital
forgets what the public collections taught it. Each (source, label) group weighs the same,
so the site's films count as much as the replay's.

The adapted model is an ordinary model folder; before/after on the held-out films come from
:func:`cxr_core.training.validation.validate_site`, the same figures a site validation reports.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cxr_core.errors import CxrError
from cxr_core.training.dataset import Record, _bucket, scan_folder, split_key

if TYPE_CHECKING:
    from cxr_core.training.config import TrainConfig
    from cxr_core.training.crossval import OutOfFold
    from cxr_core.training.prepare import PreparedData

log = logging.getLogger(__name__)

HELD_OUT = 0.5  # share of the site's patients judged before and after, never trained on
VALIDATION = 0.25  # share of the remaining patients that choose the epoch, temperature and threshold
#: replay validation films drawn at least (every class in its own proportion; 0: in proportion to
#: the site's validation films alone). Validation films are never trained on; a site without
#: COVID-19 films of its own chooses its COVID-19 threshold on the replay's (12 for a site of 274
#: films in proportion). Measured on a held-out source as the site (DenseNet121 1.3.1, `openist`):
#: 300 kept shared-test COVID-19 sensitivity at 0.953 (in proportion: 0.875) but the site's
#: specificity fell to 0.895 (0.992), so it is an option, off by default
#: (docs/experiments/2026-12-05-adapt-replay-validation.md)
MIN_REPLAY_VALIDATION = 0
#: weight of the distillation term (cxr_core.training.distill) toward the base model; 0 = off
#: (docs/experiments/2026-12-06-adapt-distillation.md)
DISTILL = 0.0
#: "all" films or the "replay" films only get the distillation term
DISTILL_ON = "all"
#: "all" classes, or only the "missing" ones (the model classes without site or replay films) are
#: compared by the distillation term
DISTILL_CLASSES = "all"
#: share of the adapted weights in the exported model, the rest the base model's (WiSE-FT:
#: cxr_core.training.interpolate); 1 = the adapted weights
#: (docs/experiments/2026-12-06-adapt-weight-interpolation.md)
INTERPOLATE = 1.0
#: folds of the adapt half (site and replayed films, training and validation) whose out-of-fold
#: scores fit the temperature and COVID-19 threshold instead of the validation split's alone;
#: 0 = off. Measured with 3 at two made-up sites, both models: held-out COVID-19 sensitivity
#: 0.93-0.97 (off: 0.84-0.91) and shared-test 0.935-0.965 (0.83-0.92), but 18 fewer held-out films
#: right in all, specificity paying, so it is an option, off by default
#: (docs/experiments/2026-12-06-adapt-crossfit-threshold.md)
CROSSFIT = 0
#: the cross-fitting runs' folder, beside the adaptation's run
CROSSFIT_DIR = "crossfit"
SITE_SOURCE = "site"
#: the input sizes ``adapt --size`` accepts (px): below, a chest film keeps too little to read;
#: above, one film's activations no longer fit a laptop's memory comfortably. The default stays
#: the model's own: 288 px lowered held-out AUROC at two made-up sites, both models
#: (docs/experiments/2026-12-07-adapt-input-size.md)
MIN_SIZE, MAX_SIZE = 64, 512


class AdaptationError(CxrError):
    """The site's films cannot adapt this model (too few, or no film of its classes)."""


@dataclass(frozen=True)
class AdaptResult:
    model: str  # the adapted model, id@version
    base: str  # the model it started from
    out: str
    films: dict[str, int]  # site films per split (adapt, validation, held_out) and replay films used
    before: dict[str, Any]  # SiteValidation.as_dict() of the base model on the held-out films
    after: dict[str, Any]  # the same for the adapted model
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def auxiliary_labels(folder: Path, classes: Sequence[str]) -> tuple[str, ...]:
    """The labels of ``folder``'s films that are none of a multi-class model's ``classes``
    (``nodule``, ``pneumonia``, ...): an adaptation trains them as auxiliary outputs, dropped
    from the adapted model, rather than leaving those films out (see :func:`adapt`)."""
    return tuple(sorted({r.label for r in scan_folder(folder)} - set(classes)))


def training_folders(manifest: Any, model_folder: Path) -> tuple[Path, ...]:
    """The labelled folders ``manifest``'s model was trained on, as its training report names them
    (``training_data.root``: one folder, or several joined by " + "), that exist on this machine:
    relative to the working directory, or to the folder above ``weights/`` (where the app's
    commands run). Empty when any of them is missing (a partial replay would be a different one),
    and for a model adapted to a site: its training folder is an earlier adaptation's view, whose
    test split is that site's held-out half, not the shared test split promotion reads."""
    root = str((getattr(manifest, "training_data", None) or {}).get("root") or "")
    found = []
    for name in (part.strip() for part in root.split(" + ") if part.strip()):
        path = Path(name)
        candidates = [path] if path.is_absolute() else [path, model_folder.resolve().parent.parent / path]
        hit = next((c for c in candidates if c.is_dir()), None)
        if hit is None or _is_adaptation_view(hit):
            return ()
        found.append(hit)
    return tuple(found)


def _is_adaptation_view(folder: Path) -> bool:
    """Whether ``folder`` was written by :func:`build_adapt_folder` (its site films carry SITE_SOURCE)."""
    try:
        with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
            return any(row.get("source") == SITE_SOURCE for row in csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return False


def site_adaptation_blocker(classes: Sequence[str], binary: str | None, site_labels: Sequence[str], replay: bool,
                            distill: bool) -> str | None:
    """Why adapting a model with ``classes`` to a site whose films carry ``site_labels`` would stop
    before training (what :func:`adapt` raises), in words for the page that launches it; None when
    it can run. ``replay``: training data is mixed in; ``distill``: the distillation term is on."""
    if replay:
        return None
    positive = binary or classes[0]
    if positive not in site_labels:
        return (f"This site has no {positive} films and no training data is given to mix in: the {positive} threshold "
                "cannot be chosen again. Give the model's training data folders, or a site with its own films of it.")
    missing = [] if binary else [c for c in classes[1:] if c not in site_labels]
    if missing and not distill:
        return (f"This site has no films of {', '.join(missing)} and no training data is given to mix in: the model would "
                "forget that class. Give the model's training data folders, or turn on \"Keep the base model's answers\".")
    return None


def held_out_folder(work: Path) -> Path:
    """Where :func:`build_adapt_folder` puts the held-out films (flat label folders), beside ``work``."""
    return work.parent / f"{work.name}-held-out"


def split_site(records: Sequence[Record], *, salt: str = "site") -> list[Record]:
    """Records with a split: their own when the folder has one, else by patient: HELD_OUT of
    patients to "test", VALIDATION of the rest to "val", the others to "train"."""
    out = []
    for record in records:
        if record.split is not None:
            out.append(record)
            continue
        u = _bucket(record.patient_id or record.path.name, salt)
        split = "test" if u < HELD_OUT else "val" if u < HELD_OUT + (1 - HELD_OUT) * VALIDATION else "train"
        out.append(replace(record, split=split))
    return out


def _sample(records: Sequence[Record], k: int, salt: str) -> list[Record]:
    """About ``k`` records, the same ones every time (smallest hash of the file name), each label
    in its own proportion and at least one of every label: a class without validation films
    could be neither calibrated nor chosen on."""
    if k <= 0 or not records:
        return []
    by_label: dict[str, list[Record]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    chosen: list[Record] = []
    for _, group in sorted(by_label.items()):
        share = max(1, round(k * len(group) / len(records)))
        chosen += sorted(group, key=lambda r: _bucket(split_key(r), salt))[:share]
    return chosen


def _has_validation_films(work: Path, label: str) -> bool:
    with open(work / "metadata.csv", newline="", encoding="utf-8") as handle:
        return any(row["split"] == "val" and row["label"] == label for row in csv.DictReader(handle))


def build_adapt_folder(site: Path, work: Path, replay: Sequence[Path] = (), replay_share: float = 0.5, *, seed: int = 0,
                       min_replay_validation: int = MIN_REPLAY_VALIDATION) -> dict[str, int]:
    """A labelled folder under ``work`` (symbolic links and a metadata.csv): the site's films
    split by :func:`split_site`, plus replay films for train and validation, ``replay_share`` of
    each (a share of 0.5 adds as many replay films as there are site films), and at least
    ``min_replay_validation`` replay validation films. Returns counts."""
    if not 0.0 <= replay_share < 1.0:
        raise AdaptationError(f"replay share {replay_share}: need 0 <= share < 1")
    records = split_site(scan_folder(site))
    rows: list[dict[str, str]] = []
    counts = {"adapt": 0, "validation": 0, "held_out": 0, "replay_train": 0, "replay_val": 0}
    name_of = {"train": "adapt", "val": "validation", "test": "held_out"}
    for r in records:
        rows.append({"path": str(r.path.resolve()), "split": r.split or "train", "label": r.label, "source": SITE_SOURCE,
                     "patient_id": f"site-{r.patient_id or r.path.stem}"})
        counts[name_of[r.split or "train"]] += 1
    if replay and replay_share > 0:
        pool = [r for root in replay for r in scan_folder(root)]
        ratio = replay_share / (1 - replay_share)
        for split, key, n_site in (("train", "replay_train", counts["adapt"]), ("val", "replay_val", counts["validation"])):
            k = round(ratio * n_site) if split == "train" else max(round(ratio * n_site), min_replay_validation)
            chosen = _sample([r for r in pool if r.split == split], k, f"replay-{split}-{seed}")
            for r in chosen:
                rows.append({"path": str(r.path.resolve()), "split": split, "label": r.label, "source": r.source or "replay",
                             "patient_id": f"replay-{r.patient_id or r.path.stem}"})
            counts[key] = len(chosen)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "split", "label", "source", "patient_id"])
        writer.writeheader()
        for i, row in enumerate(rows):
            link = work / row["split"] / row["label"] / f"{i:06d}-{Path(row['path']).name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(row["path"], link)
            writer.writerow({"file": str(link.relative_to(work)), "split": row["split"], "label": row["label"],
                             "source": row["source"], "patient_id": row["patient_id"]})
    held = held_out_folder(work)
    for i, row in enumerate(r for r in rows if r["split"] == "test"):
        link = held / row["label"] / f"{i:06d}-{Path(row['path']).name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(row["path"], link)
    return counts


@dataclass(frozen=True)
class SiteView:
    """A site adaptation's data, as :func:`prepare_site_view` built and checked it."""

    folder: Path  # the labelled folder trained on (build_adapt_folder): site and replayed films, train and val
    counts: dict[str, int]  # site films per split (adapt, validation, held_out) and replay films used
    aux_classes: tuple[str, ...]  # labels trained as auxiliary outputs (multi-class models; see auxiliary_labels)

    @property
    def held_out(self) -> Path:
        return held_out_folder(self.folder)


def prepare_site_view(classes: Sequence[str], binary: str | None, site: Path, work: Path, replay: Sequence[Path] = (),
                      replay_share: float = 0.5, *, seed: int = 0, min_replay_validation: int = MIN_REPLAY_VALIDATION,
                      auxiliary: bool = True) -> SiteView:
    """Build ``site``'s adaptation view in ``work`` (:func:`build_adapt_folder`) for a model with
    ``classes`` (``binary``: its positive class when it is a one-output model) and check, before
    anything trains, that it can be adapted and judged: films on both sides of the split, and
    validation films of the positive class to choose its threshold on. ``adapt`` and the app's site
    adaptation job both start here. AdaptationError says what is missing."""
    counts = build_adapt_folder(site, work, replay, replay_share, seed=seed, min_replay_validation=min_replay_validation)
    if counts["held_out"] == 0 or counts["adapt"] == 0:
        raise AdaptationError(f"Too few films to adapt and judge: {counts['adapt']} to adapt on, {counts['held_out']} held out.")
    positive = binary or classes[0]
    if not _has_validation_films(work, positive):
        # Distillation cannot stand in here: the threshold is chosen on these films.
        raise AdaptationError(f"None of the validation films is {positive}: the {positive} threshold cannot be chosen again. "
                              f"Give the model's training data to mix in (--replay), or a site with more {positive} films.")
    aux = auxiliary_labels(work, classes) if auxiliary and binary is None else ()
    return SiteView(work, counts, aux)


#: what an adaptation used its site films for, in the adapted version's record of them
ADAPTATION_USE = "adaptation (training, calibration and threshold)"


def fitted_site_films(view: Path) -> list[Path]:
    """The site's own films in the adaptation view ``view`` (:func:`build_adapt_folder`) that the
    adaptation trains, calibrates or chooses its threshold on: the adapt and validation halves,
    not the held-out half or the replayed films."""
    with open(view / "metadata.csv", newline="", encoding="utf-8") as handle:
        return [(view / row["file"]).resolve() for row in csv.DictReader(handle)
                if row["source"] == SITE_SOURCE and row["split"] in ("train", "val")]


def cross_fit(config: TrainConfig, data: PreparedData, folds: int, run_dir: Path, stop: threading.Event | None = None) -> OutOfFold | None:
    """Out-of-fold scores of the adapt half (:func:`cxr_core.training.crossval.out_of_fold_logits`,
    the runs under ``run_dir``/crossfit) to calibrate on, or None when ``folds`` is 0."""
    if not folds:
        return None
    from cxr_core.training.crossval import out_of_fold_logits

    return out_of_fold_logits(config, data, folds, run_dir / CROSSFIT_DIR, stop=stop)


def adapt(
    base_folder: Path,
    site: Path,
    out: Path,
    *,
    version: str,
    replay: Sequence[Path] = (),
    replay_share: float = 0.5,
    epochs: int = 3,
    lr: float = 3e-4,
    batch_size: int = 16,
    run_dir: Path | None = None,
    target_sensitivity: float = 0.95,
    device: str | None = None,
    seed: int = 0,
    min_replay_validation: int = MIN_REPLAY_VALIDATION,
    auxiliary: bool = True,
    distill: float = DISTILL,
    distill_on: str = DISTILL_ON,
    interpolate: float = INTERPOLATE,
    distill_classes: str = DISTILL_CLASSES,
    crossfit: int = CROSSFIT,
    size: int | None = None,
) -> AdaptResult:
    """Fine-tune the model in ``base_folder`` on ``site`` (see the module docstring) into ``out``.

    ``auxiliary``: a multi-class model trains the site's (and the replay's) labels it has no class
    for (``nodule``, ``pneumonia``, ...) as auxiliary outputs, dropped from the adapted model,
    instead of leaving those films out: they are films the model must learn apart from its classes
    (on a site with `pneumonia` films the default model's held-out specificity was 0.904 this way
    and 0.886 with them left out: docs/experiments/2026-12-05-adapt-replay-validation.md).

    ``crossfit`` K >= 2: K more fine-tunes, each on all but one fold (by patient) of the adapt half,
    score the fold they did not see; temperature and threshold are fitted on those scores. The
    exported weights are the same as without it.

    ``size``: train, calibrate and export at this input size (px, square) instead of the base
    model's; every prediction with the adapted model is then made at that size.
    """
    from cxr_core.models.fitted_films import record_fitted_films
    from cxr_core.models.loading import load_model
    from cxr_core.training.augment import AugmentConfig
    from cxr_core.training.config import TrainConfig
    from cxr_core.training.finalize import finalize
    from cxr_core.training.trainer import train
    from cxr_core.training.validation import validate_site

    if not 0.0 <= interpolate <= 1.0:
        raise AdaptationError(f"--interpolate {interpolate}: the adapted weights' share must be between 0 and 1")
    if crossfit == 1 or crossfit < 0:
        raise AdaptationError(f"--crossfit {crossfit}: give 0 (off) or at least 2 folds")
    if size is not None and not MIN_SIZE <= size <= MAX_SIZE:
        raise AdaptationError(f"--size {size}: give an input size between {MIN_SIZE} and {MAX_SIZE} px")
    started = time.time()
    base = load_model(base_folder, device=device)
    manifest = base.manifest
    run_dir = run_dir or Path("runs") / f"adapt-{out.name}"
    work = run_dir / "data"
    binary = manifest.classes[0] if manifest.head == "sigmoid" else None
    view = prepare_site_view(manifest.classes, binary, site, work, replay, replay_share, seed=seed,
                             min_replay_validation=min_replay_validation, auxiliary=auxiliary)
    counts, aux, positive = view.counts, view.aux_classes, manifest.classes[0]
    inp = manifest.input
    config = TrainConfig(
        data_dir=str(work), arch=manifest.architecture, out=str(out), model_id=out.name, version=version,
        name=f"{manifest.name}, adapted to {site.name}", classes=tuple(manifest.classes), binary_positive=binary, aux_classes=aux,
        schedule=((size or inp.size[0], epochs),), batch_size=batch_size, lr=lr, balance="source",
        augment=AugmentConfig(scale=(0.85, 1.35), aspect=0.2), init=str(base_folder / manifest.weights_file),
        layer_decay=0.7, target_sensitivity=target_sensitivity, device=device, seed=seed, workers=2,
        mask_burned_in=inp.mask_burned_in, crop=inp.crop, crop_margin=inp.crop_margin or 0.1, intensity=inp.intensity,
        distill=distill, distill_skip_sources=(SITE_SOURCE,) if distill_on == "replay" else (), interpolate=interpolate,
        distill_missing_only=bool(distill) and distill_classes == "missing" and binary is None,
    )
    from cxr_core.training.dataset import DatasetError

    try:
        result, data = train(config, run_dir / "run")
    except DatasetError as exc:
        raise AdaptationError(f"{exc} Give --replay with the model's training data so that every class has films, "
                              "or --distill 1 to keep the base model's view of a class the site has no films of.") from exc
    # The validation films checked above are in the cross-fitted pool, so it has positive films too.
    out_of_fold = cross_fit(config, data, crossfit, run_dir)
    adapted = finalize(config, run_dir / "run", data, result, command=f"adapt {site} --model {manifest.key}", out_of_fold=out_of_fold)
    record_fitted_films(out, fitted_site_films(work), ADAPTATION_USE, manifest)
    held_out = view.held_out
    before = validate_site(base, held_out, target_sensitivity=target_sensitivity).as_dict()
    after = validate_site(load_model(out, device=device), held_out, target_sensitivity=target_sensitivity).as_dict()
    notes = tuple(f"{label}: not a class of {manifest.key}, left out of training" for label in sorted(set(data.report.excluded_labels)))
    notes += tuple(f"{label}: not a class of {manifest.key}, trained as an auxiliary output (not in the adapted model)" for label in aux)
    notes += (f"temperature and {positive} threshold fitted on {adapted.training['calibrated_on']}",)
    return AdaptResult(adapted.key, manifest.key, str(out), counts, before, after, round(time.time() - started, 1), notes)

"""Training jobs launched from the app: each runs in its own process, one at a time.

    var/jobs/<job_id>/job.json     what to train (JobSpec)
    var/jobs/<job_id>/state.json   queued / running / finished / failed / cancelled, pid, error
    var/jobs/<job_id>/run/         the trainer's run folder (progress.jsonl, status.json, last.pt)
    var/jobs/<job_id>/job.log      the process's output
    var/jobs/.lock                 held (flock) by the running job's process

The page only writes job.json, starts ``python -m cxr_core.state.jobs <job_dir>`` in a new
process session and reads files back, so a job survives page reloads and closed
browsers. A job whose process died without saying so (killed, machine restarted) shows
as failed and can be resumed: the trainer continues from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from cxr_core import config
from cxr_core.errors import CxrError
from cxr_core.fileio import write_json

if TYPE_CHECKING:
    from cxr_core.models.versions import Version

log = logging.getLogger(__name__)

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"


class JobError(CxrError):
    """A job cannot be launched, cancelled or resumed as asked."""


def jobs_dir() -> Path:
    return Path(os.environ.get("CXR_JOBS_DIR", config.var_dir() / "jobs"))


@dataclass(frozen=True)
class JobSpec:
    dataset: str
    arch: str
    model_id: str
    version: str
    user: str
    classes: tuple[str, ...] = ("covid", "normal", "viral_pneumonia")
    binary_positive: str | None = None
    aux_classes: tuple[str, ...] = ()  # multi-class: more labels trained as extra outputs, dropped at export
    base_model: str | None = None  # "id@version" to fine-tune from; None: from scratch
    schedule: tuple[tuple[int, int], ...] = ((224, 5),)
    batch_size: int = 32
    lr: float = 1e-3
    balance: str = "weights"
    freeze_epochs: int = 0
    layer_decay: float = 1.0
    patience: int = 0
    target_sensitivity: float = 0.95
    augment: bool = True
    hflip: bool = False
    zoom: tuple[float, float] = (0.9, 1.1)  # zoom augmentation range (above 1: framed tighter)
    aspect: float = 0.0  # aspect-ratio augmentation: stretched by up to 1 + aspect
    edge_crop: float = 0.0  # collimation augmentation: each edge cropped by up to this fraction
    acquisition: float = 0.0  # acquisition augmentation: probability of each artefact (frame, CLAHE, box, resolution, JPEG)
    average_every: int = 0  # export the average of the weights every N steps of the run (SWA); 0: best epoch
    eval_dir: str | None = None
    eval_split: str | None = "test"
    device: str | None = None
    mask_burned_in: bool = False
    #: site adaptation: ``dataset`` is one hospital's films, split by patient (half held out,
    #: scored before and after; the candidate is evaluated there), with ``replay`` folders of
    #: the model's training data mixed in, ``replay_share`` of the films (cxr_core.training.adapt)
    site_adaptation: bool = False
    replay: tuple[str, ...] = ()
    replay_share: float = 0.5
    #: weight of the distillation term toward the base model (TrainConfig.distill); 0 = off
    distill: float = 0.0
    #: site adaptation: K folds of the adapt half whose out-of-fold scores fit the temperature
    #: and COVID-19 threshold (cxr_core.training.adapt.CROSSFIT); 0 = the validation films alone
    crossfit: int = 0
    job_id: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        data = dict(data)
        data["classes"] = tuple(data.get("classes", ()))
        data["aux_classes"] = tuple(data.get("aux_classes", ()))
        data["replay"] = tuple(data.get("replay", ()))
        data["schedule"] = tuple(tuple(p) for p in data.get("schedule", ()))
        if "zoom" in data:
            data["zoom"] = tuple(data["zoom"])
        return cls(**data)


@dataclass(frozen=True)
class TrainingPreset:
    """A named starting point for a job on the Training page; every value can still be changed
    under "Advanced". ``fine_tune``: starts from a registered model's weights (the active
    version of the model chosen), keeping its classes, input size and view."""

    name: str
    description: str
    fine_tune: bool
    epochs: int
    lr: float
    freeze_epochs: int
    layer_decay: float
    patience: int
    zoom: tuple[float, float] = (0.85, 1.35)
    aspect: float = 0.2
    edge_crop: float = 0.0
    acquisition: float = 0.0
    balance: str = "source"
    batch_size: int = 32
    #: the dataset is one hospital's films: split by patient, half held out (cxr_core.training.adapt)
    site_adaptation: bool = False


#: the Training page's presets. Augmentation and balance as the shipped DenseNet121 (1.3.0) was
#: trained: a wide zoom and an aspect stretch, so a collection's framing and body proportions
#: cannot stand in for the disease, and every (source, label) group weighted alike. Edge crops
#: and acquisition artefacts stay off: neither has been measured to help a held-out source yet
#: (docs/experiments/2026-12-05-acquisition-augmentation-loso.md)
PRESETS: tuple[TrainingPreset, ...] = (
    TrainingPreset("Fine-tune the active model (quick)",
                   "Two epochs from the active version's weights: its head first, then the whole network at a low rate. "
                   "Minutes on a GPU, about 10 minutes per 1,000 films on a laptop CPU.",
                   fine_tune=True, epochs=2, lr=3e-4, freeze_epochs=1, layer_decay=0.7, patience=0),
    TrainingPreset("Fine-tune (thorough)",
                   "Eight epochs from the active version's weights, stopping early when validation stops improving. "
                   "For a few thousand films of this hospital.",
                   fine_tune=True, epochs=8, lr=3e-4, freeze_epochs=1, layer_decay=0.7, patience=3),
    TrainingPreset("Adapt to this site",
                   "Three epochs from the active version on this hospital's films: half of its patients held out and scored "
                   "before and after, the original training films mixed in so that the model does not forget them. Promotion "
                   "needs it better on the held-out films and COVID-19 sensitivity kept at 0.95 on the shared test split.",
                   fine_tune=True, epochs=3, lr=3e-4, freeze_epochs=0, layer_decay=0.7, patience=0, batch_size=16,
                   site_adaptation=True),
    TrainingPreset("Train from scratch",
                   "A new network from random weights: needs thousands of films per class and hours to days on a CPU.",
                   fine_tune=False, epochs=20, lr=2e-3, freeze_epochs=0, layer_decay=1.0, patience=5),
)


@dataclass(frozen=True)
class JobProgress:
    """How far a running job is, for a progress bar: ``fraction`` in [0, 1] and the words beside it."""

    fraction: float
    text: str


def describe_progress(events: Sequence[Mapping[str, Any]], total_epochs: int) -> JobProgress:
    """A running job's progress from its run's events: reading the data (films done of all),
    then steps, or whole epochs when an epoch has fewer steps than are logged (a small dataset)."""
    total_epochs = max(1, total_epochs)
    last_step = next((e for e in reversed(events) if e["event"] == "step"), None)
    done_epochs = sum(e["event"] == "epoch" for e in events)
    if last_step is not None and last_step["epoch"] >= done_epochs:
        eta = last_step.get("eta_s")
        return JobProgress(
            min(1.0, (last_step["epoch"] + last_step["step"] / last_step["steps"]) / total_epochs),
            f"Training: epoch {last_step['epoch'] + 1}/{total_epochs}, step {last_step['step']}/{last_step['steps']}, "
            f"{last_step.get('images_per_s', 0):.1f} images/s" + (f", about {eta / 60:.0f} min left" if eta else ""))
    if any(e["event"] == "start" for e in events):
        return JobProgress(min(1.0, done_epochs / total_epochs), f"Training: {done_epochs} of {total_epochs} epochs done")
    reading = next((e for e in reversed(events) if e["event"] == "preparing" and e.get("total")), None)
    if reading is not None:
        return JobProgress(0.0, f"Reading and checking the data: {reading['done']} of {reading['total']} films")
    return JobProgress(0.0, "Reading and checking the data…")


def job_runs(job_dir: Path, spec: JobSpec) -> list[Path]:
    """The run folders a job trains, in order: its run, then a site adaptation's cross-fitting folds."""
    from cxr_core.training.adapt import CROSSFIT_DIR

    folds = spec.crossfit if spec.site_adaptation else 0
    return [job_dir / "run", *(job_dir / CROSSFIT_DIR / f"fold-{i + 1}" for i in range(folds))]


def describe_job_progress(run_events: Sequence[Sequence[Mapping[str, Any]]], total_epochs: int) -> JobProgress:
    """:func:`describe_progress` over a job's runs (:func:`job_runs`), each ``total_epochs`` long:
    the run under way, and the share of all of them done."""
    if len(run_events) <= 1:
        return describe_progress(run_events[0] if run_events else [], total_epochs)
    current = max((i for i, events in enumerate(run_events) if events), default=0)
    inner = describe_progress(run_events[current], total_epochs)
    n = len(run_events)
    what = "Adapting" if current == 0 else f"Cross-fitting the threshold, fold {current} of {n - 1}"
    return JobProgress((current + inner.fraction) / n, f"{what}: {inner.text[0].lower()}{inner.text[1:]}")


@dataclass(frozen=True)
class JobState:
    state: str
    pid: int | None = None
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    candidate: str | None = None  # id@version written to the registry
    device: str | None = None


def _alive(pid: int | None, job_dir: Path | None = None) -> bool:
    """Whether ``pid`` runs; with ``job_dir``, whether it runs *that job*. A recorded pid can
    be reused by an unrelated process after a reboot or a long time: cancel must never
    signal someone else's process group, and a job must not look alive because of one."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return job_dir is None  # another user's process is never a job this app started
    try:
        # A zombie (exited, not yet reaped by its parent) is not running.
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            if handle.read().split(") ", 1)[1][0] == "Z":
                return False
        if job_dir is not None:
            # Both the job process and torchrun carry the job folder in their arguments.
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                return job_dir.name.encode() in handle.read()
    except OSError:
        pass
    return True


def read_spec(job_dir: Path) -> JobSpec:
    return JobSpec.from_dict(json.loads((job_dir / "job.json").read_text(encoding="utf-8")))


def read_state(job_dir: Path) -> JobState:
    path = job_dir / "state.json"
    if not path.exists():
        return JobState(QUEUED)
    state = JobState(**json.loads(path.read_text(encoding="utf-8")))
    if state.state in (RUNNING, QUEUED) and state.pid and not _alive(state.pid, job_dir):
        return replace(state, state=FAILED, error=state.error or "The job's process ended without finishing (killed or crashed). It can be resumed.")
    return state


def list_jobs() -> list[tuple[Path, JobSpec, JobState]]:
    root = jobs_dir()
    if not root.is_dir():
        return []
    out = []
    for job_dir in sorted((p for p in root.iterdir() if (p / "job.json").exists()), reverse=True):
        try:
            out.append((job_dir, read_spec(job_dir), read_state(job_dir)))
        except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
            log.warning("unreadable job %s: %s", job_dir.name, exc)
    return out


def running_job() -> Path | None:
    for job_dir, _, state in list_jobs():
        if state.state in (RUNNING, QUEUED) and _alive(state.pid, job_dir):
            return job_dir
    return None


def create_job(spec: JobSpec) -> Path:
    """Record a new job. Refused when its version exists, or another job will write it:
    a registered version is never overwritten (it may be the active model)."""
    from cxr_core.models.versions import candidate_folder

    candidate_folder(spec.model_id, spec.version)
    for other_dir, other, _ in list_jobs():
        if (other.model_id, other.version) == (spec.model_id, spec.version):
            raise JobError(f"Job {other_dir.name} already trains {spec.model_id}@{spec.version}: resume it, or choose another version.")
    job_dir = jobs_dir() / spec.job_id
    job_dir.mkdir(parents=True, exist_ok=False)
    write_json(job_dir / "job.json", asdict(spec))
    return job_dir


def gpus_for(spec: JobSpec) -> int:
    """Processes a job trains with: one per visible GPU (``CXR_TRAIN_GPUS`` caps it) unless
    the job names a device; 1 means a single process (GPU or CPU).
    ``CXR_TRAIN_PROCESSES`` forces a number (e.g. 2 CPU processes over gloo, for tests)."""
    import torch

    forced = os.environ.get("CXR_TRAIN_PROCESSES", "")
    if forced.isdigit() and int(forced) >= 1:
        return int(forced)
    if spec.device not in (None, "", "cuda") or not torch.cuda.is_available():
        return 1
    count = torch.cuda.device_count()
    cap = os.environ.get("CXR_TRAIN_GPUS")
    return max(1, min(count, int(cap))) if cap and cap.isdigit() else count


@contextmanager
def _launch_lock() -> Iterator[None]:
    """Held from "is a job running?" until the new job's state says queued, so two admins
    pressing Launch at the same moment get one job and one clear refusal (not two
    processes racing for the training lock, the second failing after it started)."""
    path = jobs_dir() / ".launch"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # one open file description per call: flock excludes threads too
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def launch(job_dir: Path) -> int:
    """Start (or resume) the job in a new process; refuse while another job runs."""
    with _launch_lock():
        return _launch_unlocked(job_dir)


def _launch_unlocked(job_dir: Path) -> int:
    busy = running_job()
    if busy is not None and busy != job_dir:
        raise JobError(f"Job {busy.name} is still running: one training job at a time. Cancel it or wait for it to finish.")
    if busy == job_dir:
        raise JobError("This job is already running.")
    (job_dir / "CANCEL").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(config.PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    gpus = gpus_for(read_spec(job_dir))
    command = [sys.executable, "-m", "cxr_core.state.jobs", str(job_dir)]
    if gpus > 1:
        # One process per GPU, data-parallel (cxr_core.training.distributed); torchrun leads the
        # process group, so cancel's killpg reaches every rank.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", *command[1:]]
    with open(job_dir / "job.log", "ab") as out:
        process = subprocess.Popen(
            command,
            cwd=config.PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the Streamlit script and its session
        )
    write_json(job_dir / "state.json", asdict(JobState(QUEUED, pid=process.pid, started=datetime.now(timezone.utc).isoformat(timespec="seconds"))))
    return process.pid


def cancel(job_dir: Path) -> None:
    (job_dir / "CANCEL").touch()
    state = read_state(job_dir)
    if state.pid and _alive(state.pid, job_dir):
        try:
            os.killpg(state.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def log_tail(job_dir: Path, lines: int = 40) -> str:
    path = job_dir / "job.log"
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


# --- The job's own process -----------------------------------------------------------------


def _base_version(spec: JobSpec) -> Version | None:
    """The registered version the job starts from (``spec.base_model``, ID@VERSION), or None for a
    job from random weights; JobError when it is no longer in the registry."""
    if not spec.base_model:
        return None
    from cxr_core.models.pointer import RegistryError
    from cxr_core.models.versions import find_version

    name, _, version = spec.base_model.partition("@")
    try:
        return find_version(name, version)
    except RegistryError:
        raise JobError(f"Base model {spec.base_model} is not in the registry.") from None


def _train_config(spec: JobSpec, out: Path) -> Any:
    from cxr_core.training.augment import AugmentConfig
    from cxr_core.training.config import TrainConfig

    init = "random"
    mask = spec.mask_burned_in
    view: dict[str, Any] = {}
    base = _base_version(spec)
    if base:
        init = str(base.path / base.manifest.weights_file)
        mask = mask or base.manifest.input.mask_burned_in  # a masked model never saw text: keep it so
        # A fine-tune sees films as its base model did (lung crop, intensity standardisation).
        base_input = base.manifest.input
        view = {"crop": base_input.crop, "crop_margin": base_input.crop_margin or 0.1, "intensity": base_input.intensity}
    return TrainConfig(
        data_dir=spec.dataset, arch=spec.arch, out=str(out), model_id=spec.model_id, version=spec.version,
        name=f"{spec.model_id} (trained {spec.created[:10]} by {spec.user})", classes=spec.classes,
        binary_positive=spec.binary_positive, aux_classes=tuple(spec.aux_classes), schedule=spec.schedule, batch_size=spec.batch_size, lr=spec.lr,
        balance=spec.balance, augment=AugmentConfig(hflip=spec.hflip, scale=spec.zoom, aspect=spec.aspect, edge_crop=spec.edge_crop,
                              acquisition=spec.acquisition) if spec.augment else AugmentConfig.none(),
        init=init, freeze_epochs=spec.freeze_epochs, layer_decay=spec.layer_decay, patience=spec.patience,
        target_sensitivity=spec.target_sensitivity, device=spec.device, workers=2, mask_burned_in=mask,
        average_every=spec.average_every, distill=spec.distill if spec.base_model else 0.0, **view,
    )


#: a site adaptation's view of its data, in the job's folder (cxr_core.training.adapt.build_adapt_folder)
SITE_VIEW = "site-view"


def _crossfit(job_dir: Path, spec: JobSpec, config_: Any, data: Any, stop: threading.Event) -> Any:
    """A site adaptation's out-of-fold scores (every rank trains the folds), or None."""
    from cxr_core.training.adapt import cross_fit

    return cross_fit(config_, data, spec.crossfit if spec.site_adaptation else 0, job_dir, stop=stop)


def _site_view(job_dir: Path, spec: JobSpec) -> tuple[str, str, None]:
    """(training folder, evaluation folder, split) for a site adaptation: the site's films split
    by patient with replay films mixed in, and the held-out half as the evaluation set. Built and
    checked once, as ``adapt`` does (:func:`cxr_core.training.adapt.prepare_site_view`: a site that
    cannot be adapted fails here, before anything trains); a resumed job reuses it."""
    from cxr_core.training.adapt import held_out_folder, prepare_site_view

    view = job_dir / SITE_VIEW
    if not (job_dir / "site-films.json").is_file():  # written only once the view passed its checks
        built = prepare_site_view(spec.classes, spec.binary_positive, Path(spec.dataset), view,
                                  [Path(r) for r in spec.replay], spec.replay_share, auxiliary=False)
        write_json(job_dir / "site-films.json", built.counts)
    return str(view), str(held_out_folder(view)), None


#: how long a follower rank waits for rank 0 to build a site adaptation's view of its data
SITE_VIEW_WAIT_S = 600.0


def _failed_since(job_dir: Path, since: float) -> bool:
    """Whether rank 0 recorded a failure after ``since`` (a failure left by an earlier attempt
    of a resumed job is older, and rank 0 overwrites it when it starts)."""
    path = job_dir / "state.json"
    try:
        return path.stat().st_mtime >= since and json.loads(path.read_text(encoding="utf-8")).get("state") == FAILED
    except (OSError, ValueError):
        return False  # not written yet, or being written


def _training_inputs(job_dir: Path, spec: JobSpec, *, follower: bool = False,
                     stop: threading.Event | None = None) -> tuple[JobSpec, str | None, str | None]:
    """(the spec as trained: dataset and auxiliary classes, evaluation folder, its split).

    A site adaptation trains on its view of the data (:func:`_site_view`), and a multi-class
    model trains the site's labels it has no class for as auxiliary outputs, as ``adapt`` does.
    Every rank must train on the same view: rank 0 builds it, a follower waits for it (and
    stops waiting when ``stop`` is set: the job was cancelled).
    """
    if not spec.site_adaptation:
        return spec, spec.eval_dir, spec.eval_split
    if follower:
        from cxr_core.training.trainer import TrainingCancelled

        deadline = time.monotonic() + SITE_VIEW_WAIT_S
        waiting_since = time.time()
        while not (job_dir / "site-films.json").is_file():
            if stop is not None and stop.is_set():
                raise TrainingCancelled("The job was cancelled before its site view was built.")
            if _failed_since(job_dir, waiting_since):
                raise JobError("The first process failed before it built the site adaptation's view of its data.")
            if time.monotonic() > deadline:
                raise JobError("The site adaptation's view of its data was not built in time by the first process.")
            time.sleep(0.5)
    dataset, eval_dir, eval_split = _site_view(job_dir, spec)
    trained = replace(spec, dataset=dataset)
    if spec.binary_positive is None and not spec.aux_classes:
        from cxr_core.training.adapt import auxiliary_labels

        trained = replace(trained, aux_classes=auxiliary_labels(Path(dataset), spec.classes))
    return trained, eval_dir, eval_split


def _record_site_adaptation(job_dir: Path, spec: JobSpec, staging: Path) -> None:
    """Before/after on the site's held-out films (the figures of a site validation) and the
    candidate's COVID-19 sensitivity on the first replay folder's test split, in the candidate's
    folder (site_adaptation.json): what its promotion is judged by.

    Both held-out scorings are site validations (patients neither model trained, calibrated or
    chose a threshold on), so both are also recorded as such: Diagnose then shows the adapted
    model, once promoted, as validated at this site instead of "not validated"."""
    from cxr_core.models.loading import load_model
    from cxr_core.models.versions import SITE_ADAPTATION_NAME
    from cxr_core.state.datasets import list_datasets
    from cxr_core.state.site_validations import record_held_out_validations
    from cxr_core.training.adapt import held_out_folder
    from cxr_core.training.evaluate import evaluate_folder
    from cxr_core.training.validation import validate_site

    held_out = held_out_folder(job_dir / SITE_VIEW)
    base = _base_version(spec)  # a site adaptation always has one
    candidate = load_model(staging)
    record: dict[str, Any] = {
        "site": spec.dataset, "films": json.loads((job_dir / "site-films.json").read_text(encoding="utf-8")),
        "before": validate_site(load_model(base.path), held_out).as_dict() if base else None,
        "after": validate_site(candidate, held_out).as_dict(), "shared_test": None, "distill": spec.distill,
    }
    site = next((d.name for d in list_datasets() if str(d.root) == spec.dataset), Path(spec.dataset).name)
    record_held_out_validations(record["before"], record["after"], user=spec.user,
                                data_name=f"{site}, held-out half (site adaptation job {spec.job_id})")
    if spec.replay:
        shared = evaluate_folder(candidate, Path(spec.replay[0]), split="test").as_dict()
        covid = (shared.get("per_class") or {}).get("covid", {})  # type: ignore[union-attr]
        record["shared_test"] = {"folder": spec.replay[0], "n": shared["n"], "covid_sensitivity": covid.get("recall")}
    write_json(staging / SITE_ADAPTATION_NAME, record)


#: what a training job (other than a site adaptation) used its films for
FINE_TUNE_USE = "training (weights, calibration and threshold)"


def _record_fitted_films(job_dir: Path, spec: JobSpec, staging: Path, data: Any) -> None:
    """Record in the candidate's manifest which films it was fitted on
    (:mod:`cxr_core.models.fitted_films`), before it is evaluated: a site adaptation's own site
    films (adapt and validation halves; not the replayed ones), any other job's training and
    validation films. A validation or evaluation on any of them is then flagged."""
    from cxr_core.models.fitted_films import record_fitted_films
    from cxr_core.training.adapt import ADAPTATION_USE, fitted_site_films

    version = _base_version(spec)
    base = version.manifest if version else None
    if spec.site_adaptation:
        record_fitted_films(staging, fitted_site_films(job_dir / SITE_VIEW), ADAPTATION_USE, base)
    else:
        record_fitted_films(staging, [r.path for part in (data.train, data.val) for r in part.records], FINE_TUNE_USE, base)


def _staging_folder(spec: JobSpec) -> Path:
    """Where every rank's config points the candidate: built here, renamed into the registry
    when complete (the configs must match across ranks and across resumes)."""
    from cxr_core.models.versions import staging_folder

    return staging_folder(spec.model_id, spec.version)


def _group() -> int:
    """The job's process group: the job process itself, or torchrun leading the ranks.
    Recorded as the job's pid so that cancel and kill reach every process."""
    return os.getpgid(0)


def _run_job_follower(job_dir: Path) -> int:
    """Ranks 1..N-1 of a multi-GPU job: train alongside rank 0, which does everything else."""
    from cxr_core.training import distributed
    from cxr_core.training.evaluation_set import exclude_evaluation_overlap
    from cxr_core.training.prepare import prepare_data
    from cxr_core.training.trainer import TrainingCancelled, final_spec, label_plan, train

    spec = read_spec(job_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        trained, eval_dir, eval_split = _training_inputs(job_dir, spec, follower=True, stop=stop)
    except TrainingCancelled:
        return 0
    config_ = _train_config(trained, _staging_folder(spec))
    data = prepare_data(trained.dataset, label_plan(config_), max(s for s, _ in config_.schedule), workers=2, mask_text=config_.mask_burned_in, crop=final_spec(config_))
    if eval_dir:
        data = exclude_evaluation_overlap(data, Path(eval_dir), eval_split)
    try:
        _, data = train(config_, job_dir / "run", data=data, stop=stop)
        _crossfit(job_dir, spec, config_, data, stop)
    except TrainingCancelled:
        pass
    finally:
        distributed.stop()
    return 0


def run_job(job_dir: Path) -> int:
    """Body of ``python -m cxr_core.state.jobs JOB_DIR``: train, write the candidate, evaluate it."""
    from cxr_core.models.pointer import registry_dir
    from cxr_core.training.evaluation_set import (
        evaluate_active_alongside,
        evaluate_candidate,
        exclude_evaluation_overlap,
    )
    from cxr_core.training.finalize import finalize
    from cxr_core.training.prepare import prepare_data
    from cxr_core.training.trainer import TrainingCancelled, final_spec, label_plan, train

    job_dir = Path(job_dir)
    from cxr_core.training import distributed
    if not distributed.world_from_env().main:
        return _run_job_follower(job_dir)
    lock_path = jobs_dir() / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(lock_path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        write_json(job_dir / "state.json", asdict(JobState(FAILED, pid=_group(), error="Another training job is running.")))
        return 3
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    spec = read_spec(job_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_cancel() -> None:
        while not stop.is_set():
            if (job_dir / "CANCEL").exists():
                stop.set()
            time.sleep(0.5)

    threading.Thread(target=watch_cancel, daemon=True).start()
    # The candidate is built in a hidden staging folder and renamed into the registry only
    # when complete (weights, calibration, gate, card, evaluation): the Models page never
    # lists a half-written version, and an existing version is never written over.
    out = registry_dir() / spec.model_id / spec.version
    staging = _staging_folder(spec)
    from cxr_core.models.loading import select_device

    device = str(select_device(spec.device))
    write_json(job_dir / "state.json", asdict(JobState(RUNNING, pid=_group(), started=started, device=device)))
    try:
        trained, eval_dir, eval_split = _training_inputs(job_dir, spec)
        config_ = _train_config(trained, staging)
        data = prepare_data(trained.dataset, label_plan(config_), max(s for s, _ in config_.schedule), workers=2, mask_text=config_.mask_burned_in, crop=final_spec(config_))
        if eval_dir:
            data = exclude_evaluation_overlap(data, Path(eval_dir), eval_split)
        result, data = train(config_, job_dir / "run", data=data, stop=stop)
        out_of_fold = _crossfit(job_dir, spec, config_, data, stop)
        distributed.stop()
        finalize(config_, job_dir / "run", data, result, command=f"app job {spec.job_id} by {spec.user}", out_of_fold=out_of_fold)
        _record_fitted_films(job_dir, spec, staging, data)
        if eval_dir:
            evaluate_candidate(staging, Path(eval_dir), eval_split)
            evaluate_active_alongside(spec.model_id, Path(eval_dir), eval_split)
        if spec.site_adaptation:
            _record_site_adaptation(job_dir, spec, staging)
        try:
            os.rename(staging, out)  # atomic; refuses an existing non-empty folder
        except OSError as exc:
            raise JobError(f"Version {spec.model_id}@{spec.version} appeared in the registry during training; "
                           f"the finished model is kept in {staging}.") from exc
        write_json(job_dir / "state.json", asdict(JobState(FINISHED, pid=_group(), started=started, device=device,
                                                            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                                            candidate=f"{spec.model_id}@{spec.version}")))
        return 0
    except TrainingCancelled:
        write_json(job_dir / "state.json", asdict(JobState(CANCELLED, pid=_group(), started=started, device=device, error="Cancelled; it can be resumed.")))
        return 0
    except Exception as exc:  # noqa: BLE001 - the job's last word goes to its state, the traceback to its log
        traceback.print_exc()
        message = str(exc) if isinstance(exc, CxrError) else f"{type(exc).__name__}: {exc}"
        write_json(job_dir / "state.json", asdict(JobState(FAILED, pid=_group(), started=started, device=device, error=message)))
        return 1
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_job(Path(sys.argv[1])))

"""Training jobs in their own process: launch, progress, lock, cancel, kill -9, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from cxr_core.errors import CxrError
from cxr_core.state.jobs import CANCELLED, FAILED, FINISHED, JobError, JobSpec, cancel, create_job, launch, read_state
from cxr_core.training.run import RunDir
from tests.synthetic import make_labelled_folder


@pytest.fixture()
def job_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("CXR_DEVICE", "cpu")
    make_labelled_folder(tmp_path / "data", per_class={"train": 16, "val": 6})
    make_labelled_folder(tmp_path / "eval", per_class={"test": 6}, seed=9)
    return tmp_path


def _spec(env: Path, epochs: int, version: str) -> JobSpec:
    return JobSpec(dataset=str(env / "data"), arch="cnn5", model_id="tiny", version=version, user="alice",
                   schedule=((32, epochs),), batch_size=8, lr=3e-3, eval_dir=str(env / "eval"), eval_split="test")


def site_adaptation_spec(env: Path) -> JobSpec:
    """A base model tiny@1.0.0 (3 classes), a site of 36 films with a label it has no class for
    (nodule), a replay folder, and the job that adapts the model to the site."""
    from tests.conftest import make_model_folder

    make_model_folder(env / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), id="tiny", version="1.0.0", size=32)
    site = make_labelled_folder(env / "site", ("covid", "normal", "nodule"), per_class={"all": 12}, splits=False, size=48, seed=5)
    replay = make_labelled_folder(env / "replay", per_class={"train": 8, "val": 4, "test": 4}, size=48, seed=6)
    return JobSpec(dataset=str(site), arch="cnn5", model_id="tiny", version="1.1.0-site", user="alice", base_model="tiny@1.0.0",
                   schedule=((32, 1),), batch_size=8, lr=1e-3, balance="source", site_adaptation=True, replay=(str(replay),))


def _wait(job_dir: Path, predicate, timeout: float = 420.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out; state {read_state(job_dir)}; log:\n{(job_dir / 'job.log').read_text()[-3000:]}")


def _epochs(job_dir: Path) -> int:
    return sum(e["event"] == "epoch" for e in RunDir(job_dir / "run").events())


def test_job_trains_a_candidate_and_one_job_runs_at_a_time(job_env: Path) -> None:
    from cxr_core.models.versions import list_versions

    first = create_job(_spec(job_env, 3, "2.0.0"))
    launch(first)
    second = create_job(_spec(job_env, 1, "2.0.1"))
    with pytest.raises(JobError, match="one training job at a time"):
        launch(second)
    _wait(first, lambda: read_state(first).state in (FINISHED, FAILED))
    state = read_state(first)
    assert state.state == FINISHED, (state, (first / "job.log").read_text()[-2000:])
    assert state.candidate == "tiny@2.0.0" and state.device == "cpu"
    status = json.loads((first / "run" / "status.json").read_text())
    assert status["event"] == "epoch" and _epochs(first) == 3
    version = next(v for v in list_versions("tiny") if v.version == "2.0.0")
    assert not version.active and version.evaluation is not None and version.evaluation["n"] == 18
    # The candidate records the films it was trained and calibrated on; the evaluation set was not among them.
    from cxr_core.fileio import sha256_file
    from cxr_core.models.fitted_films import fitted_fingerprints, fitted_uses

    trained_on = {sha256_file(f)[:16] for split in ("train", "val") for f in (job_env / "data" / split).rglob("*.png")}
    assert fitted_fingerprints(version.manifest) == trained_on and len(trained_on) == 66
    assert fitted_uses(version.manifest) == ("training (weights, calibration and threshold)",)
    assert version.evaluation["fitted_films"] == 0
    # A version that exists, or that another job will write, is refused before anything runs.
    with pytest.raises(CxrError, match="already exists"):
        create_job(_spec(job_env, 1, "2.0.0"))
    with pytest.raises(JobError, match="already trains tiny@2.0.1"):
        create_job(_spec(job_env, 1, "2.0.1"))
    assert not list((job_env / "var" / "registry" / "tiny").glob(".staging-*"))  # renamed into place
    launch(second)  # free again
    _wait(second, lambda: read_state(second).state in (FINISHED, FAILED))
    assert read_state(second).state == FINISHED


def test_cancel_kill_and_resume(job_env: Path) -> None:
    job = create_job(_spec(job_env, 25, "3.0.0"))
    launch(job)
    _wait(job, lambda: _epochs(job) >= 1)
    cancel(job)
    _wait(job, lambda: read_state(job).state == CANCELLED, timeout=120)
    done = _epochs(job)
    assert 1 <= done < 25

    launch(job)  # resume after a cancel
    _wait(job, lambda: _epochs(job) >= done + 1)
    pid = read_state(job).pid
    assert pid
    os.killpg(pid, signal.SIGKILL)  # no chance to say anything
    _wait(job, lambda: read_state(job).state == FAILED, timeout=60)
    assert "ended without finishing" in (read_state(job).error or "")
    before = _epochs(job)

    launch(job)  # resume after kill -9, from the last checkpoint
    _wait(job, lambda: read_state(job).state in (FINISHED, FAILED), timeout=900)
    assert read_state(job).state == FINISHED
    events = [e["event"] for e in RunDir(job / "run").events()]
    assert events.count("resumed") == 2
    epochs = [e["epoch"] for e in RunDir(job / "run").events() if e["event"] == "epoch"]
    assert sorted(set(epochs)) == list(range(25)) and before < len(epochs)


def test_a_reused_pid_is_not_the_job_and_cancel_leaves_it_alone(job_env: Path) -> None:
    """After a reboot a recorded pid can belong to anything: the job reads as failed
    (resumable), no launch is blocked by it, and cancel never signals that process group."""
    import subprocess
    from dataclasses import asdict

    from cxr_core.fileio import write_json
    from cxr_core.state.jobs import RUNNING, JobState, running_job

    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        job = create_job(_spec(job_env, 1, "5.0.0"))
        write_json(job / "state.json", asdict(JobState(RUNNING, pid=stranger.pid, started="2026-01-01T00:00:00+00:00")))
        assert read_state(job).state == FAILED
        assert running_job() is None
        cancel(job)
        time.sleep(0.3)
        assert stranger.poll() is None, "cancel signalled a process that is not the job"
    finally:
        stranger.kill()
        stranger.wait()


def test_two_launches_at_the_same_moment_start_one_job(job_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two admins press Launch together: one job starts, the other launch is refused before
    any process starts (it used to start, then fail on the training lock)."""
    import subprocess
    import sys
    import threading

    import cxr_core.state.jobs as jobs

    started: list[subprocess.Popen] = []
    real_popen, real_running_job = subprocess.Popen, jobs.running_job

    def fake_popen(command, **kwargs):  # type: ignore[no-untyped-def]
        # A stand-in process whose command line names the job (what _alive checks).
        process = real_popen([sys.executable, "-c", "import time; time.sleep(30)", command[-1]], start_new_session=True)
        started.append(process)
        return process

    def slow_running_job():  # type: ignore[no-untyped-def]
        found = real_running_job()
        time.sleep(0.5)  # widen the window between the check and the start
        return found

    monkeypatch.setattr(jobs.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(jobs, "running_job", slow_running_job)
    first, second = create_job(_spec(job_env, 1, "6.0.0")), create_job(_spec(job_env, 1, "6.0.1"))
    outcomes: list[str] = []

    def press(job_dir: Path) -> None:
        try:
            launch(job_dir)
            outcomes.append("started")
        except JobError as exc:
            outcomes.append(f"refused: {exc}")

    try:
        threads = [threading.Thread(target=press, args=(j,)) for j in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(o.split(":")[0] for o in outcomes) == ["refused", "started"], outcomes
        assert len(started) == 1
        assert "one training job at a time" in [o for o in outcomes if o.startswith("refused")][0]
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_zoom_and_aspect_reach_the_training_config_and_survive_a_reload(job_env: Path) -> None:
    from cxr_core.state.jobs import _train_config

    spec = JobSpec(dataset=str(job_env / "data"), arch="cnn5", model_id="tiny", version="9.0.0", user="alice",
                   zoom=(0.85, 1.35), aspect=0.2, edge_crop=0.1, average_every=20, aux_classes=("bacterial_pneumonia",),
                   acquisition=0.3)
    again = JobSpec.from_dict(json.loads(json.dumps(asdict(spec))))
    assert again == spec
    config = _train_config(again, job_env / "out")
    assert config.augment.scale == (0.85, 1.35) and config.augment.aspect == 0.2 and config.average_every == 20
    assert config.augment.edge_crop == 0.1 and config.augment.acquisition == 0.3
    assert config.aux_classes == ("bacterial_pneumonia",) and config.n_outputs == 4
    # A job recorded before these options existed gets the library's defaults.
    old = {k: v for k, v in json.loads(json.dumps(asdict(spec))).items() if k not in ("zoom", "aspect", "edge_crop", "average_every", "aux_classes", "acquisition")}
    old_config = _train_config(JobSpec.from_dict(old), job_env / "out")
    assert old_config.augment.scale == (0.9, 1.1) and old_config.augment.edge_crop == 0.0 and old_config.average_every == 0 and old_config.aux_classes == ()
    assert old_config.augment.acquisition == 0.0


@pytest.mark.parametrize("model_id, version", [("tiny", "../../weights/tiny/1.0.0"), ("tiny", "2.0/evil"), ("../tiny", "2.0.0"),
                                                ("tiny", ""), ("tiny", "2.0 0")])
def test_a_job_whose_model_id_or_version_is_not_a_folder_name_is_refused(job_env: Path, model_id: str, version: str) -> None:
    """Both name the candidate's folder in the registry: a path there would write outside it."""
    from cxr_core.models.pointer import RegistryError
    from cxr_core.state.jobs import list_jobs

    with pytest.raises(RegistryError, match="use letters, digits"):
        create_job(replace(_spec(job_env, 1, "2.0.0"), model_id=model_id, version=version))
    assert list_jobs() == []


def test_progress_says_reading_then_training_also_when_no_step_is_logged() -> None:
    """A tiny dataset logs no step within an epoch: once training has started the bar must say
    "Training", not "Reading and checking the data"."""
    from cxr_core.state.jobs import describe_progress

    assert describe_progress([], 2).text == "Reading and checking the data…"
    reading = [{"event": "preparing", "message": "reading"}, {"event": "preparing", "done": 2048, "total": 4000}]
    assert describe_progress(reading, 2).text == "Reading and checking the data: 2048 of 4000 films"
    started = [*reading, {"event": "start"}]
    assert describe_progress(started, 2).text == "Training: 0 of 2 epochs done"
    one_epoch = [*started, {"event": "epoch", "epoch": 0, "val_loss": 0.5, "val_accuracy": 0.8}]
    progress = describe_progress(one_epoch, 2)
    assert progress.fraction == 0.5 and progress.text == "Training: 1 of 2 epochs done"
    stepping = [*one_epoch, {"event": "step", "epoch": 1, "step": 10, "steps": 20, "images_per_s": 12.5, "eta_s": 120}]
    progress = describe_progress(stepping, 2)
    assert progress.fraction == 0.75 and progress.text.startswith("Training: epoch 2/2, step 10/20, 12.5 images/s, about 2 min left")


def test_presets_are_valid_jobs_the_page_can_show() -> None:
    from cxr_core.state.jobs import PRESETS
    from cxr_core.training.augment import MAX_ASPECT, MAX_EDGE_CROP

    assert [p.name for p in PRESETS] == ["Fine-tune the active model (quick)", "Fine-tune (thorough)", "Adapt to this site", "Train from scratch"]
    assert [p.fine_tune for p in PRESETS] == [True, True, True, False]
    assert [p.site_adaptation for p in PRESETS] == [False, False, True, False]
    for preset in PRESETS:
        assert 1 <= preset.epochs <= 200 and 1e-6 <= preset.lr <= 1e-1 and 0.1 <= preset.layer_decay <= 1.0
        assert preset.aspect <= MAX_ASPECT and preset.edge_crop <= MAX_EDGE_CROP and 0 <= preset.acquisition <= 1
        assert preset.balance in ("weights", "sampler", "source", "none") and preset.description
    assert PRESETS[0].epochs < PRESETS[1].epochs


def test_the_adapt_preset_trains_what_adapt_trains_by_default(job_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Adapt to this site", as the Training page fills a job from it, trains with the recipe that
    ``adapt`` runs by default and that the measurements are of (a batch of 32 instead of 16 once
    took half the steps in the same three epochs)."""
    from cxr_core.state.jobs import PRESETS, _train_config
    from cxr_core.training import trainer
    from cxr_core.training.adapt import adapt

    class Captured(Exception):
        pass

    def capture(config, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise Captured(config)

    # Modules that bind trainer.train when first imported must be imported before it is patched,
    # or they keep the patch after this test (finalize imports crossval, which imports train).
    import cxr_core.training.finalize  # noqa: F401

    monkeypatch.setattr(trainer, "train", capture)
    spec = site_adaptation_spec(job_env)
    preset = next(p for p in PRESETS if p.site_adaptation)
    # What pages/training.py builds from the preset with its other fields left as they are.
    page_spec = replace(spec, schedule=((32, preset.epochs),), batch_size=preset.batch_size, lr=preset.lr, balance=preset.balance,
                        freeze_epochs=preset.freeze_epochs, layer_decay=preset.layer_decay, patience=preset.patience,
                        augment=True, hflip=False, zoom=preset.zoom, aspect=preset.aspect, edge_crop=preset.edge_crop,
                        acquisition=preset.acquisition, target_sensitivity=0.95)
    job = _train_config(page_spec, job_env / "out")
    with pytest.raises(Captured) as caught:
        adapt(job_env / "weights" / "tiny", Path(spec.dataset), job_env / "adapted", version="x", replay=[Path(r) for r in spec.replay],
              run_dir=job_env / "adapt-run", device="cpu")
    cli = caught.value.args[0]
    # Every setting but where the data, the candidate and its name live (the job's view of the site
    # and its auxiliary labels are built when it runs: test_a_site_adaptation_job_scores_...).
    named = {"data_dir", "out", "model_id", "version", "name", "aux_classes", "device"}
    fields = [f.name for f in dataclasses.fields(cli) if f.name not in named]
    assert len(fields) > 30
    assert {f: getattr(job, f) for f in fields} == {f: getattr(cli, f) for f in fields}


def test_a_site_adaptation_job_scores_before_and_after_and_its_promotion_rule(job_env: Path) -> None:
    from dataclasses import replace

    from cxr_core.models.versions import (
        SITE_ADAPTATION_NAME,
        list_versions,
        promotion_problems,
        site_adaptation_problems,
    )
    from cxr_core.state.jobs import run_job

    spec = site_adaptation_spec(job_env)
    replay = Path(spec.replay[0])
    job_dir = create_job(spec)
    assert run_job(job_dir) == 0, (read_state(job_dir), (job_dir / "job.log").read_text()[-2000:] if (job_dir / "job.log").exists() else "")
    # The site's nodules, a label the model has no class for, were trained as an auxiliary output (as `adapt` does).
    assert json.loads((job_dir / "run" / "config.json").read_text())["aux_classes"] == ["nodule"]
    candidate = next(v for v in list_versions("tiny") if v.version == "1.1.0-site")
    record = json.loads((candidate.path / SITE_ADAPTATION_NAME).read_text())
    films = record["films"]
    assert films["adapt"] + films["validation"] + films["held_out"] == 36 and abs(films["replay_train"] - films["adapt"]) <= 3
    assert record["before"]["model"] == "tiny@1.0.0" and record["after"]["model"] == "tiny@1.1.0-site"
    assert record["before"]["n"] == record["after"]["n"] == films["held_out"]
    assert record["shared_test"]["n"] == 12 and record["shared_test"]["folder"] == str(replay)
    # Both scorings of the held-out half are site validations, recorded for each model: Diagnose badges them.
    from cxr_core.state.site_validations import list_validations, site_badge

    stored = {v.model: v for v in list_validations()}
    assert set(stored) == {"tiny@1.0.0", "tiny@1.1.0-site"}
    for key, side in (("tiny@1.0.0", "before"), ("tiny@1.1.0-site", "after")):
        assert stored[key].n == films["held_out"] and stored[key].user == spec.user and "held-out half" in stored[key].data_name
        assert stored[key].result["covid_sensitivity"] == record[side]["covid_sensitivity"]
    assert site_badge("tiny@1.1.0-site").startswith(f"Validated at this site on {films['held_out']} films")
    # The candidate records which site films it was fitted on, as `adapt`'s does: not the held-out half.
    from cxr_core.models.fitted_films import fitted_fingerprints

    assert len(fitted_fingerprints(candidate.manifest)) == films["adapt"] + films["validation"]
    assert record["after"]["fitted_films"] == 0
    # Evaluated on the held-out films, as was the active version, so the usual rules apply too.
    assert candidate.evaluation is not None and candidate.evaluation["n"] == films["held_out"] - record["after"]["counts"].get("nodule", 0)
    active = next(v for v in list_versions("tiny") if v.active)
    assert active.evaluation is not None and active.evaluation["evaluation_set"] == candidate.evaluation["evaluation_set"]
    assert candidate.site_adaptation == record
    problems = promotion_problems(candidate, active)
    assert problems[: len(site_adaptation_problems(candidate))] == site_adaptation_problems(candidate)

    # The rule itself, on figures set by hand.
    def figures(sensitivity: float | None, specificity: float | None) -> dict:
        return {"covid_sensitivity": {"value": sensitivity}, "non_covid_specificity": {"value": specificity}}

    better = {"before": figures(0.9, 0.5), "after": figures(0.9, 0.8), "shared_test": {"covid_sensitivity": 0.96}}
    assert site_adaptation_problems(replace(candidate, site_adaptation=better)) == []
    worse = {**better, "after": figures(0.8, 0.5)}
    assert "not better than before" in site_adaptation_problems(replace(candidate, site_adaptation=worse))[0]
    forgetful = {**better, "shared_test": {"covid_sensitivity": 0.93}}
    assert "below 0.95" in site_adaptation_problems(replace(candidate, site_adaptation=forgetful))[0]
    unmeasured = {**better, "shared_test": None}
    assert "not measured" in site_adaptation_problems(replace(candidate, site_adaptation=unmeasured))[0]
    assert site_adaptation_problems(replace(candidate, site_adaptation=None)) == []


def test_a_crossfitted_site_adaptation_job_trains_its_folds_and_calibrates_on_them(job_env: Path) -> None:
    from cxr_core.models.versions import list_versions
    from cxr_core.state.jobs import describe_job_progress, job_runs, run_job

    spec = replace(site_adaptation_spec(job_env), crossfit=2, version="1.1.0-cf")
    job_dir = create_job(spec)
    assert run_job(job_dir) == 0, (read_state(job_dir), (job_dir / "job.log").read_text()[-2000:] if (job_dir / "job.log").exists() else "")
    runs = job_runs(job_dir, spec)
    assert [r.name for r in runs] == ["run", "fold-1", "fold-2"]
    assert all(sum(e["event"] == "epoch" for e in RunDir(r).events()) == 1 for r in runs)
    candidate = next(v for v in list_versions("tiny") if v.version == "1.1.0-cf")
    assert "out-of-fold scores" in candidate.manifest.training["calibrated_on"]
    # A job that is not a site adaptation has no folds, whatever its spec says.
    assert job_runs(job_dir, replace(spec, site_adaptation=False)) == [job_dir / "run"]
    # Progress runs over the adaptation and its folds.
    done = [{"event": "start"}, {"event": "epoch", "epoch": 0}]
    assert describe_job_progress([done], 1).text == "Training: 1 of 1 epochs done"
    second_fold = describe_job_progress([done, done, [{"event": "start"}]], 1)
    assert second_fold.fraction == pytest.approx(2 / 3) and second_fold.text == "Cross-fitting the threshold, fold 2 of 2: training: 0 of 1 epochs done"
    assert describe_job_progress([[{"event": "start"}], [], []], 1).text.startswith("Adapting: training")


def test_a_site_adaptation_cancelled_while_cross_fitting_resumes_its_folds(job_env: Path) -> None:
    from cxr_core.models.versions import list_versions
    from cxr_core.state.jobs import job_runs

    spec = replace(site_adaptation_spec(job_env), crossfit=2, version="1.1.0-cfc", schedule=((32, 8),))
    job = create_job(spec)
    folds = job_runs(job, spec)[1:]

    def fold_epochs() -> int:
        return sum(e["event"] == "epoch" for f in folds for e in RunDir(f, quiet=True).events())

    launch(job)
    _wait(job, lambda: fold_epochs() >= 1)
    cancel(job)
    _wait(job, lambda: read_state(job).state == CANCELLED, timeout=120)
    assert _epochs(job) == 8 and 1 <= fold_epochs() < 16  # the adaptation finished, its folds did not
    launch(job)  # resume: the finished run is not trained again, the folds go on from their checkpoints
    _wait(job, lambda: read_state(job).state in (FINISHED, FAILED), timeout=600)
    assert read_state(job).state == FINISHED, (job / "job.log").read_text()[-2000:]
    assert _epochs(job) == 8 and fold_epochs() == 16
    assert any(e["event"] == "resumed" for f in folds for e in RunDir(f, quiet=True).events())
    candidate = next(v for v in list_versions("tiny") if v.version == "1.1.0-cfc")
    assert "out-of-fold scores" in candidate.manifest.training["calibrated_on"]


def test_a_site_adaptation_without_replay_keeps_a_class_the_site_lacks_by_distillation(job_env: Path) -> None:
    from cxr_core.models.versions import list_versions
    from cxr_core.state.jobs import run_job

    # No training data to mix in, and the site has no viral pneumonias: refused without distillation...
    site = make_labelled_folder(job_env / "site16", ("covid", "normal", "nodule"), per_class={"all": 16}, splits=False, size=48, seed=3)
    bare = replace(site_adaptation_spec(job_env), dataset=str(site), replay=(), version="1.1.0-bare")
    refused = create_job(bare)
    assert run_job(refused) != 0
    assert read_state(refused).state == FAILED and "viral_pneumonia" in (read_state(refused).error or "")
    # ... and adapted with it: the candidate keeps the base model's three classes.
    kept = create_job(replace(bare, distill=1.0, version="1.1.0-kept", job_id="kept"))
    assert run_job(kept) == 0, (kept / "job.log").read_text()[-2000:]
    assert json.loads((kept / "run" / "config.json").read_text())["distill"] == 1.0
    candidate = next(v for v in list_versions("tiny") if v.version == "1.1.0-kept")
    assert candidate.manifest.classes == ("covid", "normal", "viral_pneumonia")
    record = candidate.site_adaptation
    assert record["films"]["replay_train"] == 0 and record["shared_test"] is None and record["distill"] == 1.0


def test_a_site_adaptation_that_cannot_choose_its_threshold_fails_before_training(job_env: Path) -> None:
    """The job checks its site view as ``adapt`` does: no COVID-19 film among the validation films
    (and no training data to mix in) is said in words before any epoch, not as a ValueError after."""
    import shutil

    from cxr_core.state.jobs import run_job

    site = make_labelled_folder(job_env / "site-no-val-covid", per_class={"train": 6, "val": 3, "test": 4}, size=48, seed=7)
    shutil.rmtree(site / "val" / "covid")
    spec = replace(site_adaptation_spec(job_env), dataset=str(site), replay=(), version="1.1.0-noval")
    job_dir = create_job(spec)
    assert run_job(job_dir) != 0
    state = read_state(job_dir)
    assert state.state == FAILED and (state.error or "").startswith("None of the validation films is covid"), state.error
    assert not (job_dir / "site-films.json").exists() and _epochs(job_dir) == 0
    # A site whose own splits hold nothing out could not be judged before and after.
    unjudged = make_labelled_folder(job_env / "site-no-test", per_class={"train": 6, "val": 3}, size=48, seed=9)
    refused = create_job(replace(spec, dataset=str(unjudged), version="1.1.0-notest", job_id="notest"))
    assert run_job(refused) != 0
    assert (read_state(refused).error or "").startswith("Too few films to adapt and judge: 18 to adapt on, 0 held out")
    assert _epochs(refused) == 0
    # With the COVID-19 validation films back, the same job (relaunched) gets past the check and trains.
    make_labelled_folder(site, ("covid",), per_class={"val": 3}, size=48, seed=8)
    assert run_job(job_dir) == 0, (read_state(job_dir), (job_dir / "job.log").read_text()[-2000:] if (job_dir / "job.log").exists() else "")
    assert json.loads((job_dir / "site-films.json").read_text())["validation"] == 9 and _epochs(job_dir) == 1


def test_a_follower_rank_stops_waiting_for_the_site_view_when_rank_0_fails(tmp_path: Path) -> None:
    import threading

    from cxr_core.state.jobs import JobState, _training_inputs

    spec = JobSpec(dataset=str(tmp_path / "site"), arch="cnn5", model_id="tiny", version="1.1.0-site", user="alice",
                   base_model="tiny@1.0.0", site_adaptation=True)
    # A failure left by an earlier attempt (older than the wait) is not this attempt's.
    (tmp_path / "state.json").write_text(json.dumps(asdict(JobState(FAILED, error="earlier attempt"))))
    os.utime(tmp_path / "state.json", (time.time() - 60, time.time() - 60))
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    from cxr_core.training.trainer import TrainingCancelled

    with pytest.raises(TrainingCancelled):
        _training_inputs(tmp_path, spec, follower=True, stop=stop)
    # Rank 0 fails while the follower waits: it stops at once instead of waiting out SITE_VIEW_WAIT_S.
    threading.Timer(1.0, lambda: (tmp_path / "state.json").write_text(json.dumps(asdict(JobState(FAILED, error="no images"))))).start()
    started = time.monotonic()
    with pytest.raises(JobError, match="first process failed"):
        _training_inputs(tmp_path, spec, follower=True, stop=threading.Event())
    assert time.monotonic() - started < 10


def test_a_follower_rank_stops_waiting_for_the_site_view_when_the_job_is_cancelled(tmp_path: Path) -> None:
    import threading

    from cxr_core.state.jobs import _training_inputs
    from cxr_core.training.trainer import TrainingCancelled

    spec = JobSpec(dataset=str(tmp_path / "site"), arch="cnn5", model_id="tiny", version="1.1.0-site", user="alice",
                   base_model="tiny@1.0.0", site_adaptation=True)
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    with pytest.raises(TrainingCancelled):
        _training_inputs(tmp_path, spec, follower=True, stop=stop)  # rank 0 never built the view
    assert time.monotonic() - started < 5

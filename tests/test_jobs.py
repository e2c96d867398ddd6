"""Training jobs in their own process: launch, progress, lock, cancel, kill -9, resume."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from cxr_core.errors import CxrError
from cxr_core.jobs import CANCELLED, FAILED, FINISHED, JobError, JobSpec, cancel, create_job, launch, read_state
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
    from cxr_core.versions import list_versions

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
    from cxr_core.jobs import RUNNING, JobState, running_job

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

    import cxr_core.jobs as jobs

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
    from cxr_core.jobs import _train_config

    spec = JobSpec(dataset=str(job_env / "data"), arch="cnn5", model_id="tiny", version="9.0.0", user="alice",
                   zoom=(0.85, 1.35), aspect=0.2, edge_crop=0.1, average_every=20, aux_classes=("bacterial_pneumonia",))
    again = JobSpec.from_dict(json.loads(json.dumps(asdict(spec))))
    assert again == spec
    config = _train_config(again, job_env / "out")
    assert config.augment.scale == (0.85, 1.35) and config.augment.aspect == 0.2 and config.average_every == 20
    assert config.augment.edge_crop == 0.1
    assert config.aux_classes == ("bacterial_pneumonia",) and config.n_outputs == 4
    # A job recorded before these options existed gets the library's defaults.
    old = {k: v for k, v in json.loads(json.dumps(asdict(spec))).items() if k not in ("zoom", "aspect", "edge_crop", "average_every", "aux_classes")}
    old_config = _train_config(JobSpec.from_dict(old), job_env / "out")
    assert old_config.augment.scale == (0.9, 1.1) and old_config.augment.edge_crop == 0.0 and old_config.average_every == 0 and old_config.aux_classes == ()

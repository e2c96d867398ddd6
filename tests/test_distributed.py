"""The multi-process path on CPU: torchrun, two processes, gloo.

Training: DistributedDataParallel keeps the ranks' weights identical (checked by a digest
of every parameter from each rank), rank 0 alone writes the run and the model, and the
model loads. Batch prediction: each rank takes every other file, none twice, none lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr_core.models.loading import load_model
from cxr_core.training.run import RunDir
from tests.synthetic import make_labelled_folder

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def test_two_process_training_keeps_ranks_in_sync(tmp_path: Path) -> None:
    data = make_labelled_folder(tmp_path / "data")
    out, run = tmp_path / "weights" / "ddp", tmp_path / "run"
    proc = _torchrun("-m", "cxr_core", "train", str(data), "--arch", "cnn5", "--out", str(out), "--size", "32", "--epochs", "3",
                     "--batch-size", "8", "--workers", "1", "--run-dir", str(run), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = RunDir(run).events()
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("epoch") == 3  # rank 1 wrote nothing
    assert next(e for e in events if e["event"] == "start")["world_size"] == 2
    ranks = next(e for e in events if e["event"] == "ranks")
    assert len(ranks["parameter_digests"]) == 2 and ranks["in_sync"], ranks
    model = load_model(out, device="cpu")
    assert model.manifest.metrics["test"]["accuracy"] > 0.5  # learnt something (chance 0.33)
    assert proc.stdout.count("wrote ") == 1


def test_two_process_prediction_shares_the_files(tmp_path: Path, use_weights: Path) -> None:
    films = make_labelled_folder(tmp_path / "films", per_class={"test": 3})
    proc = _torchrun("-m", "cxr_core", "predict", str(films), "--json", "--model", "densenet121-test",
                     env={"CXR_WEIGHTS_DIR": str(use_weights)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    expected = sorted(str(p) for p in films.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert sorted(r["file"] for r in rows) == expected  # each file exactly once across the two ranks
    assert all(r["error"] is None and r["gate"] for r in rows)


def test_output_lines_from_processes_sharing_a_pipe_stay_whole() -> None:
    """The prediction test above once failed in CI with two ranks' JSON rows on one line:
    ``print`` wrote each row and its newline separately. Two writers, 4000 rows each."""
    writer = ("import json, sys\nfrom cxr_core.cli import _emit_line\n"
              "for i in range(4000):\n    _emit_line(json.dumps({'rank': sys.argv[1], 'i': i, 'pad': 'x' * 700}))\n")
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(rank)], cwd=ROOT, stdout=write) for rank in (0, 1)]
    os.close(write)
    with os.fdopen(read) as stream:
        lines = stream.read().splitlines()
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows = [json.loads(line) for line in lines]  # a spliced line fails to parse here
    assert sorted((r["rank"], r["i"]) for r in rows) == sorted((str(k), i) for k in (0, 1) for i in range(4000))


def test_cross_validation_is_refused_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cxr_core.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", str(tmp_path), "--arch", "cnn5", "--out", str(tmp_path / "w"), "--folds", "3"]) == 2
    assert "without torchrun" in capsys.readouterr().err


@pytest.fixture()
def two_process_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The app's jobs run as two CPU processes under torchrun, with their state under ``tmp_path``."""
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("CXR_DEVICE", "cpu")
    monkeypatch.setenv("CXR_TRAIN_PROCESSES", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def _finishes_in_sync_on_two_ranks(job: Path) -> None:
    """Launch ``job`` and check that it finished, trained as two ranks, and the ranks ended in sync."""
    from cxr_core.state.jobs import FINISHED, launch, read_state
    from tests.test_jobs import _wait

    launch(job)
    _wait(job, lambda: read_state(job).state in (FINISHED, "failed"), timeout=600)
    assert read_state(job).state == FINISHED, (job / "job.log").read_text()[-3000:]
    events = RunDir(job / "run").events()
    assert next(e for e in events if e["event"] == "start")["world_size"] == 2
    assert next(e for e in events if e["event"] == "ranks")["in_sync"]


def test_a_job_from_the_app_runs_as_two_processes_and_cancels_together(two_process_jobs: Path) -> None:
    """What a multi-GPU server does (one process per GPU under torchrun), here as 2 CPU processes."""
    from cxr_core.state.jobs import CANCELLED, cancel, create_job, launch, read_state
    from tests.test_jobs import _epochs, _spec, _wait, job_env  # noqa: F401

    tmp_path = two_process_jobs
    make_labelled_folder(tmp_path / "data", per_class={"train": 16, "val": 6})
    make_labelled_folder(tmp_path / "eval", per_class={"test": 6}, seed=9)

    job = create_job(_spec(tmp_path, 40, "5.0.0"))
    launch(job)
    _wait(job, lambda: _epochs(job) >= 1)
    cancel(job)  # both ranks stop at the same step; the torchrun group ends
    _wait(job, lambda: read_state(job).state == CANCELLED, timeout=120)
    pid = read_state(job).pid
    time.sleep(2)
    assert pid and not _alive_group(pid)

    job2 = create_job(_spec(tmp_path, 2, "5.0.1"))
    _finishes_in_sync_on_two_ranks(job2)
    assert (tmp_path / "var" / "registry" / "tiny" / "5.0.1" / "evaluation.json").exists()


def _alive_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_site_adaptation_job_trains_every_rank_on_the_same_view_of_the_site(two_process_jobs: Path) -> None:
    """Rank 0 builds the site's view (split by patient, replay mixed in); the other rank must train
    on that view too, not on the raw site folder, or the ranks' batches would not match."""
    from cxr_core.state.jobs import create_job
    from tests.test_jobs import site_adaptation_spec

    job = create_job(site_adaptation_spec(two_process_jobs))
    _finishes_in_sync_on_two_ranks(job)
    assert json.loads((job / "run" / "config.json").read_text())["aux_classes"] == ["nodule"]

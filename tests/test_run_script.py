"""./run.sh, the two commands of the README: what it passes on to Streamlit, pytest and the CLI.

A stand-in virtual environment (a ``python`` that prints its arguments, install stamps
newer than the requirements) lets the script's own argument handling run without
installing or starting anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text('#!/bin/sh\necho "ARGS: $*"\n')
    python.chmod(0o755)
    for stamp in (".cxr-installed", ".cxr-installed-dev"):
        (venv / stamp).touch()
    return venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CXR_VENV": str(venv)}
    return subprocess.run([str(ROOT / "run.sh"), *args], capture_output=True, text=True, env=env, timeout=60)


def test_streamlit_options_without_the_word_app_start_the_app_with_them(fake_venv: Path) -> None:
    done = _run(fake_venv, "--server.port", "8611")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ARGS: -m streamlit run app.py --server.port 8611"


def test_app_passes_its_options_on(fake_venv: Path) -> None:
    done = _run(fake_venv, "app", "--server.port", "8611", "--server.headless", "true")
    assert done.stdout.strip() == "ARGS: -m streamlit run app.py --server.port 8611 --server.headless true"


def test_no_arguments_start_the_app(fake_venv: Path) -> None:
    assert _run(fake_venv).stdout.strip() == "ARGS: -m streamlit run app.py"


def test_cli_and_test_pass_their_arguments_on(fake_venv: Path) -> None:
    assert _run(fake_venv, "cli", "check", "--json").stdout.strip() == "ARGS: -m cxr_core check --json"
    assert _run(fake_venv, "test", "-k", "gate").stdout.strip() == 'ARGS: -m pytest -m not slow -k gate'


def test_an_unknown_word_gets_the_usage_line(fake_venv: Path) -> None:
    done = _run(fake_venv, "serve")
    assert done.returncode == 2
    assert "usage: ./run.sh" in done.stderr and "STREAMLIT OPTIONS" in done.stderr

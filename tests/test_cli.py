"""The command line: its documented output is an interface other tools rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_json_one_object_per_file_and_bad_files_do_not_stop_the_rest(
    use_weights: Path, dicom_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "notes.dcm"
    bad.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    files = [str(dicom_data / "RG1_J2KR.dcm"), str(bad), str(empty), str(dicom_data / "RG1_UNCR.dcm")]
    code, out, _ = run_main(capsys, "predict", *files, "--json", "--batch-size", "2")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in rows] == files
    for row in rows:
        assert set(row) == {"file", "model", "probabilities", "prediction", "warnings", "error", "gate", "gate_reasons", "uncertain"}
        assert row["model"] == "densenet121-test@0.0.1"
    good = [rows[0], rows[3]]
    for row in good:
        assert row["error"] is None and row["gate"] in ("accepted", "warning")
        assert row["prediction"] in ("covid", "normal", "viral_pneumonia") or (row["prediction"] is None and row["uncertain"])
        assert set(row["probabilities"]) == {"covid", "normal", "viral_pneumonia"}
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-6
    # Lossless J2K and uncompressed forms of one film give the same answer.
    assert rows[0]["probabilities"] == pytest.approx(rows[3]["probabilities"], abs=1e-6)
    assert "File is not an image" in rows[1]["error"] and rows[1]["prediction"] is None
    assert "empty" in rows[2]["error"]


def test_predict_walks_folders_and_picks_models(
    use_weights: Path, dicom_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cxr_core.imaging.io import read_image

    folder = tmp_path / "worklist"
    (folder / "sub").mkdir(parents=True)
    film = Image.fromarray(read_image(dicom_data / "RG1_UNCR.dcm").to_uint8()).resize((256, 256))
    for where in [folder / "a.png", folder / "sub" / "b.png", folder / ".hidden.png"]:
        film.save(where)
    code, out, _ = run_main(capsys, "predict", str(folder), "--json", "--model", "resnet50-test")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [Path(r["file"]).name for r in rows] == ["a.png", "b.png"]
    assert all(r["model"] == "resnet50-test@0.0.1" and set(r["probabilities"]) == {"covid", "other"} for r in rows)


def test_predict_text_output(use_weights: Path, dicom_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "predict", str(dicom_data / "RG1_UNCR.dcm"))
    assert code == 0 and "covid=" in out and "\t" in out
    # The model and the disclaimer go to stderr, once, leaving stdout's lines as documented.
    assert "Decision support only" not in out and err.count("Decision support only") == 1
    assert "(densenet121-test@0.0.1)" in err


def test_unknown_model_is_a_usage_error(use_weights: Path, dicom_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "predict", str(dicom_data / "RG1_UNCR.dcm"), "--model", "nope")
    assert code == 2 and out == "" and "not installed" in err


def test_no_model_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dicom_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path))
    code, _, err = run_main(capsys, "predict", str(dicom_data / "RG1_UNCR.dcm"), "--json")
    assert code == 1 and "No trained model is installed" in err
    code, out, _ = run_main(capsys, "models")
    assert code == 0 and "No trained model is installed" in out
    code, out, _ = run_main(capsys, "models", "--json")
    assert json.loads(out) == []


def test_models_lists_installed(use_weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "models")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("densenet121-test@0.0.1\tdensenet121\tsoftmax\tcovid,normal,viral_pneumonia")
    assert lines[1].startswith("resnet50-test@0.0.1\tresnet50\tsigmoid\tcovid,other")
    rows = json.loads(run_main(capsys, "models", "--json")[1])
    assert [r["id"] for r in rows] == ["densenet121-test", "resnet50-test"] and all(r["usable"] for r in rows)


def test_explain_writes_an_overlay(use_weights: Path, dicom_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_png = tmp_path / "out" / "overlay.png"
    code, out, _ = run_main(capsys, "explain", str(dicom_data / "RG1_J2KR.dcm"), "--out", str(out_png), "--target", "covid", "--method", "gradcam++")
    assert code == 0 and "gradcam++ for covid" in out
    png = Image.open(out_png)
    overlay = np.asarray(png)
    assert overlay.shape == (1955, 1841, 3)  # full resolution, no banner: the documented output
    assert np.abs(overlay[..., 0].astype(int) - overlay[..., 2].astype(int)).mean() > 1  # coloured, not grey
    # Its provenance travels in the PNG's text chunks; never the file name.
    assert png.info["cxr:model"] == "densenet121-test@0.0.1" and png.info["Description"].startswith("Grad-CAM++ for covid (p = ")
    assert png.info["Disclaimer"].startswith("Decision support only") and "RG1" not in " ".join(png.info.values())


def test_explain_errors(use_weights: Path, dicom_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    film = str(dicom_data / "RG1_UNCR.dcm")
    assert run_main(capsys, "explain", film, "--out", str(tmp_path / "x.png"), "--target", "flu")[0] == 2
    assert run_main(capsys, "explain", film, "--out", str(tmp_path / "x.png"), "--method", "magic")[0] == 2
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM")
    code, _, err = run_main(capsys, "explain", str(bad), "--out", str(tmp_path / "x.png"))
    assert code == 1 and "not an image" in err and not (tmp_path / "x.png").exists()


def test_help_lists_every_cam_method() -> None:
    from cxr_core.cli import build_parser
    from cxr_core.explain.cam import CAM_METHODS

    explain_help = build_parser()._subparsers._group_actions[0].choices["explain"].format_help()  # type: ignore[union-attr]
    for name in CAM_METHODS:
        assert name in explain_help


def test_module_entry_point(use_weights: Path, dicom_data: Path) -> None:
    env = {**os.environ, "CXR_WEIGHTS_DIR": str(use_weights)}
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_core", "predict", str(dicom_data / "RG1_UNCR.dcm"), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["error"] is None
    assert subprocess.run([sys.executable, "-m", "cxr_core", "predict"], cwd=ROOT, capture_output=True, timeout=120).returncode == 2

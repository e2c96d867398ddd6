"""The benchmark's smoke mode runs end to end and reports every documented key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"forward_s", "all_class_cam_over_forward", "naive_cam_over_forward", "e2e_single_study_s", "batch_images_per_s",
        "forward_batch_images_per_s", "train_images_per_s", "app_rss_mb", "device", "compare_grid_s"}


def test_bench_smoke(use_weights: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CXR_WEIGHTS_DIR": str(use_weights)}
    proc = subprocess.run([sys.executable, "-m", "cxr_core.bench", "--smoke", "--json", "--model", "densenet121-test", "--folder", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert KEYS <= set(result) and result["smoke"] is True
    key = "densenet121-test@0.0.1"
    for name in KEYS - {"app_rss_mb", "device"}:
        assert result[name][key] > 0, name
    assert set(result["e2e_stages_s"][key]) == {"read_decode", "predict_gate", "all_class_cam", "overlay_full_res", "total"}
    assert result["app_rss_mb"] > 100 and "synthetic" in result["batch_folder"]

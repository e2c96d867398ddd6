"""Many users at once, and many predictions in one process.

* Memory over 200 predictions with explanations stays flat and no CAM hook is left on
  the shared model (default suite).
* Ten browser sessions (Playwright contexts) against one local server, each uploading
  its own film at the same moment: no errors, each page shows its own image's sha256 and
  the probability the library computes for that film, and the latency distribution is
  reported (``slow``; also written to ``$CXR_LOAD_REPORT`` when set).
"""

from __future__ import annotations

import gc
import io
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.cam import explain
from cxr_core.inference import predict
from cxr_core.io import XrayImage, read_image
from tests.test_cam import _hook_count


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _variants(source: XrayImage, n: int, size: int = 768) -> list[bytes]:
    """n different chest films (own crop and gamma each), as PNG bytes."""
    base = source.to_uint8()
    rng = np.random.default_rng(5)
    out = []
    for _ in range(n):
        h, w = base.shape
        top, left = rng.integers(0, h // 12), rng.integers(0, w // 12)
        crop = base[top : h - rng.integers(0, h // 12), left : w - rng.integers(0, w // 12)]
        gamma = rng.uniform(0.8, 1.25)
        film = (255 * (crop / 255.0) ** gamma).astype(np.uint8)
        image = Image.fromarray(film).resize((size, int(size * film.shape[0] / film.shape[1])), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_memory_is_flat_over_200_predictions(densenet, dicom_data: Path) -> None:  # type: ignore[no-untyped-def]
    films = [read_image(b) for b in _variants(read_image(dicom_data / "RG1_UNCR.dcm"), 4, size=384)]
    methods = ["gradcam", "gradcam++", "hirescam", "eigencam"]

    def one(i: int) -> None:
        film = films[i % len(films)]
        predict(densenet, [film])
        # Every 5th uses an inner layer: hooks on the shared network, under its lock.
        explain(densenet, film, method=methods[i % len(methods)], layer="backbone.denseblock3" if i % 5 == 0 else None)

    for i in range(20):  # warm-up: allocator pools and caches fill
        one(i)
    gc.collect()
    settled = _rss_mb()
    for i in range(20, 200):
        one(i)
    gc.collect()
    grown = _rss_mb() - settled
    assert _hook_count(densenet.network) == 0
    assert grown < 60, f"RSS grew {grown:.0f} MB over 180 predictions"


# --- Ten browsers at once --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_ten_sessions_at_once_get_their_own_results(use_weights: Path, dicom_data: Path, tmp_path: Path) -> None:
    from tests.test_e2e_browser import CHROMIUM, CHROMIUM_ARGS, open_app, running_app

    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    from cxr_core.models import load_model, resolve_model

    sessions = int(os.environ.get("CXR_LOAD_SESSIONS", "10"))
    rounds = int(os.environ.get("CXR_LOAD_ROUNDS", "2"))
    weights = Path(os.environ.get("CXR_LOAD_WEIGHTS", str(use_weights)))
    os.environ["CXR_WEIGHTS_DIR"] = str(weights)
    model = load_model(resolve_model(None).path)
    files = []
    for i, data in enumerate(_variants(read_image(dicom_data / "RG1_UNCR.dcm"), sessions * rounds)):
        path = tmp_path / f"film-{i:02d}.png"
        path.write_bytes(data)
        film = read_image(data)
        expected = predict(model, [film])[0]
        files.append((path, film.sha256, expected))
    del model

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    env = {"CXR_WEIGHTS_DIR": str(weights), "CXR_VAR_DIR": str(tmp_path / "var")}
    with running_app(env, tmp_path / "streamlit.log") as url:
        server_pid = int(os.popen(f"pgrep -f 'streamlit run app.py --server.port {url.rsplit(':', 1)[1]}'").read().split()[0])
        rss_start = _rss_mb(server_pid)
        barrier = threading.Barrier(sessions)

        def session(k: int) -> None:
            with playwright.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    for r in range(rounds):
                        path, sha, expected = files[r * sessions + k]
                        context = browser.new_context(viewport={"width": 1300, "height": 1400})
                        page = context.new_page()
                        open_app(page, url)
                        barrier.wait(timeout=600) if r == 0 else None
                        started = time.time()
                        page.set_input_files("input[type=file]", [str(path)])
                        page.get_by_text("Prediction:").first.wait_for(timeout=600_000)
                        page.get_by_text("Grad-CAM for").first.wait_for(timeout=600_000)
                        took = time.time() - started
                        page.get_by_text("Image metadata").click()
                        page.get_by_text("Image sha256:").wait_for(timeout=60_000)
                        body = page.inner_text("body")
                        problems = []
                        if sha not in body:
                            problems.append("another image's sha256")
                        if expected.predicted and f"p = {expected.probability(expected.predicted):.3f}" not in body:
                            problems.append("probability differs from the library's for this film")
                        if "Traceback" in body or "Something went wrong" in body:
                            problems.append("error shown")
                        with lock:
                            latencies.append(took)
                            failures.extend(f"session {k} round {r}: {p}" for p in problems)
                        context.close()
                except Exception as exc:  # noqa: BLE001 - reported as a failure below
                    with lock:
                        failures.append(f"session {k}: {type(exc).__name__}: {str(exc)[:300]}")
                finally:
                    browser.close()

        threads = [threading.Thread(target=session, args=(k,)) for k in range(sessions)]
        wall = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - wall
        rss_end = _rss_mb(server_pid)
    report = {
        "sessions": sessions, "rounds": rounds, "predictions": len(latencies), "failures": failures,
        "latency_s": {"p50": statistics.median(latencies) if latencies else None,
                      "p90": float(np.percentile(latencies, 90)) if latencies else None,
                      "max": max(latencies) if latencies else None},
        "wall_s": wall, "server_rss_mb": {"start": rss_start, "end": rss_end}, "cpu_count": os.cpu_count(),
        "model_dir": str(weights),
    }
    print(json.dumps(report, indent=1))
    if os.environ.get("CXR_LOAD_REPORT"):
        Path(os.environ["CXR_LOAD_REPORT"]).write_text(json.dumps(report, indent=1))
    assert not failures, failures
    assert len(latencies) == sessions * rounds

"""End to end in headless Chromium: start the app, upload films, see probabilities.

Needs Debian's chromium (``apt-get install chromium``) and the playwright package;
skipped cleanly when either is missing. Marked ``e2e``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CXR_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def server(use_weights: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "w")
    env = {**os.environ, "CXR_WEIGHTS_DIR": str(use_weights), "CXR_VAR_DIR": str(tmp_path / "var")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start: " + (tmp_path / "streamlit.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_radiologist_uploads_dicom_and_png_and_sees_probabilities(server: str, dicom_data: Path, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    png = tmp_path / "chest.png"
    png.write_bytes(_film_png(dicom_data))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(server)
        page.get_by_text("Diagnose").first.wait_for(timeout=180_000)
        started = time.time()
        page.set_input_files("input[type=file]", [str(dicom_data / "RG1_J2KR.dcm"), str(png)])
        page.get_by_text("Prediction:").wait_for(timeout=180_000)
        elapsed = time.time() - started
        page.get_by_text("Grad-CAM for").first.wait_for(timeout=180_000)
        body = page.inner_text("body")
        assert "densenet121-test@0.0.1" in body and "Decision support only" in body
        assert "RG1_J2KR.dcm" in body and "chest.png" in body
        assert "%" in page.inner_text(".js-plotly-plot")  # probability bars carry percentages
        assert "Traceback" not in body
        page.screenshot(path=str(tmp_path / "diagnose.png"), full_page=True)
        browser.close()
    print(f"prediction visible {elapsed:.1f} s after upload")


def _film_png(dicom_data: Path) -> bytes:
    import io

    from PIL import Image

    from cxr_core.io import read_image

    film = read_image(dicom_data / "RG1_UNCR.dcm")
    buffer = io.BytesIO()
    Image.fromarray(film.to_uint8()[::4, ::4].copy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reviewer_compares_methods_with_synchronised_zoom(server: str, dicom_data: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(server)
        page.get_by_role("link", name="Compare").click()
        page.get_by_text("Compare heatmaps").first.wait_for(timeout=180_000)
        page.set_input_files("input[type=file]", [str(dicom_data / "RG1_J2KR.dcm")])
        page.get_by_text("Shared scale").first.wait_for(timeout=180_000)
        plot = page.locator(".js-plotly-plot").first
        plot.locator("image").nth(2).wait_for(timeout=180_000)
        assert plot.locator("image").count() == 3  # Grad-CAM, Grad-CAM++, HiResCAM
        # Zoom into the first panel: every panel's x range follows (matched axes).
        box = plot.locator(".nsewdrag").first.bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=5)
        page.mouse.up()
        page.wait_for_timeout(1000)
        ranges = page.evaluate(
            "() => { const l = document.querySelector('.js-plotly-plot')._fullLayout;"
            " return ['xaxis', 'xaxis2', 'xaxis3'].map(k => l[k].range.map(v => Math.round(v))); }"
        )
        assert ranges[0] == ranges[1] == ranges[2] and ranges[0][1] - ranges[0][0] < 700
        assert "Traceback" not in page.inner_text("body")
        browser.close()

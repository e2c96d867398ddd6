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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def running_app(env_extra: dict[str, str], log_path: Path) -> Iterator[str]:
    """A real ``streamlit run app.py`` on a free port; yields its URL."""
    port = _free_port()
    log = open(log_path, "w")
    env = {**os.environ, **env_extra}
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
            pytest.fail("streamlit did not start: " + log_path.read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture()
def server(use_weights: Path, tmp_path: Path) -> Iterator[str]:
    with running_app({"CXR_WEIGHTS_DIR": str(use_weights), "CXR_VAR_DIR": str(tmp_path / "var")}, tmp_path / "streamlit.log") as url:
        yield url


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
        # Probability bars carry percentages (plotly draws after Streamlit reports the run done).
        page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some(e => e.textContent.includes('%'))", timeout=60_000)
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
        open_app(page, server)
        page.get_by_role("link", name="Compare").click()
        page.get_by_text("Compare heatmaps").first.wait_for(timeout=180_000)
        page.set_input_files("input[type=file]", [str(dicom_data / "RG1_J2KR.dcm")])
        page.get_by_text("Zoom or pan any panel").first.wait_for(timeout=180_000)
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


def open_app(page, url: str) -> None:  # type: ignore[no-untyped-def]
    """Load the app and wait until its first page (Diagnose) has finished running.

    A session's first run reruns itself once (see app.py); a click on the menu before
    that settles can be lost.
    """
    page.goto(url)
    page.locator("input[type=file]").first.wait_for(state="attached", timeout=180_000)
    _streamlit_idle(page)


def _streamlit_idle(page, timeout_ms: int = 180_000) -> None:  # type: ignore[no-untyped-def]
    """Wait until the script run triggered by the last action has finished."""
    page.wait_for_timeout(300)
    page.locator("[data-testid=stStatusWidget]").wait_for(state="hidden", timeout=timeout_ms)


@pytest.mark.slow
def test_admin_signs_in_uploads_trains_and_promotes(use_weights: Path, tmp_path: Path) -> None:
    """The admin's whole path in a browser: sign in, upload a zip, check it, train a tiny job, promote it."""
    import zipfile

    from cxr_core.audit import entries
    from cxr_core.users import add_user
    from tests.synthetic import make_labelled_folder

    playwright = pytest.importorskip("playwright.sync_api")
    var = tmp_path / "var"
    env = {"CXR_WEIGHTS_DIR": str(use_weights), "CXR_VAR_DIR": str(var), "CXR_DEVICE": "cpu"}
    previous_var = os.environ["CXR_VAR_DIR"]  # the suite's private one (conftest.private_state)
    os.environ["CXR_VAR_DIR"] = str(var)  # add_user and entries below use the same files
    try:
        add_user("alice", "a long enough password", "admin")
        env["CXR_EVAL_DIR"] = str(make_labelled_folder(tmp_path / "eval", per_class={"test": 4}, seed=7))
        source = make_labelled_folder(tmp_path / "set", per_class={"train": 12, "val": 4})
        archive = tmp_path / "site-b.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in source.rglob("*.png"):
                zf.write(path, f"site-b/{path.relative_to(source).as_posix()}")
        with running_app(env, tmp_path / "streamlit.log") as url, playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            open_app(page, url)
            page.get_by_role("link", name="Models").click()
            page.get_by_text("This page is for administrators").wait_for(timeout=60_000)

            def sign_in() -> None:
                page.get_by_role("link", name="Sign in").first.click()
                page.get_by_label("User name", exact=True).fill("alice")
                page.get_by_label("Password", exact=True).fill("a long enough password")
                page.get_by_role("button", name="Sign in").click()
                page.get_by_text("Signed in as").wait_for(timeout=60_000)

            sign_in()

            page.get_by_role("link", name="Training data").click()
            page.get_by_label("Name").fill("site B")
            page.get_by_label("Name").press("Enter")
            _streamlit_idle(page)
            page.get_by_role("tab", name="A zip archive").click()
            page.locator("[data-testid=stFileUploader]").filter(has_text="zip").locator("input[type=file]").set_input_files(str(archive))
            _streamlit_idle(page)
            page.get_by_role("button", name="Store the upload").click()
            page.get_by_text("Images per class").first.wait_for(timeout=120_000)
            page.get_by_role("button", name="Use this dataset for training").click()
            _streamlit_idle(page)

            page.get_by_role("link", name="Training", exact=True).click()
            page.get_by_text("An architecture (from scratch)").click()
            _streamlit_idle(page)
            page.locator("[data-testid=stSelectbox]").filter(has_text="Architecture").click()
            page.get_by_role("option", name="cnn5").click()
            _streamlit_idle(page)
            for label, value in (("Epochs", "2"), ("Image size (px)", "64"), ("Batch size", "8")):
                field = page.get_by_label(label, exact=True)
                field.fill(value)
                field.press("Enter")
                _streamlit_idle(page)
            page.get_by_label("New version name").fill("9.9.9")
            page.get_by_label("New version name").press("Enter")
            _streamlit_idle(page)
            page.get_by_role("button", name="Launch").click()
            page.get_by_text("started").first.wait_for(timeout=60_000)
            # The live view reruns itself; reload the page meanwhile: the job carries on.
            # A reload starts a new session (signed out); the job is a separate process and carries on.
            page.reload()
            sign_in()
            page.get_by_role("link", name="Training", exact=True).click()
            page.get_by_text("9.9.9").first.wait_for(timeout=60_000)
            page.get_by_text("✅ finished").first.wait_for(timeout=600_000)

            page.get_by_role("link", name="Models").click()
            page.get_by_role("button", name="Promote").click()
            _streamlit_idle(page)
            page.get_by_text("9.9.9 (active)").first.wait_for(timeout=60_000)
            assert "Traceback" not in page.inner_text("body")
            browser.close()
        actions = [e.action for e in entries()]
        for action in ("sign_in", "upload_dataset", "confirm_dataset", "launch_job", "promote"):
            assert action in actions, actions
    finally:
        os.environ["CXR_VAR_DIR"] = previous_var


def test_admin_sets_the_default_model_and_cannot_promote_an_unevaluated_candidate(use_weights: Path, tmp_path: Path) -> None:
    """Issue 33, in a browser: the model Diagnose offers first is an explicit, audited choice
    made on the Models page; a candidate never evaluated cannot be promoted; Delete needs a tick."""
    from cxr_core.audit import entries
    from cxr_core.users import add_user
    from cxr_core.versions import registry_dir
    from tests.conftest import make_model_folder

    playwright = pytest.importorskip("playwright.sync_api")
    var = tmp_path / "var"
    env = {"CXR_WEIGHTS_DIR": str(use_weights), "CXR_VAR_DIR": str(var), "CXR_DEVICE": "cpu"}
    previous_var = os.environ["CXR_VAR_DIR"]
    os.environ["CXR_VAR_DIR"] = str(var)  # add_user, the registry and entries below use the same files
    try:
        add_user("alice", "a long enough password", "admin")
        staged = make_model_folder(registry_dir() / "densenet121-test", "densenet121", ("covid", "normal", "viral_pneumonia"),
                                   id="densenet121-test", version="0.0.2", size=64, seed=5)
        staged.rename(registry_dir() / "densenet121-test" / "0.0.2")  # trained here, never evaluated
        with running_app(env, tmp_path / "streamlit.log") as url, playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            open_app(page, url)
            page.get_by_role("link", name="Sign in").first.click()
            page.get_by_label("User name", exact=True).fill("alice")
            page.get_by_label("Password", exact=True).fill("a long enough password")
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Signed in as").wait_for(timeout=60_000)
            page.get_by_role("link", name="Models").click()
            page.get_by_text("No default has been chosen").wait_for(timeout=60_000)
            page.get_by_text("Not evaluated: 0.0.2").wait_for(timeout=60_000)
            assert page.get_by_role("button", name="Promote").first.is_disabled()
            assert page.get_by_role("button", name="Delete").first.is_disabled()
            page.locator("[data-testid=stSelectbox]").filter(has_text="The model clinicians are offered first").click()
            page.get_by_role("option", name="resnet50-test").click()
            _streamlit_idle(page)
            page.get_by_role("button", name="Save as default").click()
            _streamlit_idle(page)
            page.get_by_role("link", name="Diagnose").click()
            page.locator("input[type=file]").first.wait_for(state="attached", timeout=60_000)
            _streamlit_idle(page)
            box = page.locator("[data-testid=stSelectbox]").filter(has=page.get_by_text("Model", exact=True)).first
            chosen = (box.text_content() or "") + " " + " ".join(box.locator("input").evaluate_all("els => els.map(e => e.value)"))
            assert "resnet50-test@0.0.1 (default)" in chosen, chosen
            assert "Traceback" not in page.inner_text("body")
            browser.close()
        defaults = entries(action="set_default_model")
        assert len(defaults) == 1 and defaults[0].model == "resnet50-test" and defaults[0].user == "alice"
    finally:
        os.environ["CXR_VAR_DIR"] = previous_var

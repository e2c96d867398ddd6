"""End to end in headless Chromium: start the app, upload films, see probabilities.

Needs Debian's chromium (``apt-get install chromium``) and the playwright package;
skipped cleanly when either is missing. Marked ``e2e``.
"""

from __future__ import annotations

import os
import re
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


@contextmanager
def diagnose_page(url: str) -> Iterator:  # type: ignore[type-arg]
    """A 1400 x 1600 headless Chromium page on the app's first page (Diagnose)."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        open_app(page, url)
        yield page
        browser.close()


@pytest.fixture()
def server(use_weights: Path, tmp_path: Path) -> Iterator[str]:
    """The app on the random-weight test models; on the shipped models when the README's pictures
    are being taken (CXR_SCREENSHOT_DIR), so that they show what a user will see."""
    shipped = Path(__file__).resolve().parents[1] / "weights"
    weights = shipped if os.environ.get("CXR_SCREENSHOT_DIR") and (shipped / "densenet121-covid3" / "manifest.json").is_file() else use_weights
    with running_app({"CXR_WEIGHTS_DIR": str(weights), "CXR_VAR_DIR": str(tmp_path / "var")}, tmp_path / "streamlit.log") as url:
        yield url


def test_radiologist_uploads_dicom_and_png_and_sees_probabilities(server: str, dicom_data: Path, tmp_path: Path) -> None:
    png = tmp_path / "chest.png"
    png.write_bytes(_film_png(dicom_data))
    with diagnose_page(server) as page:
        started = time.time()
        page.set_input_files("input[type=file]", [str(dicom_data / "RG1_J2KR.dcm"), str(png)])
        page.get_by_text("Prediction:").wait_for(timeout=180_000)
        elapsed = time.time() - started
        page.get_by_text("Grad-CAM for").first.wait_for(timeout=180_000)
        body = page.inner_text("body")
        # the test model, or the shipped one when the README's pictures are being taken
        assert re.search(r"densenet121-(test@0\.0\.1|covid3@\d+\.\d+\.\d+)", body) and "Decision support only" in body
        assert "RG1_J2KR.dcm" in body and "chest.png" in body
        # Probability bars carry percentages (plotly draws after Streamlit reports the run done).
        page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some(e => e.textContent.includes('%'))", timeout=60_000)
        assert "Traceback" not in body
        page.screenshot(path=str(tmp_path / "diagnose.png"), full_page=True)
    print(f"prediction visible {elapsed:.1f} s after upload")


def test_worklist_shows_why_a_study_was_rejected_and_opens_it_first(server: str, dicom_data: Path, dicom_tests: Path, tmp_path: Path) -> None:
    """At 1400 px the reason a study needs a look is on screen beside its number, in words and
    display names (no raw keys, no "None"), and the first flagged study is the one opened."""
    png = tmp_path / "chest.png"
    png.write_bytes(_film_png(dicom_data))
    with diagnose_page(server) as page:
        page.set_input_files("input[type=file]", [str(png), str(dicom_tests / "MR_small.dcm")])
        page.get_by_text("Worklist (2 file(s))").wait_for(timeout=180_000)
        _streamlit_idle(page)
        # The MR (uploaded second) needs a look, so it is the study opened below the worklist.
        page.get_by_role("heading", name="MR_small.dcm").wait_for(timeout=60_000)
        grid = page.locator("[data-testid=stDataFrame]").first
        grid.wait_for(timeout=60_000)
        box = grid.bounding_box()
        assert box is not None and box["x"] + box["width"] <= 1400
        # The grid draws on a canvas: read what it shows through its own "Download as CSV".
        # Without the File System Access API the grid falls back to an ordinary download.
        page.evaluate("() => { delete window.showSaveFilePicker; }")
        grid.hover()
        with page.expect_download() as download:
            grid.get_by_role("button", name="Download as CSV").click()
        import csv as _csv

        rows = list(_csv.DictReader(open(download.value.path(), encoding="utf-8-sig")))
        assert list(rows[0])[:5] == ["Study", "File", "Status", "Why", "Call"]
        shown = " ".join(" ".join(r.values()) for r in rows)
        assert "viral_pneumonia" not in shown and "None" not in shown
        mr = next(r for r in rows if r["File"] == "MR_small.dcm")
        assert mr["Status"] == "rejected" and "MR" in mr["Why"], mr
        assert rows[0]["File"] == "MR_small.dcm"  # flagged first
        assert "Traceback" not in page.inner_text("body")
        _shot(page, tmp_path, "worklist")


def test_radiologist_windows_and_zooms_the_film_and_the_overlay_follows(server: str, dicom_data: Path, tmp_path: Path) -> None:
    """Drag windows the film, the wheel zooms, Reset returns; both panes change together."""
    with diagnose_page(server) as page:
        page.set_input_files("input[type=file]", [str(dicom_data / "RG1_UNCR.dcm")])
        page.get_by_text("Grad-CAM for").first.wait_for(timeout=180_000)
        _streamlit_idle(page)
        frame = _viewer_frame(page)
        frame.wait_for_selector("body[data-ready='1']", timeout=60_000)
        state = frame.locator("[data-testid=viewer-state]")
        assert state.inner_text() == "Window: level 0.50, width 1.00 · zoom 1.0x"
        film, overlay = frame.locator("canvas[data-role=film]"), frame.locator("canvas[data-role=overlay]")

        def centre_pixels() -> list[list[int]]:
            return [c.evaluate("c => Array.from(c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data)") for c in (film, overlay)]

        before = centre_pixels()
        assert before[0] != before[1]  # the overlay pane shows the heatmap over the film
        box = film.bounding_box()
        assert box is not None
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        # Drag left (narrower window) and down (lower level): more contrast, brighter film.
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x - box["width"] * 0.5, y + box["height"] * 0.2, steps=5)
        page.mouse.up()
        windowed = state.inner_text()
        level, width = (float(v) for v in re.findall(r"level ([\d.]+), width ([\d.]+)", windowed)[0])
        assert width == pytest.approx(0.5, abs=0.05) and level == pytest.approx(0.3, abs=0.05), windowed
        after = centre_pixels()
        assert after[0] != before[0] and after[1] != before[1]  # both panes re-windowed
        page.mouse.move(x, y)
        page.mouse.wheel(0, -600)
        frame.wait_for_function("() => !document.querySelector('[data-testid=viewer-state]').textContent.endsWith('zoom 1.0x')")
        zoom = float(re.findall(r"zoom ([\d.]+)x", state.inner_text())[0])
        assert zoom > 2
        frame.get_by_role("button", name="Reset").click()
        assert state.inner_text() == "Window: level 0.50, width 1.00 · zoom 1.0x"
        assert centre_pixels() == before
        frame.get_by_role("button", name="Lungs").click()
        assert state.inner_text().startswith("Window: level 0.35, width 0.60")
        _shot(page, tmp_path, "diagnose")


def _film_png(dicom_data: Path) -> bytes:
    import io

    from PIL import Image

    from cxr_core.imaging.io import read_image

    film = read_image(dicom_data / "RG1_UNCR.dcm")
    buffer = io.BytesIO()
    Image.fromarray(film.to_uint8()[::4, ::4].copy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_film_with_strong_local_contrast_processing_is_named_on_diagnose(server: str, dicom_data: Path, tmp_path: Path) -> None:
    """The models call most non-COVID films with CLAHE-type processing COVID-19: the radiologist
    is told so beside the prediction, for the processed film and not for the same film as it came."""
    import io

    import cv2
    import numpy as np
    from PIL import Image

    plain = tmp_path / "as-it-came.png"
    plain.write_bytes(_film_png(dicom_data))
    grey = np.asarray(Image.open(io.BytesIO(plain.read_bytes())).convert("L"))
    processed = tmp_path / "processed.png"
    cv2.imwrite(str(processed), cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(grey))
    with diagnose_page(server) as page:
        page.set_input_files("input[type=file]", [str(processed)])
        page.get_by_text("strongly processed for local contrast").first.wait_for(timeout=180_000)
        _streamlit_idle(page)
        body = page.inner_text("body")
        assert "read a COVID-19 call with particular care" in body and "Decision support only" in body
        assert "Traceback" not in body
        _shot(page, tmp_path, "processed")
        open_app(page, server)
        page.set_input_files("input[type=file]", [str(plain)])
        page.get_by_text("Prediction:").first.wait_for(timeout=180_000)
        _streamlit_idle(page)
        assert "strongly processed for local contrast" not in page.inner_text("body")


def test_reviewer_compares_methods_with_synchronised_zoom(server: str, dicom_data: Path, tmp_path: Path) -> None:
    with diagnose_page(server) as page:
        page.get_by_role("link", name="Compare").click()
        page.get_by_text("Compare heatmaps").first.wait_for(timeout=180_000)
        page.set_input_files("input[type=file]", [str(dicom_data / "RG1_J2KR.dcm")])
        page.get_by_text("Zoom or pan any panel").first.wait_for(timeout=180_000)
        plot = page.locator(".js-plotly-plot").first
        plot.locator("image").nth(2).wait_for(timeout=180_000)
        assert plot.locator("image").count() == 3  # Grad-CAM, Grad-CAM++, HiResCAM
        # One colour bar per scale (three methods: three scales), under the grid.
        assert plot.locator(".colorbar").count() == 3
        _streamlit_idle(page)
        _shot(page, tmp_path, "compare")
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


def _viewer_frame(page, timeout_s: float = 60.0):  # type: ignore[no-untyped-def]
    """The film viewer's iframe, once Streamlit has mounted it."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for f in page.frames:
            if f.locator("[data-testid=viewer-state]").count():
                return f
        page.wait_for_timeout(250)
    raise AssertionError("the film viewer did not appear")


#: the screenshots the README shows (docs/images)
README_PICTURES = ("diagnose", "compare", "admin-validation")


def _shot(page, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """A full-page screenshot for the test's folder, and, for the README's pictures when
    CXR_SCREENSHOT_DIR is set, the visible part (refresh docs/images by running the browser
    tests with CXR_SCREENSHOT_DIR=docs/images)."""
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("CXR_SCREENSHOT_DIR") and name in README_PICTURES:
        out = Path(os.environ["CXR_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"{name}.png"))


def _upload_dataset(page, name: str, archive: Path) -> None:  # type: ignore[no-untyped-def]
    """On the Training data page: store a zip under ``name`` and wait for its check."""
    page.get_by_role("link", name="Training data").click()
    page.get_by_label("Name").fill(name)
    page.get_by_label("Name").press("Enter")
    _streamlit_idle(page)
    page.get_by_role("tab", name="A zip archive").click()
    page.locator("[data-testid=stFileUploader]").filter(has_text="zip").locator("input[type=file]").set_input_files(str(archive))
    _streamlit_idle(page)
    page.get_by_role("button", name="Store the upload").click()
    page.get_by_text("Images per class").first.wait_for(timeout=120_000)


def _site_archive(source: Path, name: str) -> Path:
    """``source``'s films zipped under a top folder ``name``, beside it: a site's upload."""
    import io
    import zipfile

    archive = source.parent / f"{name}.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for path in source.rglob("*.png"):
            z.write(path, f"{name}/{path.relative_to(source).as_posix()}")
    archive.write_bytes(buffer.getvalue())
    return archive


def _validate_default_model(page) -> None:  # type: ignore[no-untyped-def]
    """On the Models page: validate the model offered first on the dataset offered first, and wait for the result."""
    page.get_by_role("link", name="Models").click()
    page.get_by_text("Validate at this site").wait_for(timeout=60_000)
    _streamlit_idle(page)
    page.get_by_role("button", name="Validate", exact=True).click()
    page.get_by_text("Recorded validations").wait_for(timeout=180_000)


@contextmanager
def _site_validated(use_weights: Path, dicom_data: Path, tmp_path: Path, name: str, per_class: dict[str, int]) -> Iterator:  # type: ignore[type-arg]
    """The app on the random-weight test models with a state folder of its own, an admin signed in
    who uploaded a site's films (covid and normal, ``per_class``) as ``name`` and validated the
    default model on them; yields (the page, a chest film PNG to drop on Diagnose). The test's own
    process reads the same state folder until the end of the block."""
    from cxr_core.state.users import add_user
    from tests.synthetic import make_labelled_folder

    var = tmp_path / "var"
    env = {"CXR_WEIGHTS_DIR": str(use_weights), "CXR_VAR_DIR": str(var), "CXR_DEVICE": "cpu", "CXR_DEFAULT_MODEL": "densenet121-test"}
    previous_var = os.environ["CXR_VAR_DIR"]
    os.environ["CXR_VAR_DIR"] = str(var)
    archive = _site_archive(make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class=per_class, size=64), "site")
    png = tmp_path / "chest.png"
    png.write_bytes(_film_png(dicom_data))
    try:
        add_user("alice", "a long enough password", "admin")
        with running_app(env, tmp_path / "streamlit.log") as url, diagnose_page(url) as page:
            _sign_in(page)
            _upload_dataset(page, name, archive)
            _validate_default_model(page)
            yield page, png
    finally:
        os.environ["CXR_VAR_DIR"] = previous_var


def _diagnose(page, film: Path) -> None:  # type: ignore[no-untyped-def]
    """Go to Diagnose and drop ``film`` on it."""
    page.get_by_role("link", name="Diagnose").click()
    page.locator("input[type=file]").first.wait_for(state="attached", timeout=60_000)
    _streamlit_idle(page)
    page.set_input_files("input[type=file]", [str(film)])


def _sign_in(page, name: str = "alice", password: str = "a long enough password") -> None:  # type: ignore[no-untyped-def]
    page.get_by_role("link", name="Sign in").first.click()
    page.get_by_label("User name", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Signed in as").wait_for(timeout=60_000)


def open_app(page, url: str) -> None:  # type: ignore[no-untyped-def]
    """Load the app and wait until its first page (Diagnose) has finished running.

    A session's first run reruns itself once (see app.py); a click on the menu before
    that settles can be lost.
    """
    page.goto(url)
    page.locator("input[type=file]").first.wait_for(state="attached", timeout=180_000)
    _streamlit_idle(page)


def _launch_small_job(page, epochs: str, version: str) -> None:  # type: ignore[no-untyped-def]
    """On the Training page, with "Advanced: every setting of this job" open: a tiny job (64 px,
    batch 8, ``epochs``) named ``version``, launched, and seen to start."""
    for label, value in (("Epochs", epochs), ("Image size (px)", "64"), ("Batch size", "8")):
        field = page.get_by_label(label, exact=True)
        field.fill(value)
        field.press("Enter")
        _streamlit_idle(page)
    page.get_by_label("New version name").fill(version)
    page.get_by_label("New version name").press("Enter")
    _streamlit_idle(page)
    page.get_by_role("button", name="Launch").click()
    page.get_by_text("started").first.wait_for(timeout=60_000)


def _streamlit_idle(page, timeout_ms: int = 180_000) -> None:  # type: ignore[no-untyped-def]
    """Wait until the script run triggered by the last action has finished."""
    page.wait_for_timeout(300)
    page.locator("[data-testid=stStatusWidget]").wait_for(state="hidden", timeout=timeout_ms)


@pytest.mark.slow
def test_admin_signs_in_uploads_trains_and_promotes(use_weights: Path, tmp_path: Path) -> None:
    """The admin's whole path in a browser: sign in, upload a zip, check it, train a tiny job, promote it."""
    import zipfile

    from cxr_core.state.audit import entries
    from cxr_core.state.users import add_user
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

            _sign_in(page)

            _upload_dataset(page, "site B", archive)
            page.get_by_role("button", name="Use this dataset for training").click()
            _streamlit_idle(page)

            page.get_by_role("link", name="Training", exact=True).click()
            page.get_by_text("Train from scratch").click()
            _streamlit_idle(page)
            page.get_by_text("Advanced: every setting of this job").click()
            page.locator("[data-testid=stSelectbox]").filter(has_text="Architecture").click()
            page.get_by_role("option", name="cnn5").click()
            _streamlit_idle(page)
            _launch_small_job(page, epochs="2", version="9.9.9")
            # The live view reruns itself; reload the page meanwhile: the job carries on.
            # A reload starts a new session (signed out); the job is a separate process and carries on.
            page.reload()
            _sign_in(page)
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
    from cxr_core.models.pointer import registry_dir
    from cxr_core.state.audit import entries
    from cxr_core.state.users import add_user
    from tests.conftest import make_model_folder

    var = tmp_path / "var"
    env = {"CXR_WEIGHTS_DIR": str(use_weights), "CXR_VAR_DIR": str(var), "CXR_DEVICE": "cpu"}
    previous_var = os.environ["CXR_VAR_DIR"]
    os.environ["CXR_VAR_DIR"] = str(var)  # add_user, the registry and entries below use the same files
    try:
        add_user("alice", "a long enough password", "admin")
        staged = make_model_folder(registry_dir() / "densenet121-test", "densenet121", ("covid", "normal", "viral_pneumonia"),
                                   id="densenet121-test", version="0.0.2", size=64, seed=5)
        staged.rename(registry_dir() / "densenet121-test" / "0.0.2")  # trained here, never evaluated
        with running_app(env, tmp_path / "streamlit.log") as url, diagnose_page(url) as page:
            _sign_in(page)
            page.get_by_role("link", name="Models").click()
            page.get_by_text("No default has been chosen").wait_for(timeout=60_000)
            page.get_by_text("Not evaluated: 0.0.2").wait_for(timeout=60_000)
            _streamlit_idle(page)
            # exact: the confirmation tick's help icon is a button named "Help for Delete 0.0.2"
            assert page.get_by_role("button", name="Promote", exact=True).first.is_disabled()
            assert page.get_by_role("button", name="Delete", exact=True).first.is_disabled()
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
        defaults = entries(action="set_default_model")
        assert len(defaults) == 1 and defaults[0].model == "resnet50-test" and defaults[0].user == "alice"
    finally:
        os.environ["CXR_VAR_DIR"] = previous_var


def test_admin_uploads_site_films_validates_and_diagnose_shows_the_badge(use_weights: Path, dicom_data: Path, tmp_path: Path) -> None:
    """Issue 31 in a browser: upload a site's labelled zip, validate the default model on it on
    the Models page, and Diagnose names the validation beside the model."""
    with _site_validated(use_weights, dicom_data, tmp_path, "Site B films", {"train": 6, "val": 3}) as (page, png):
        body = page.inner_text("body")
        assert "too few to conclude" in body and "COVID-19 sensitivity" in body
        page.get_by_text("Recorded validations").scroll_into_view_if_needed()
        _shot(page, tmp_path, "admin-validation")
        _diagnose(page, png)
        page.get_by_text("Validated at this site on 18 films (Site B films").wait_for(timeout=180_000)
        assert "Traceback" not in page.inner_text("body")
        _shot(page, tmp_path, "diagnose-validated")


@pytest.mark.slow
def test_admin_adapts_the_model_to_a_site_and_sees_before_and_after(use_weights: Path, tmp_path: Path) -> None:
    """Issue 31 in a browser: upload a site's labelled films, launch "Adapt to this site" with the
    training films replayed, and the Models page shows the candidate's before and after on the
    site's held-out patients and its COVID-19 sensitivity on the replay folder's test split."""
    from cxr_core.state.audit import entries
    from cxr_core.state.users import add_user
    from tests.synthetic import make_labelled_folder

    var = tmp_path / "var"
    replay = make_labelled_folder(tmp_path / "replay", per_class={"train": 6, "val": 3, "test": 3}, size=48, seed=6)
    env = {"CXR_WEIGHTS_DIR": str(use_weights), "CXR_VAR_DIR": str(var), "CXR_DEVICE": "cpu",
           "CXR_DEFAULT_MODEL": "densenet121-test", "CXR_REPLAY_DIRS": str(replay)}
    previous_var = os.environ["CXR_VAR_DIR"]
    os.environ["CXR_VAR_DIR"] = str(var)
    source = make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class={"all": 12}, splits=False, size=64, seed=5)
    archive = _site_archive(source, "site-c")
    try:
        add_user("alice", "a long enough password", "admin")
        with running_app(env, tmp_path / "streamlit.log") as url, diagnose_page(url) as page:
            _sign_in(page)
            _upload_dataset(page, "Site C films", archive)
            page.get_by_role("button", name="Use this dataset for training").click()
            _streamlit_idle(page)
            page.get_by_role("link", name="Training", exact=True).click()
            page.get_by_text("Adapt to this site").wait_for(timeout=180_000)
            _streamlit_idle(page)
            page.get_by_text("Adapt to this site").click()
            _streamlit_idle(page)
            page.get_by_text("The candidate is evaluated on the held-out half").wait_for(timeout=60_000)
            page.get_by_text("Left empty, a site adaptation trains every label").wait_for(timeout=10_000)
            # Cross-fitting: two more fine-tunes score the folds they did not see; the threshold is chosen on them.
            crossfit = page.get_by_label("Cross-fit the threshold (folds, 0 = off)", exact=True)
            assert crossfit.input_value() == "0"
            crossfit.fill("2")
            crossfit.press("Enter")
            _streamlit_idle(page)
            page.get_by_text("Advanced: every setting of this job").click()
            _launch_small_job(page, epochs="1", version="9.9.9-site-c")
            page.get_by_text("✅ finished").first.wait_for(timeout=600_000)

            page.get_by_role("link", name="Models").click()
            # The Training page names the preset "Site adaptation" too: wait for the Models page's own line.
            page.get_by_text('on the dataset "Site C films"').first.wait_for(timeout=60_000)
            _streamlit_idle(page)
            body = page.inner_text("body")
            assert 'Site adaptation on the dataset "Site C films"' in body, body[-3000:]
            assert "films adapted on" in body and "held out (patients never trained on)" in body, body[-3000:]
            assert "COVID-19 sensitivity on the shared test split (" in body, body[-3000:]
            assert "Traceback" not in body
            _shot(page, tmp_path, "admin-site-adaptation")
        launches = entries(action="launch_job")
        assert len(launches) == 1 and launches[0].model == "densenet121-test@9.9.9-site-c"
        from cxr_core.models.versions import list_versions

        candidate = next(v for v in list_versions("densenet121-test") if v.version == "9.9.9-site-c")
        assert "out-of-fold scores" in candidate.manifest.training["calibrated_on"]
    finally:
        os.environ["CXR_VAR_DIR"] = previous_var


@pytest.mark.slow
def test_admin_adopts_a_validations_threshold_evaluates_and_promotes_it(use_weights: Path, dicom_data: Path, tmp_path: Path) -> None:
    """Issue 31, the suggested site threshold in a browser: validate on the site's films, adopt
    the threshold as a new version with a reason, evaluate it, promote it, and Diagnose names it."""
    from cxr_core.models.versions import list_versions
    from cxr_core.state.audit import entries

    with _site_validated(use_weights, dicom_data, tmp_path, "Site D films", {"train": 6, "val": 3, "test": 3}) as (page, png):
        page.get_by_text("as this site's COVID-19 threshold (a new version of densenet121-test)").click()
        _streamlit_idle(page)
        register = page.get_by_role("button", name="Register the new version")
        assert register.is_disabled()  # not without a reason
        page.get_by_label("Why this site adopts it (kept with the version)").fill("validated on Site D's 36 films")
        page.get_by_label("Why this site adopts it (kept with the version)").press("Enter")
        _streamlit_idle(page)
        page.get_by_label("New version", exact=True).fill("0.0.1-site-d")
        page.get_by_label("New version", exact=True).press("Enter")
        _streamlit_idle(page)
        page.get_by_role("button", name="Register the new version").click()
        page.get_by_text("Registered densenet121-test@0.0.1-site-d as a candidate").wait_for(timeout=60_000)
        _streamlit_idle(page)
        # The candidate: where its threshold came from; evaluated on the uploaded films (the set offered first),
        # which chose its threshold: the page warns before, and the promotion check asks for a reason after.
        page.get_by_text("with this site's COVID-19 threshold p ≥ ").first.wait_for(timeout=60_000)
        page.get_by_text("Not evaluated: 0.0.1-site-d").wait_for(timeout=60_000)
        page.get_by_text("These are the films that chose this version's threshold").wait_for(timeout=60_000)
        page.get_by_role("button", name="Evaluate", exact=True).click()
        _streamlit_idle(page)
        page.get_by_text("Not evaluated: 0.0.1-site-d").wait_for(state="detached", timeout=180_000)
        page.get_by_text("films of its evaluation set were used for its COVID-19 threshold").wait_for(timeout=60_000)
        reason = page.get_by_label("Reason to promote anyway")
        reason.fill("site threshold adopted after local validation")
        reason.press("Enter")
        _streamlit_idle(page)
        page.get_by_role("button", name="Promote").first.click()
        _streamlit_idle(page)
        page.get_by_text("0.0.1-site-d (active)").first.wait_for(timeout=60_000)
        assert "Traceback" not in page.inner_text("body")
        _shot(page, tmp_path, "admin-site-threshold")
        # Validated again on the films that chose its threshold: flagged, and Diagnose does not count it.
        page.get_by_label("Model version").click()
        page.get_by_role("option", name="densenet121-test@0.0.1-site-d (active)").click()
        _streamlit_idle(page)
        page.get_by_role("button", name="Validate", exact=True).click()
        page.get_by_text("were used for this version's COVID-19 threshold: its figures on them flatter it").wait_for(timeout=180_000)
        _diagnose(page, png)
        page.get_by_text("Not validated at this site on films it has not seen").first.wait_for(timeout=180_000)
        body = page.inner_text("body")
        assert "version **0.0.1-site-d**" in body or "0.0.1-site-d" in body
        assert "Traceback" not in body
        _shot(page, tmp_path, "diagnose-site-threshold")
        # What the app recorded, read while this process still points at its state folder.
        adopted = next(v for v in list_versions("densenet121-test") if v.version == "0.0.1-site-d")
        assert adopted.active and adopted.evaluation is not None and adopted.manifest.thresholds["covid"] != 0.4
        assert [e.model for e in entries(action="adopt_site_threshold")] == ["densenet121-test@0.0.1-site-d"]
        assert [e.model for e in entries(action="promote")] == ["densenet121-test@0.0.1-site-d"]

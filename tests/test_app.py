"""The pages, driven by Streamlit's AppTest (no browser)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)


def texts(at: AppTest) -> str:
    parts = [e.value for e in at.markdown] + [e.value for e in at.caption] + [e.value for e in at.error]
    parts += [e.value for e in at.warning] + [e.value for e in at.info]
    return "\n".join(str(p) for p in parts)


def test_no_model_installed_is_said_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path))
    at = app().run()
    assert not at.exception
    assert any("No trained model is installed" in e.value for e in at.error)
    assert not at.file_uploader  # nothing to upload to


def test_upload_gives_probabilities_overlay_and_errors(use_weights: Path, dicom_data: Path) -> None:
    at = app().run()
    assert not at.exception and [s.label for s in at.selectbox] == ["Model"]
    at.file_uploader[0].set_value(
        [
            ("RG1_J2KR.dcm", (dicom_data / "RG1_J2KR.dcm").read_bytes(), "application/dicom"),
            ("IMG0002", (dicom_data / "RG1_UNCR.dcm").read_bytes(), "application/octet-stream"),
            ("broken.dcm", b"DICM" * 10, "application/dicom"),
        ]
    )
    at.run()
    assert not at.exception
    body = texts(at)
    assert "**Prediction:" in body
    assert "densenet121 random-weight test model" in body and "version **0.0.1**" in body
    assert "Decision support only" in body
    assert any("broken.dcm" in e.value and "not an image" in e.value for e in at.error)
    table = at.dataframe[0].value.set_index("file")
    # The worklist puts problems first: the unreadable file, then flagged studies.
    assert list(table.index) == ["broken.dcm", "RG1_J2KR.dcm", "IMG0002"]
    assert table.loc["RG1_J2KR.dcm", "p_covid"] == pytest.approx(table.loc["IMG0002", "p_covid"], abs=1e-4)
    assert set(table["gate"]) == {"", "warning"}  # random test models have no fitted gate: warned
    captions = [c for image in at.get("image") for c in image.captions]
    assert any(c.startswith("Image (window C 15000 / W 30000") for c in captions)
    assert any(c.startswith("Grad-CAM for") for c in captions)
    labels = [s.label for s in at.selectbox]
    assert labels == ["Model", "Study", "Heatmap for class", "Method", "Colormap"]
    assert any("Image metadata" in e.label for e in at.expander)

    # Other class, other method, other study: still no exception.
    at.selectbox(key="diagnose_method").set_value("eigencam")
    at.selectbox(key="diagnose_study").set_value(1)
    at.run()
    assert not at.exception
    assert any(c.startswith("Eigen-CAM for") for image in at.get("image") for c in image.captions)


def test_switching_model(use_weights: Path, dicom_data: Path) -> None:
    at = app().run()
    at.selectbox[0].set_value("resnet50-test@0.0.1")
    at.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_UNCR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    assert "resnet50-test@0.0.1" in texts(at)


def test_unexpected_failure_shows_no_traceback(use_weights: Path, dicom_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cxr_core.cam

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("internal detail that must not reach the screen")

    monkeypatch.setattr(cxr_core.cam, "explain", broken)
    at = app().run()
    at.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_UNCR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "Something went wrong while computing the heatmap" in errors and "internal detail" not in errors
    assert "**Prediction:" in texts(at)  # the prediction itself is still shown


def test_models_page(use_weights: Path) -> None:
    at = app().run()
    at.switch_page("pages/models.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["model"]) == ["densenet121-test@0.0.1", "resnet50-test@0.0.1"]
    assert set(table["status"]) == {"usable"}


def test_compare_page_grid_review_and_persistence(use_weights: Path, dicom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    at = app().run()
    at.switch_page("pages/compare.py").run()
    assert not at.exception
    at.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_J2KR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    captions = " ".join(c.value for c in at.caption)
    assert "Shared scale: 0 to" in captions and "leave-one-out Dice" in captions
    assert [b.label for b in at.get("download_button")][0] == "Export grid (PNG)"

    at.radio(key="compare_axis").set_value("depth")
    at.run()
    assert not at.exception
    at.toggle[0].set_value(False)  # per-map scaling
    at.run()
    assert "Each map scaled to its own range" in " ".join(c.value for c in at.caption)

    at.radio[1].set_value("Disagree")
    at.radio[2].set_value("Agree")
    at.text_area[0].set_value("the map sits on the heart border")
    at.button[0].click()
    at.run()
    assert not at.exception and [s.value for s in at.success] == ["Review recorded."]

    # A new app process (new AppTest, same database) lists the review.
    again = app().run()
    again.switch_page("pages/compare.py").run()
    again.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_J2KR.dcm").read_bytes(), "application/dicom"))
    again.run()
    reviews = again.dataframe[-1].value
    assert list(reviews["comment"]) == ["the map sits on the heart border"]
    assert list(reviews["prediction"]) == [False] and list(reviews["heatmap"]) == [True]


def _png_bytes(pixels) -> bytes:  # type: ignore[no-untyped-def]
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rejected_input_needs_a_recorded_override(use_weights: Path, dicom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.audit import entries

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    at = app().run()
    at.file_uploader[0].set_value(("head.dcm", (dicom_data / "693_UNCR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    assert any("Not analysed" in e.value and "CT image" in e.value for e in at.error)
    assert not at.get("plotly_chart") and "**Prediction:" not in texts(at)  # no probabilities shown
    at.text_input[0].set_value("testing the viewer on a CT scout")
    at.button[0].click()
    at.run()
    assert not at.exception and any("Shown after an override" in c.value for c in at.caption)
    overrides = entries(action="override_gate")
    assert len(overrides) == 1 and overrides[0].details["justification"] == "testing the viewer on a CT scout"
    assert any(e.action == "prediction" for e in entries())


def test_rotated_film_can_be_corrected_and_text_masked(use_weights: Path, dicom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2
    import numpy as np

    from cxr_core.io import read_image

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    film = cv2.resize(read_image(dicom_data / "RG1_UNCR.dcm").pixels, (512, 512))
    marked = (film * 255).astype(np.uint8)
    cv2.putText(marked, "R", (30, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, 255, 4)
    at = app().run()
    at.file_uploader[0].set_value(("rotated.png", _png_bytes(np.rot90(marked / 255.0, 1)), "image/png"))
    at.run()
    assert not at.exception and "looks rotated by 90 degrees" in texts(at)
    at.button(key=next(b.key for b in at.button if b.label.startswith("Correct the film"))).click()
    at.run()
    assert not at.exception and "Corrected by the user: rotated back by 90 degrees" in texts(at)
    toggle = next(t for t in at.toggle if t.label.startswith("Mask"))
    toggle.set_value(True)
    at.run()
    assert not at.exception and "Effect of masking the burned-in text" in texts(at)
    assert "Burned-in text masked before inference" in texts(at)

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
            ("broken.dcm", b"DICM" * 10, "application/dicom"),
            ("IMG0002", (dicom_data / "RG1_UNCR.dcm").read_bytes(), "application/octet-stream"),
        ]
    )
    at.run()
    assert not at.exception
    body = texts(at)
    assert "**Prediction:" in body
    assert "densenet121 random-weight test model" in body and "version **0.0.1**" in body
    assert "Decision support only" in body
    assert any("broken.dcm" in e.value and "not an image" in e.value for e in at.error)
    table = at.dataframe[0].value.set_index("File")
    # The worklist puts problems first: the unreadable file, then flagged studies, each with why.
    assert list(table.index) == ["broken.dcm", "RG1_J2KR.dcm", "IMG0002"]
    covid = next(c for c in table.columns if c.endswith(" %") and "COVID" in c.upper())
    assert float(table.loc["RG1_J2KR.dcm", covid]) == pytest.approx(float(table.loc["IMG0002", covid]), abs=0.1)
    assert list(table["Status"]) == ["unreadable", "check", "check"]  # random test models have no fitted gate: warned
    assert "not an image" in table.loc["broken.dcm", "Why"] and table.loc["RG1_J2KR.dcm", "Why"]
    captions = [c.value for c in at.caption]
    assert any(c.startswith("Image (window C 15000 / W 30000") for c in captions)
    assert any(c.startswith("Grad-CAM for") for c in captions)
    # RG1 is brighter than the training films (its own window): the page says so, and shows what
    # a contrast stretch does to the answer.
    body = texts(at)
    assert "is brighter overall than 99% of the films" in body and "**Effect of the display window**" in body
    assert "Stretched between its 0.5th and 99.5th percentiles it is called" in body
    window_table = next(d.value for d in at.dataframe if "contrast stretched" in d.value.columns)
    assert len(window_table) == 3
    assert window_table["as read"].sum() == pytest.approx(1.0, abs=0.01) and window_table["contrast stretched"].sum() == pytest.approx(1.0, abs=0.01)
    labels = [s.label for s in at.selectbox]
    assert labels == ["Model", "Study", "Heatmap for class", "Method", "Colormap"]
    assert any("Image metadata" in e.label for e in at.expander)
    # The thumbnail strip: one per readable study, with its status; "Open" switches the study.
    # Each study keeps its worklist number (the unreadable upload is study 2), in the strip and the picker.
    assert table.loc["RG1_J2KR.dcm", "Study"] == 1 and table.loc["IMG0002", "Study"] == 3
    thumbs = [c for image in at.get("image") for c in image.captions if c[:2] in ("1.", "2.", "3.")]
    assert sorted(c[:2] for c in thumbs) == ["1.", "3."] and all(c.endswith("⚠") for c in thumbs), thumbs
    assert at.selectbox(key="diagnose_study").options == ["1. RG1_J2KR.dcm", "3. IMG0002"]
    opens = [b for b in at.button if b.label == "Open"]
    assert len(opens) == 2 and at.selectbox(key="diagnose_study").value == 0
    opens[1].click()
    at.run()
    assert not at.exception and at.selectbox(key="diagnose_study").value == 1

    # Other class, other method, other study: still no exception.
    at.selectbox(key="diagnose_method").set_value("eigencam")
    at.selectbox(key="diagnose_study").set_value(1)
    at.run()
    assert not at.exception
    assert any(c.value.startswith("Eigen-CAM (class-agnostic) for") and c.value.endswith("the same map for every class") for c in at.caption)


def test_switching_model(use_weights: Path, dicom_data: Path) -> None:
    at = app().run()
    at.selectbox[0].set_value("resnet50-test@0.0.1")
    at.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_UNCR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    assert "resnet50-test@0.0.1" in texts(at)


def test_unexpected_failure_shows_no_traceback(use_weights: Path, dicom_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cxr_core.explain.cam

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("internal detail that must not reach the screen")

    monkeypatch.setattr(cxr_core.explain.cam, "explain", broken)
    at = app().run()
    at.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_UNCR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "Something went wrong while computing the heatmap" in errors and "internal detail" not in errors
    assert "**Prediction:" in texts(at)  # the prediction itself is still shown


def test_models_page_needs_an_admin(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    at = app().run()
    at.switch_page("pages/models.py").run()
    assert not at.exception and "This page is for administrators" in texts(at) and not at.dataframe
    at.session_state["user"], at.session_state["role"] = "alice", "admin"
    at.run()
    assert not at.exception
    tables = [d.value for d in at.dataframe]
    assert [list(t["version"]) for t in tables] == [["0.0.1"], ["0.0.1"]]
    assert all(bool(t["active"][0]) for t in tables) and [h.value for h in at.header] == ["densenet121-test", "resnet50-test"]
    at.button(key="health_check").click()
    at.run()
    assert not at.exception and any(s.value == "Every check passed." for s in at.success)
    check = at.dataframe[-1].value
    assert list(check["check"][:5]) == ["state folder", "database", "audit trail", "input checks", "model registry"]
    assert check["ok"].all() and len(check) == 8 and list(check["check"][-1:]) == ["lung segmenter"]


def test_compare_page_grid_review_and_persistence(use_weights: Path, dicom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    at = app().run()
    at.switch_page("pages/compare.py").run()
    assert not at.exception
    at.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_J2KR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    captions = " ".join(c.value for c in at.caption)
    # The default grid compares three CAM methods: each gets its own scale (raw units differ).
    assert "One scale per model, method and layer" in captions and "Grad-CAM++ 0 to" in captions and "leave-one-out Dice" in captions
    assert [b.label for b in at.get("download_button")][0] == "Export grid (PNG)"
    from cxr_core.state.audit import entries

    computed = [e for e in entries() if e.action == "compare"]
    assert len(computed) == 1 and computed[0].image_sha256 and len(computed[0].details["panels"]) == 3

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
    # Nobody is signed in: a review is recorded against a name, so one must be typed.
    assert not at.exception and not at.success and any("type your name" in e.value for e in at.error)
    at.radio[1].set_value("Disagree")
    at.radio[2].set_value("Agree")
    at.text_area[0].set_value("the map sits on the heart border")
    at.text_input(key="name-review").set_value("Dr Reviewer")
    at.button[0].click()
    at.run()
    assert not at.exception and [s.value for s in at.success] == ["Review recorded (and in the audit trail)."]
    review = [e for e in entries() if e.action == "review"]
    assert len(review) == 1 and review[0].user == "Dr Reviewer (not signed in)" and review[0].details["agree_prediction"] is False

    # A new app process (new AppTest, same database) lists the review.
    again = app().run()
    again.switch_page("pages/compare.py").run()
    again.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_J2KR.dcm").read_bytes(), "application/dicom"))
    again.run()
    reviews = again.dataframe[-1].value
    assert list(reviews["comment"]) == ["the map sits on the heart border"]
    assert list(reviews["prediction"]) == ["disagree"] and list(reviews["heatmap"]) == ["agree"]
    assert list(reviews["who"]) == ["Dr Reviewer (not signed in)"]


def _png_bytes(pixels) -> bytes:  # type: ignore[no-untyped-def]
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rejected_input_needs_a_recorded_override(use_weights: Path, dicom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.state.audit import entries

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
    # An override is a clinical decision: without a signed-in user, a typed name is required.
    assert not at.exception and any("sign in, or type your name" in e.value for e in at.error)
    assert not entries(action="override_gate")
    at.text_input[0].set_value("testing the viewer on a CT scout")
    next(t for t in at.text_input if t.label.startswith("Your name")).set_value("Dr Who")
    at.button[0].click()
    at.run()
    assert not at.exception and any("Shown after an override" in c.value for c in at.caption)
    overrides = entries(action="override_gate")
    assert len(overrides) == 1 and overrides[0].details["justification"] == "testing the viewer on a CT scout"
    assert overrides[0].user == "Dr Who (not signed in)"
    assert any(e.action == "prediction" for e in entries())


def test_compare_gates_its_input_too(use_weights: Path, dicom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CT gets no heatmap grid on Compare until a clinician overrides, recorded."""
    from cxr_core.state.audit import entries

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    at = app().run()
    at.switch_page("pages/compare.py").run()
    at.file_uploader[0].set_value(("head.dcm", (dicom_data / "693_UNCR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    assert any("no heatmaps" in e.value and "CT image" in e.value for e in at.error)
    assert not at.get("plotly_chart") and not [e for e in entries() if e.action == "compare"]
    at.text_input[0].set_value("reviewing a scout image")
    next(t for t in at.text_input if t.label.startswith("Your name")).set_value("Dr Reviewer")
    at.button[0].click()
    at.run()
    assert not at.exception and at.get("plotly_chart")
    assert any("shown after an override" in c.value for c in at.caption)
    assert [e.details["justification"] for e in entries(action="override_gate")] == ["reviewing a scout image"]
    assert [e for e in entries() if e.action == "compare"]


def test_rotated_film_can_be_corrected_and_text_masked(use_weights: Path, dicom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2
    import numpy as np

    from cxr_core.imaging.io import read_image

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


def test_admin_signs_in_uploads_trains_and_promotes(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import json
    import time
    import zipfile

    from cxr_core.state.audit import entries
    from cxr_core.state.jobs import FAILED, FINISHED, list_jobs
    from cxr_core.state.users import add_user
    from tests.synthetic import make_labelled_folder

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DEVICE", "cpu")
    add_user("alice", "a long enough password", "admin")
    eval_dir = make_labelled_folder(tmp_path / "eval", per_class={"test": 4}, seed=7)
    monkeypatch.setenv("CXR_EVAL_DIR", str(eval_dir))
    source = make_labelled_folder(tmp_path / "set", ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia"), per_class={"train": 12, "val": 4})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in source.rglob("*.png"):
            archive.write(path, f"site-b/{path.relative_to(source).as_posix()}")

    at = app().run()
    at.switch_page("pages/account.py").run()
    at.text_input[0].set_value("alice")
    at.text_input[1].set_value("wrong password")
    at.button[0].click()
    at.run()
    assert any("Wrong user name or password" in e.value for e in at.error)
    at.text_input[1].set_value("a long enough password")
    at.button[0].click()
    at.run()
    assert at.session_state["role"] == "admin"

    at.switch_page("pages/data.py").run()
    assert not at.exception
    at.text_input[0].set_value("site B")
    at.file_uploader(key="data_zip").set_value(("site-b.zip", buffer.getvalue(), "application/zip"))
    at.run()
    next(b for b in at.button if b.label == "Store the upload").click()
    at.run()
    assert not at.exception, at.exception
    assert any(m.label == "Unreadable files" for m in at.metric) and "Images per class" in str(at.get("plotly_chart")[0].proto)
    next(b for b in at.button if b.label == "Use this dataset for training").click()
    at.run()
    assert not at.exception

    at.switch_page("pages/training.py").run()
    assert not at.exception
    recipe = next(r for r in at.radio if r.label == "Recipe")
    from cxr_core.state.jobs import PRESETS

    recipe.set_value(next(i for i, p in enumerate(PRESETS) if p.name == "Train from scratch"))
    at.run()
    assert any("random weights" in c.value for c in at.caption)
    arch = next(s for s in at.selectbox if s.label == "Architecture")
    arch.set_value("cnn5")
    at.run()
    next(n for n in at.number_input if n.label == "Epochs").set_value(2)
    next(n for n in at.number_input if n.label == "Image size (px)").set_value(64)
    next(n for n in at.number_input if n.label == "Batch size").set_value(8)
    next(t for t in at.text_input if t.label == "New version name").set_value("9.9.9")
    next(n for n in at.number_input if n.label == "Zoom to").set_value(1.3)
    next(n for n in at.number_input if n.label == "Aspect stretch").set_value(0.15)
    next(n for n in at.number_input if n.label == "Edge crop").set_value(0.1)
    next(n for n in at.number_input if n.label == "Weight averaging (every N steps, 0 = off)").set_value(3)
    aux = next(m for m in at.multiselect if m.label.startswith("Auxiliary classes"))
    assert aux.options == ["bacterial_pneumonia"]
    aux.set_value(["bacterial_pneumonia"])
    at.run()
    next(b for b in at.button if b.label == "Launch").click()
    at.run()
    assert not at.exception and any("started" in s.value for s in at.success)
    job_dir = list_jobs()[0][0]
    job = json.loads((job_dir / "job.json").read_text())
    assert job["acquisition"] == 0.0 and job["eval_dir"] == str(eval_dir)  # the preset's, and the server's evaluation set
    assert job["zoom"] == [0.85, 1.3] and job["aspect"] == 0.15 and job["edge_crop"] == 0.1 and job["average_every"] == 3 and job["aux_classes"] == ["bacterial_pneumonia"]
    deadline = time.time() + 600
    while time.time() < deadline and list_jobs()[0][2].state not in (FINISHED, FAILED):
        time.sleep(1)
    assert list_jobs()[0][2].state == FINISHED, (job_dir / "job.log").read_text()[-2000:]

    at.switch_page("pages/models.py").run()
    assert not at.exception
    select = next(s for s in at.selectbox if s.label == "Version" and "9.9.9" in s.options)
    select.set_value("9.9.9")
    at.run()
    promote_button = next(b for b in at.button if b.label == "Promote" and b.key == select.key.replace("pick-", "promote-"))
    promote_button.click()
    at.run()
    assert not at.exception
    actions = [e.action for e in entries()]
    for action in ("sign_in_failed", "sign_in", "upload_dataset", "confirm_dataset", "launch_job", "promote"):
        assert action in actions, actions


def test_audit_page_filters_verifies_and_exports(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.state.audit import entries, record

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    record("prediction", user="dr.a", role="radiologist", image_sha256="ab" * 32, model="m@1", details={"prediction": "covid"})
    record("promote", user="root", role="admin", model="m@2")
    at = app().run()
    at.switch_page("pages/audit.py").run()
    assert not at.exception and "This page is for administrators" in texts(at) and not at.dataframe
    at.session_state["user"], at.session_state["role"] = "root", "admin"
    at.run()
    assert not at.exception
    assert [s.value for s in at.success] == ["Chain intact: 2 entries verified."]
    assert list(at.dataframe[0].value["action"]) == ["promote", "prediction"]
    at.selectbox[0].set_value("prediction")
    at.button[0].click()  # the form's submit button
    at.run()
    assert list(at.dataframe[0].value["user"]) == ["dr.a"]
    assert [b.label for b in at.get("download_button")] == ["Download CSV"]
    assert len(entries()) == 2  # viewing records nothing; downloading would


def test_a_refused_upload_says_why_and_can_be_deleted(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import zipfile

    from cxr_core.state.datasets import list_datasets
    from cxr_core.state.users import add_user
    from tests.synthetic import make_labelled_folder

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    add_user("alice", "a long enough password", "admin")
    source = make_labelled_folder(tmp_path / "set", ("covid",), per_class={"all": 3}, splits=False)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in source.rglob("*.png"):
            archive.write(path, path.relative_to(source).as_posix())
    at = app().run()
    at.session_state["user"], at.session_state["role"] = "alice", "admin"
    at.switch_page("pages/data.py").run()
    at.text_input[0].set_value("only covid")
    at.file_uploader(key="data_zip").set_value(("one.zip", buffer.getvalue(), "application/zip"))
    at.run()
    next(b for b in at.button if b.label == "Store the upload").click()
    at.run()
    assert not at.exception
    assert any("at least two classes" in e.value for e in at.error)
    assert not any("Checking it" in s.value for s in at.success)
    delete = next(b for b in at.button if b.label == "Delete this dataset")
    assert delete.disabled  # behind a confirmation
    next(c for c in at.checkbox if c.label.startswith("Yes, delete")).check()
    at.run()
    next(b for b in at.button if b.label == "Delete this dataset").click()
    at.run()
    assert not at.exception and list_datasets() == []


def test_admin_validates_a_model_on_site_films_and_diagnose_shows_it(use_weights: Path, dicom_data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.state.datasets import store_upload, validate_dataset
    from cxr_core.state.site_validations import list_validations
    from tests.synthetic import make_labelled_folder

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    source = make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class={"train": 4, "val": 2}, size=64)
    files = [(str(p.relative_to(source)), p.read_bytes()) for p in sorted(source.rglob("*.png"))]
    dataset = store_upload("Site B films", "alice", files=files)
    validate_dataset(dataset)
    at = app().run()
    at.session_state["user"], at.session_state["role"] = "alice", "admin"
    at.switch_page("pages/models.py").run()
    assert not at.exception
    at.selectbox(key="validate-model").set_value("densenet121-test@0.0.1")
    at.button(key="validate-run").click()
    at.run()
    assert not at.exception, at.exception
    assert any("too few to conclude" in w.value for w in at.warning)
    assert "`None`" not in [m.value for m in at.markdown]  # a bare expression's value, written by Streamlit's magic
    figures = next(d.value for d in at.dataframe if "figure" in d.value.columns)
    assert list(figures["figure"][:2]) == ["COVID-19 sensitivity", "Specificity (not COVID-19 left alone)"]
    assert figures["value (95% CI); films"][0].endswith("/6")  # 6 COVID-19 films (train and val)
    (stored,) = list_validations()
    assert stored.model == "densenet121-test@0.0.1" and stored.user == "alice" and stored.data_name == "Site B films"
    assert "Download the report" in [b.label for b in at.get("download_button")]
    # PPV and NPV at the share of COVID-19 films the site reads, not the uploaded set's (6 of 12).
    prevalence = at.number_input(key="validation-prevalence")
    assert prevalence.value == 50.0 and "these films' 50.0%" in prevalence.label
    prevalence.set_value(5.0)
    at.run()
    assert any(m.value.startswith("At 5% COVID-19: **PPV ") for m in at.markdown)

    at.switch_page("pages/diagnose.py").run()
    at.file_uploader[0].set_value(("film.dcm", (dicom_data / "RG1_UNCR.dcm").read_bytes(), "application/dicom"))
    at.run()
    assert not at.exception
    badges = [c.value for c in at.caption if c.value.startswith(("Validated at this site", "Not validated at this site"))]
    assert badges and badges[0].startswith("Validated at this site on 12 films (Site B films, ")


def test_models_page_shows_an_adapted_candidates_before_and_after(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from cxr_core.models.pointer import registry_dir
    from cxr_core.models.versions import SITE_ADAPTATION_NAME
    from tests.conftest import make_model_folder

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    staged = make_model_folder(registry_dir() / "densenet121-test", "densenet121", ("covid", "normal", "viral_pneumonia"),
                               id="densenet121-test", version="0.0.2-site", size=64, seed=5)
    folder = staged.rename(registry_dir() / "densenet121-test" / "0.0.2-site")

    def figures(sensitivity: float, specificity: float) -> dict:
        return {"covid_sensitivity": {"value": sensitivity, "ci95": [0.5, 0.99], "successes": 9, "n": 10},
                "non_covid_specificity": {"value": specificity, "ci95": [0.4, 0.9], "successes": 14, "n": 20},
                "ppv": {"value": None, "ci95": None, "successes": 0, "n": 0}, "npv": {"value": None, "ci95": None, "successes": 0, "n": 0}}

    (folder / SITE_ADAPTATION_NAME).write_text(json.dumps({
        "site": "Site B", "films": {"adapt": 20, "validation": 6, "held_out": 30, "replay_train": 20},
        "before": figures(0.9, 0.7), "after": figures(0.9, 0.65), "shared_test": {"folder": "cxr", "n": 1293, "covid_sensitivity": 0.97}}))
    (folder / "evaluation.json").write_text(json.dumps({"n": 30, "accuracy": 0.8, "evaluation_set": "x", "split": None}))
    at = app().run()
    at.session_state["user"], at.session_state["role"] = "alice", "admin"
    at.switch_page("pages/models.py").run()
    assert not at.exception
    body = texts(at)
    # A site that is not one of the checked datasets (e.g. adapted from the command line) is shown by its path.
    assert "**Site adaptation** on `Site B`: 20 films adapted on" in body
    before_after = next(d.value for d in at.dataframe if "on the held-out films" in d.value.columns)
    assert list(before_after.columns) == ["on the held-out films", "before", "after"]
    assert before_after["after"][1].startswith("0.650")
    assert any("not better than before" in w.value for w in at.warning)


def test_a_site_adaptation_that_would_stop_is_explained_before_launch(use_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.state.datasets import confirm_dataset, store_upload, validate_dataset
    from cxr_core.state.jobs import PRESETS
    from tests.synthetic import make_labelled_folder

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("CXR_REPLAY_DIRS", raising=False)
    # A hospital's films: COVID-19 and normal, no viral pneumonia; the test model names no training data on disk.
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class={"all": 6}, splits=False, size=64)
    dataset = store_upload("Site E", "alice", files=[(p.relative_to(site).as_posix(), p.read_bytes()) for p in site.rglob("*.png")])
    validate_dataset(dataset, thumbnails=0)
    confirm_dataset(dataset, "alice")
    at = app().run()
    at.session_state["user"], at.session_state["role"] = "alice", "admin"
    at.switch_page("pages/training.py").run()
    next(r for r in at.radio if r.label == "Recipe").set_value(next(i for i, p in enumerate(PRESETS) if p.site_adaptation)).run()
    assert not at.exception
    launch = next(b for b in at.button if b.label == "Launch")
    assert launch.disabled and any("no films of viral_pneumonia" in w.value and "Keep the base model" in w.value for w in at.warning)
    # With the base model's answers kept, the job can run.
    next(t for t in at.toggle if t.label.startswith("Keep the base model")).set_value(True).run()
    assert not next(b for b in at.button if b.label == "Launch").disabled
    assert not any("no films of" in w.value for w in at.warning)


def test_site_adaptation_blocker_says_what_would_stop_adapt() -> None:
    from cxr_core.training.adapt import site_adaptation_blocker

    three = ("covid", "normal", "viral_pneumonia")
    assert site_adaptation_blocker(three, None, ["covid", "normal", "nodule"], replay=True, distill=False) is None
    assert "viral_pneumonia" in site_adaptation_blocker(three, None, ["covid", "normal"], replay=False, distill=False)
    assert site_adaptation_blocker(three, None, ["covid", "normal"], replay=False, distill=True) is None
    assert "no covid films" in site_adaptation_blocker(three, None, ["normal"], replay=False, distill=True)
    assert site_adaptation_blocker(("covid", "other"), "covid", ["covid", "normal"], replay=False, distill=False) is None


def test_diagnose_says_what_an_unvalidated_model_did_at_an_unseen_hospital(use_weights: Path, dicom_data: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    from cxr_core.imaging.io import read_image
    from cxr_core.inference import predict
    from cxr_core.models.loading import load_model
    from cxr_core.state.site_validations import record_validation
    from cxr_core.training.validation import validate_site
    from tests.synthetic import make_labelled_folder

    weights = tmp_path / "weights"
    shutil.copytree(use_weights / "densenet121-test", weights / "densenet121-test")
    (weights / "densenet121-test" / "external_measurement.json").write_text(json.dumps({"model": "densenet121-test@0.0.1", "groups": {
        "jsrt/normal": {"n": 10, "called_covid": 4}, "jsrt/nodule": {"n": 10, "called_covid": 6}}}))
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    film = ("film.dcm", (dicom_data / "RG1_UNCR.dcm").read_bytes(), "application/dicom")
    model = load_model(weights / "densenet121-test", device="cpu")
    covid = model.manifest.label("covid")
    note = f"At a hospital it was never trained on (jsrt: 20 films, none of them {covid}), this model called 10 (50%) {covid}."

    def shown(at: AppTest) -> list[str]:
        return [e.value for e in [*at.caption, *at.warning] if note in e.value]

    at = app().run()
    at.file_uploader[0].set_value(film)
    at.run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("Not validated at this site") for c in at.caption)
    (text,) = shown(at)
    assert "validate the model on this hospital's own films" in text
    # Loud (a warning box) exactly when the model calls COVID-19, a caption otherwise.
    (prediction,) = predict(model, [read_image(film[1], name=film[0])])
    assert (text in [w.value for w in at.warning]) == (prediction.decision == "covid")

    site = make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class={"all": 3}, splits=False, size=64)
    record_validation(validate_site(model, site, bootstrap=20), user="alice", data_name="Site B")
    at = app().run()
    at.file_uploader[0].set_value(film)
    at.run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("Validated at this site on 6 films") for c in at.caption) and not shown(at)

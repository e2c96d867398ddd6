"""A site validation's threshold adopted as a new version: same weights, another decision, the usual gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_model_folder
from tests.synthetic import make_labelled_folder

CLASSES = ("covid", "normal", "viral_pneumonia")
LABELS = {"covid": "COVID-19", "normal": "Normal", "viral_pneumonia": "Viral pneumonia"}


@pytest.fixture()
def site_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shipped 3-class model dn@1.0.0 whose COVID-19 threshold is 0.99 (almost never reached)."""
    make_model_folder(tmp_path / "weights", "cnn5", CLASSES, id="dn", version="1.0.0", size=32, thresholds={"covid": 0.99},
                      class_labels=LABELS)
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("CXR_REGISTRY_DIR", raising=False)
    return tmp_path


CHOSEN_ON = {"model": "dn@1.0.0", "data_name": "Site B films", "data_sha256": "ab" * 32, "n": 180, "sensitivity": 0.95,
             "specificity": 0.71, "target_sensitivity": 0.95}


def test_an_adopted_threshold_is_a_new_version_with_the_same_weights_that_decides_differently(site_env: Path) -> None:
    from cxr_core.imaging.io import read_image
    from cxr_core.inference import predict
    from cxr_core.models.loading import load_model
    from cxr_core.models.site_threshold import adopt_site_threshold, site_threshold_of
    from cxr_core.models.versions import find_version, list_versions

    base = find_version("dn", "1.0.0")
    adopted = adopt_site_threshold("dn", "1.0.0", 0.01, new_version="1.0.0-site", user="alice", reason="site validation, 180 films",
                                   chosen_on=CHOSEN_ON)
    assert adopted.key == "dn@1.0.0-site" and not adopted.active and not adopted.shipped and adopted.evaluation is None
    assert [v.version for v in list_versions("dn") if v.active] == ["1.0.0"]  # nothing changes until it is promoted
    m = adopted.manifest
    assert m.thresholds == {"covid": 0.01} and base.manifest.thresholds == {"covid": 0.99}
    assert m.weights_sha256 == base.manifest.weights_sha256 and m.temperature == base.manifest.temperature
    assert (adopted.path / m.weights_file).read_bytes() == (base.path / base.manifest.weights_file).read_bytes()
    assert m.metrics == {}  # the base's figures were measured at its own threshold
    record = site_threshold_of(adopted)
    assert record is not None and record["base"] == "dn@1.0.0" and record["base_threshold"] == 0.99 and record["user"] == "alice"
    assert record["chosen_on"]["data_sha256"] == "ab" * 32 and site_threshold_of(base) is None
    card = (adopted.path / "README.md").read_text()
    assert card.startswith("# Site threshold: COVID-19 at p >= 0.01 (base dn@1.0.0: p >= 0.99)")
    assert "Reason: site validation, 180 films" in card and "optimistic" in card and "180 films, data sha256 abababababab" in card
    # The same film: the same probabilities, and the new threshold calls it COVID-19 where the base did not.
    films = sorted(make_labelled_folder(site_env / "films", CLASSES, per_class={"x": 2}, size=48).rglob("*.png"))
    images = [read_image(f) for f in films]
    before = predict(load_model(base.path, device="cpu"), images)
    after = predict(load_model(adopted.path, device="cpu"), images)
    assert [p.probabilities for p in before] == [p.probabilities for p in after]
    assert all(p.decision != "covid" for p in before) and all(p.decision == "covid" for p in after)
    assert {p.model for p in after} == {"dn@1.0.0-site"}  # every prediction names the version, so the threshold
    # Diagnose says where each threshold came from.
    from cxr_core.models.site_threshold import threshold_origin

    assert threshold_origin(m, "covid") == f"adopted at this site on {record['created'][:10]} from a validation on 180 films"
    assert threshold_origin(base.manifest, "covid") == "chosen on validation for sensitivity"


@pytest.mark.parametrize("threshold, version, reason, message", [
    (0.3, "1.0.0-x", "  ", "Say why"),
    (0.0, "1.0.0-x", "why", "between 0 and 1"),
    (1.0, "1.0.0-x", "why", "between 0 and 1"),
    (0.3, "1.0.0", "why", "already exists"),
    (0.3, "../../weights/dn", "why", "use letters, digits"),
    (0.3, "a/b", "why", "use letters, digits"),
    (0.3, ".hidden", "why", "use letters, digits"),
    (0.3, "1.0..1", "why", "use letters, digits"),
])
def test_what_cannot_be_adopted_is_refused_and_leaves_nothing(site_env: Path, threshold: float, version: str, reason: str,
                                                               message: str) -> None:
    from cxr_core.errors import CxrError
    from cxr_core.models.pointer import registry_dir
    from cxr_core.models.site_threshold import adopt_site_threshold
    from cxr_core.models.versions import list_versions

    with pytest.raises(CxrError, match=message):
        adopt_site_threshold("dn", "1.0.0", threshold, new_version=version, user="alice", reason=reason)
    assert [v.version for v in list_versions("dn")] == ["1.0.0"]
    assert not (registry_dir() / "dn").exists() or not any((registry_dir() / "dn").iterdir())


def test_a_model_that_decides_by_the_most_probable_class_has_no_threshold_to_replace(site_env: Path) -> None:
    from cxr_core.models.site_threshold import SiteThresholdError, adopt_site_threshold

    make_model_folder(site_env / "weights", "cnn5", CLASSES, id="plain", version="1.0.0", size=32, class_labels=LABELS)
    with pytest.raises(SiteThresholdError, match="no COVID-19 threshold to replace"):
        adopt_site_threshold("plain", "1.0.0", 0.3, new_version="1.0.0-site", user="alice", reason="why")


def test_an_adopted_threshold_is_evaluated_promoted_and_rolled_back_like_any_candidate(site_env: Path) -> None:
    from cxr_core.models.loading import installed_models
    from cxr_core.models.pointer import RegistryError
    from cxr_core.models.site_threshold import adopt_site_threshold
    from cxr_core.models.versions import promote, rollback
    from cxr_core.training.evaluation_set import evaluate_active_alongside, evaluate_candidate

    adopted = adopt_site_threshold("dn", "1.0.0", 0.01, new_version="1.0.0-site", user="alice", reason="why")
    with pytest.raises(RegistryError, match="has not been evaluated"):
        promote("dn", "1.0.0-site", user="alice", override_reason="trust me")
    eval_dir = make_labelled_folder(site_env / "eval", CLASSES, per_class={"test": 3}, size=48, seed=4)
    measured = evaluate_candidate(adopted.path, eval_dir)
    active = evaluate_active_alongside("dn", eval_dir)
    assert active is not None and measured["n"] == active["n"] == 9
    # The threshold changed the calls (every film called COVID-19), not the probabilities.
    assert measured["per_class"]["covid"]["recall"] == 1.0 and measured["accuracy"] == pytest.approx(3 / 9, abs=1e-3)
    assert measured["auroc_macro"] == active["auroc_macro"]
    promote("dn", "1.0.0-site", user="alice", override_reason="adopted at this site after validation")
    assert [m.manifest.version for m in installed_models()] == ["1.0.0-site"]
    rollback("dn", user="alice")
    assert [m.manifest.version for m in installed_models()] == ["1.0.0"]


def test_the_models_page_adopts_a_validations_threshold_and_evaluates_the_candidate(site_env: Path) -> None:
    from streamlit.testing.v1 import AppTest

    from cxr_core.models.versions import list_versions
    from cxr_core.state.audit import entries
    from cxr_core.state.datasets import store_upload, validate_dataset

    source = make_labelled_folder(site_env / "site", ("covid", "normal"), per_class={"train": 4, "val": 2}, size=48)
    files = [(str(p.relative_to(source)), p.read_bytes()) for p in sorted(source.rglob("*.png"))]
    validate_dataset(store_upload("Site B films", "alice", files=files))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=180).run()
    at.session_state["user"], at.session_state["role"] = "alice", "admin"
    at.switch_page("pages/models.py").run()
    at.button(key="validate-run").click()
    at.run()
    assert not at.exception, at.exception
    expander = next(e for e in at.expander if e.label.startswith("Adopt p ≥ "))
    assert at.button(key="adopt-run").disabled  # no reason yet
    at.text_input(key="adopt-version").set_value("1.0.0-siteb")
    at.text_input(key="adopt-reason").set_value("validated on Site B's films")
    at.run()
    at.button(key="adopt-run").click()
    at.run()
    assert not at.exception, at.exception
    assert any(s.value.startswith("Registered `dn@1.0.0-siteb` as a candidate") for s in at.success)
    adopted = next(v for v in list_versions("dn") if v.version == "1.0.0-siteb")
    offered = float(expander.label.split("p ≥ ")[1].split(" ")[0])
    assert adopted.manifest.thresholds == {"covid": offered} and adopted.evaluation is None
    assert adopted.manifest.training["site_threshold"]["chosen_on"]["data_name"] == "Site B films"
    assert len(adopted.manifest.training["fitted_site_films"]["fingerprints"]) == 12  # the validation's films
    adoption = [e for e in entries() if e.action == "adopt_site_threshold"][-1]
    assert adoption.model == "dn@1.0.0-siteb" and adoption.details["base"] == "dn@1.0.0" and adoption.user == "alice"
    # Offered the films that chose the threshold, the page says they would flatter it.
    site_root = adopted.manifest.training["site_threshold"]["chosen_on"]["root"]
    at.selectbox(key="pick-dn").set_value("1.0.0-siteb")
    at.selectbox(key="evaluate-set-dn").set_value("Another folder on the server…")
    at.run()
    at.text_input(key="evaluate-set-dn-path").set_value(site_root)
    at.run()
    assert any("films that chose this version's threshold" in w.value for w in at.warning)
    # A copy of those films elsewhere is recognised by content.
    import shutil

    shutil.copytree(site_root, site_env / "copy")
    at.text_input(key="evaluate-set-dn-path").set_value(str(site_env / "copy"))
    at.run()
    assert any(w.value.startswith("12 films of this set were used for 1.0.0-siteb's COVID-19 threshold: its figures on them will flatter it") for w in at.warning)
    # Evaluated from the page on other films typed in: then it can be promoted.
    eval_dir = make_labelled_folder(site_env / "eval", CLASSES, per_class={"test": 2}, size=48, seed=4)
    at.selectbox(key="pick-dn").set_value("1.0.0-siteb")
    at.run()
    assert any("Not evaluated" in i.value for i in at.info)
    table = next(d.value for d in at.dataframe if "threshold from" in d.value.columns).set_index("version")
    assert table.loc["1.0.0-siteb", "threshold from"] == "this site" and table.loc["1.0.0", "threshold from"] == "training"
    assert table.loc["1.0.0-siteb", "COVID-19 threshold"] == offered and table.loc["1.0.0", "COVID-19 threshold"] == 0.99
    assert any(c.value.startswith(f"1.0.0-siteb: dn@1.0.0 with this site's COVID-19 threshold p ≥ {offered} (was 0.99)") for c in at.caption)
    at.selectbox(key="evaluate-set-dn").set_value("Another folder on the server…")
    at.run()
    at.text_input(key="evaluate-set-dn-path").set_value(str(eval_dir))
    at.run()
    at.button(key="evaluate-dn").click()
    at.run()
    assert not at.exception, at.exception
    evaluated = next(v for v in list_versions("dn") if v.version == "1.0.0-siteb").evaluation
    assert evaluated is not None and evaluated["n"] == 6 and evaluated["evaluation_set"] == str(eval_dir)
    assert evaluated["split"] == "test" and not any("Not evaluated" in i.value for i in at.info)


def test_the_command_line_adopts_a_threshold_and_refuses_without_a_version(site_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxr_core.cli import main
    from cxr_core.models.versions import find_version
    from cxr_core.state.audit import entries

    common = ["--threshold", "0.2", "--version", "1.0.0-cli", "--user", "bob", "--reason", "validated on 200 films"]
    assert main(["adopt-threshold", "dn", *common]) != 0
    assert "give the version whose threshold is replaced" in capsys.readouterr().err
    assert main(["adopt-threshold", "dn@1.0.0", *common]) == 0
    assert capsys.readouterr().out.startswith("registered dn@1.0.0-cli: dn@1.0.0 with its COVID-19 threshold at {'covid': 0.2}")
    adopted = find_version("dn", "1.0.0-cli")
    assert adopted.manifest.thresholds == {"covid": 0.2} and adopted.manifest.training["site_threshold"]["user"] == "bob"
    assert [e.model for e in entries() if e.action == "adopt_site_threshold"] == ["dn@1.0.0-cli"]
    assert main(["adopt-threshold", "dn@1.0.0", *common]) != 0  # the version exists now
    assert "already exists" in capsys.readouterr().err
    assert "fitted_site_films" not in adopted.manifest.training  # nothing said which films chose it
    # --chosen-on: the films that chose it are recorded, so that validating on them again is flagged.
    chose = make_labelled_folder(site_env / "chose", ("covid", "normal"), per_class={"all": 2}, splits=False, size=48)
    assert main(["adopt-threshold", "dn@1.0.0", *common[:2], "--version", "1.0.0-cli2", *common[4:], "--chosen-on", str(chose)]) == 0
    capsys.readouterr()
    assert len(find_version("dn", "1.0.0-cli2").manifest.training["fitted_site_films"]["fingerprints"]) == 4
    assert main(["validate", str(chose), "--model", "dn@1.0.0-cli2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fitted_films"] == 4
    (site_env / "empty").mkdir()
    assert main(["adopt-threshold", "dn@1.0.0", *common[:2], "--version", "1.0.0-cli3", *common[4:], "--chosen-on", str(site_env / "empty")]) != 0
    assert "No images found under" in capsys.readouterr().err
    assert main(["adopt-threshold", "dn@1.0.0", *common[:2], "--version", "1.0.0-cli3", *common[4:], "--chosen-on", str(site_env / "gone")]) != 0
    assert "gone is not a folder" in capsys.readouterr().err


def test_a_validation_on_the_films_that_chose_the_threshold_is_flagged_and_never_badged(site_env: Path) -> None:
    """The films that chose a site threshold flatter it: validated on any of them again, the
    version's figures carry a warning and Diagnose keeps saying it is not validated here."""
    import shutil

    from cxr_core.models.fitted_films import fitted_fingerprints, fitted_uses
    from cxr_core.models.loading import load_model
    from cxr_core.models.site_threshold import adopt_site_threshold
    from cxr_core.models.versions import find_version
    from cxr_core.state.site_validations import NOT_INDEPENDENT, NOT_VALIDATED, record_validation, site_badge
    from cxr_core.training.validation import validate_site

    chose = make_labelled_folder(site_env / "chose", ("covid", "normal"), per_class={"all": 3}, splits=False, size=48, seed=5)
    films = sorted(chose.rglob("*.png"))
    adopted = adopt_site_threshold("dn", "1.0.0", 0.3, new_version="1.0.0-site", user="alice", reason="why",
                                   chosen_on=CHOSEN_ON, chosen_films=films)
    assert len(fitted_fingerprints(adopted.manifest)) == 6 and fitted_uses(adopted.manifest) == ("COVID-19 threshold",)
    assert "fitted_site_films" not in find_version("dn", "1.0.0").manifest.training
    model = load_model(adopted.path, device="cpu")

    again = validate_site(model, chose, bootstrap=20)
    assert again.fitted_films == 6 and again.as_dict()["fitted_films"] == 6
    assert again.warnings[0].startswith("6 of these 6 films were used for this version's COVID-19 threshold: its figures on them flatter it")
    record_validation(again, user="alice", data_name="the same films")
    assert site_badge("dn@1.0.0-site") == NOT_INDEPENDENT
    # The base version was not fitted on them: its validation on the same films is an ordinary one.
    base_result = validate_site(load_model(find_version("dn", "1.0.0").path, device="cpu"), chose, bootstrap=20)
    assert base_result.fitted_films == 0 and not any("flatter" in w for w in base_result.warnings)
    assert site_badge("dn@1.0.0") == NOT_VALIDATED

    # Two of those films copied under other names into a new upload are still recognised.
    mixed = make_labelled_folder(site_env / "mixed", ("covid", "normal"), per_class={"all": 2}, splits=False, size=48, seed=6)
    shutil.copy(films[0], mixed / "covid" / "renamed-a.png")
    shutil.copy(films[-1], mixed / "normal" / "renamed-b.png")
    assert validate_site(model, mixed, bootstrap=20).fitted_films == 2

    # Films it has not seen give the badge, and a later validation on the flattering films does not take it away.
    other = make_labelled_folder(site_env / "other", ("covid", "normal"), per_class={"all": 3}, splits=False, size=48, seed=7)
    fresh = validate_site(model, other, bootstrap=20)
    assert fresh.fitted_films == 0
    record_validation(fresh, user="alice", data_name="Site B, other patients")
    record_validation(again, user="alice", data_name="the same films")
    assert site_badge("dn@1.0.0-site").startswith("Validated at this site on 6 films (Site B, other patients, ")


def test_a_version_keeps_the_films_every_step_before_it_was_fitted_on() -> None:
    """A version adapted at a site, then given a site threshold, is flagged on the films of either step."""
    from cxr_core.models.fitted_films import FITTED_FILMS_KEY, film_fingerprint, with_fitted_films

    first = with_fitted_films({"command": "adapt"}, [], "adaptation (training, calibration and threshold)")
    first = {**first, FITTED_FILMS_KEY: {**first[FITTED_FILMS_KEY], "fingerprints": ["a" * 16]}}
    both = with_fitted_films(first, [], "COVID-19 threshold")
    assert both["command"] == "adapt" and both[FITTED_FILMS_KEY]["fingerprints"] == ["a" * 16]
    assert both[FITTED_FILMS_KEY]["uses"] == ["adaptation (training, calibration and threshold)", "COVID-19 threshold"]
    assert with_fitted_films(both, [], "COVID-19 threshold")[FITTED_FILMS_KEY]["uses"] == both[FITTED_FILMS_KEY]["uses"]
    assert film_fingerprint(Path("unused"), "0123456789abcdef" * 4) == "0123456789abcdef"


def test_an_evaluation_on_films_the_version_was_fitted_on_holds_back_its_promotion(site_env: Path) -> None:
    from cxr_core.models.pointer import RegistryError
    from cxr_core.models.site_threshold import adopt_site_threshold
    from cxr_core.models.versions import find_version, list_versions, promote, promotion_problems
    from cxr_core.training.evaluation_set import evaluate_active_alongside, evaluate_candidate

    chose = make_labelled_folder(site_env / "chose", CLASSES, per_class={"test": 2}, size=48, seed=5)
    adopt_site_threshold("dn", "1.0.0", 0.3, new_version="1.0.0-site", user="alice", reason="why",
                         chosen_films=sorted(chose.rglob("*.png")))
    assert evaluate_candidate(find_version("dn", "1.0.0-site").path, chose)["fitted_films"] == 6
    assert evaluate_active_alongside("dn", chose)["fitted_films"] == 0  # type: ignore[index]
    adopted, active = (next(v for v in list_versions("dn") if v.version == name) for name in ("1.0.0-site", "1.0.0"))
    problems = promotion_problems(adopted, active)
    assert any(p.startswith("6 films of its evaluation set were used for its COVID-19 threshold: its figures there flatter it") for p in problems)
    with pytest.raises(RegistryError):
        promote("dn", "1.0.0-site", user="alice")
    # Evaluated on films it has not seen, that problem goes.
    other = make_labelled_folder(site_env / "other", CLASSES, per_class={"test": 2}, size=48, seed=6)
    evaluate_candidate(adopted.path, other)
    evaluate_active_alongside("dn", other)
    adopted, active = (next(v for v in list_versions("dn") if v.version == name) for name in ("1.0.0-site", "1.0.0"))
    assert not any("films of its evaluation set" in p for p in promotion_problems(adopted, active))

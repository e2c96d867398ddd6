"""Local validation of a model on a site's labelled films."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_core.training.validation import (
    Estimate,
    auroc,
    bootstrap_auroc,
    suggest_threshold,
    validate_site,
    wilson_interval,
)
from tests.synthetic import make_labelled_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Statistics in Medicine 17:857, table II example
    (15, 148, 0.0624, 0.1605),  # ibid.
    (0, 20, 0.0, 0.1611),  # ibid.: zero events
    (5, 10, 0.2366, 0.7634),
])
def test_wilson_intervals_match_published_values(successes: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_estimates_and_auroc() -> None:
    assert Estimate.of(0, 0).value is None and "not measurable" in Estimate.of(0, 0).words()
    assert Estimate.of(9, 10).words().startswith("0.900 (95% CI 0.596-0.982; 9/10)")
    scores, positive = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.8]), np.array([1, 1, 0, 0, 0, 0], bool)
    # Positives 0.9, 0.8 against negatives 0.7, 0.3, 0.2, 0.8: 7 wins and one tie of 8 pairs.
    assert auroc(scores, positive) == pytest.approx(7.5 / 8)
    assert auroc(scores, np.ones(6, bool)) is None
    boot = bootstrap_auroc(scores, positive, resamples=200)
    assert boot["value"] == pytest.approx(0.9375) and boot["ci95"][0] <= 0.9375 <= boot["ci95"][1]
    t = suggest_threshold(np.array([0.9, 0.6, 0.3, 0.2, 0.1]), np.array([1, 1, 1, 0, 0], bool), 0.95)
    assert t == {"value": 0.3, "target_sensitivity": 0.95, "sensitivity": 1.0, "specificity": 1.0}


def test_a_tiny_site_gets_every_figure_and_a_too_few_warning(densenet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal", "nodule"), per_class={"all": 4}, splits=False, size=64)
    (site / "normal" / "broken.png").write_bytes(b"not a png")
    result = validate_site(densenet, site, bootstrap=100)
    assert result.n == 12 and result.counts == {"covid": 4, "nodule": 4, "normal": 4} and result.unreadable == 1
    assert result.labels == ("covid", "nodule", "normal") and result.classes == tuple(densenet.manifest.classes)
    assert [sum(row) for row in result.confusion_matrix] == [4, 4, 4]
    called_covid = sum(row[0] for row in result.confusion_matrix[1:])
    assert result.covid_sensitivity.n == 4 and result.non_covid_specificity.n == 8
    assert result.non_covid_specificity.successes == 8 - called_covid
    assert result.covid_sensitivity.ci95 is not None and result.covid_sensitivity.ci95[1] - result.covid_sensitivity.ci95[0] > 0.4
    assert sum(result.gate.values()) == 12 and result.data_sha256 and len(result.data_sha256) == 64
    assert sum("too few to conclude" in w for w in result.warnings) == 3 and any("could not be read" in w for w in result.warnings)
    again = validate_site(densenet, site, bootstrap=100)
    assert again.data_sha256 == result.data_sha256 and again.as_dict() == result.as_dict()


def test_cli_validate_json_has_the_documented_keys(use_weights: Path, tmp_path: Path) -> None:
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class={"all": 3}, splits=False, size=64)
    done = subprocess.run([sys.executable, "-m", "cxr_core", "validate", str(site), "--model", "densenet121-test@0.0.1", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    for key in ("model", "n", "classes", "confusion_matrix", "covid_sensitivity", "non_covid_specificity", "auroc", "ece", "suggested_threshold"):
        assert key in data, key
    assert data["model"] == "densenet121-test@0.0.1" and data["n"] == 6
    assert set(data["covid_sensitivity"]) >= {"value", "ci95"} and set(data["auroc"]) == {"value", "ci95"}
    assert set(data["suggested_threshold"]) >= {"value", "sensitivity", "specificity"}
    words = subprocess.run([sys.executable, "-m", "cxr_core", "validate", str(site), "--model", "densenet121-test@9.9"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert words.returncode != 0 and "is not registered" in words.stderr and "Traceback" not in words.stderr


def test_a_recorded_validation_is_listed_badged_and_audited(densenet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from cxr_core.state.audit import entries
    from cxr_core.state.site_validations import NOT_VALIDATED, list_validations, record_validation, site_badge

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    assert site_badge(densenet.key) == NOT_VALIDATED
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class={"all": 3}, splits=False, size=64)
    result = validate_site(densenet, site, bootstrap=50)
    stored = record_validation(result, user="alice", data_name="Site B")
    assert [v.id for v in list_validations(densenet.key)] == [stored.id] and list_validations("other@1") == []
    badge = site_badge(densenet.key)
    assert badge.startswith("Validated at this site on 6 films (Site B, ") and "COVID-19 sensitivity" in badge and "95% CI" in badge
    (entry,) = [e for e in entries() if e.action == "validate_site"]
    assert entry.user == "alice" and entry.model == densenet.key and entry.details["data_sha256"] == result.data_sha256


def test_adaptation_splits_by_patient_mixes_in_replay_and_reports_before_and_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.training.adapt import adapt, build_adapt_folder, split_site
    from cxr_core.training.dataset import scan_folder
    from tests.conftest import make_model_folder

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base = make_model_folder(tmp_path / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal", "nodule"), per_class={"all": 16}, splits=False, size=48, seed=3)
    replay = make_labelled_folder(tmp_path / "replay", per_class={"train": 12, "val": 4, "test": 4}, size=48, seed=4)
    split = split_site(scan_folder(site))
    assert split == split_site(scan_folder(site))  # deterministic
    share = sum(r.split == "test" for r in split) / len(split)
    assert 0.3 < share < 0.7
    counts = build_adapt_folder(site, tmp_path / "view", [replay], 0.5)
    # As many replay films as site films (to rounding per class), every class among them.
    assert abs(counts["replay_train"] - counts["adapt"]) <= 3 and abs(counts["replay_val"] - counts["validation"]) <= 3
    # Asked for, validation takes more replay films than that (never trained on): here all 12 there are.
    wider = build_adapt_folder(site, tmp_path / "view-wider", [replay], 0.5, min_replay_validation=300)
    assert wider["replay_val"] == 12 and wider["replay_train"] == counts["replay_train"]
    for split in ("train", "val"):
        assert {p.name for p in (tmp_path / "view" / split).iterdir()} >= {"covid", "normal", "viral_pneumonia"}
    assert counts["adapt"] + counts["validation"] + counts["held_out"] == 48
    # The held-out view holds site films only, never replay films.
    held = list((tmp_path / "view-held-out").rglob("*.png"))
    assert len(held) == counts["held_out"] and all("site" in str(p.resolve()) for p in held)

    result = adapt(base, site, tmp_path / "adapted", version="1.0.0-site", replay=[replay], epochs=1, batch_size=8,
                   run_dir=tmp_path / "run", device="cpu")
    assert result.model == "adapted@1.0.0-site" and result.base == "cnn5-test@0.0.1"
    assert (tmp_path / "adapted" / "model.safetensors").is_file() and (tmp_path / "adapted" / "manifest.json").is_file()
    for side in (result.before, result.after):
        assert side["n"] == counts["held_out"] and set(side["counts"]) == {"covid", "normal", "nodule"}
    assert result.before["model"] == "cnn5-test@0.0.1" and result.after["model"] == "adapted@1.0.0-site"
    assert any("nodule" in note for note in result.notes)
    # The adapted version knows which of the site's films it was fitted on: the adapt and validation
    # halves, not the held-out half (its figures above are a fair validation) nor the replayed films.
    from cxr_core.models.fitted_films import fitted_fingerprints
    from cxr_core.models.loading import load_model

    adapted = load_model(tmp_path / "adapted", device="cpu")
    assert len(fitted_fingerprints(adapted.manifest)) == result.films["adapt"] + result.films["validation"]
    assert result.after["fitted_films"] == result.before["fitted_films"] == 0
    whole = validate_site(adapted, site, bootstrap=20)
    assert whole.fitted_films == result.films["adapt"] + result.films["validation"] and "flatter" in whole.warnings[0]


def test_adaptation_trains_labels_the_model_has_no_class_for_as_auxiliary_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.models.loading import load_model
    from cxr_core.training.adapt import adapt
    from tests.conftest import make_model_folder

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base = make_model_folder(tmp_path / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal", "nodule"), per_class={"all": 16}, splits=False, size=48, seed=3)
    replay = make_labelled_folder(tmp_path / "replay", per_class={"train": 12, "val": 4, "test": 4}, size=48, seed=4)
    result = adapt(base, site, tmp_path / "adapted", version="1.0.0-site", replay=[replay], epochs=1, batch_size=8,
                   run_dir=tmp_path / "run", device="cpu")  # the default
    assert [n for n in result.notes if "nodule" in n] == ["nodule: not a class of cnn5-test@0.0.1, trained as an auxiliary output (not in the adapted model)"]
    config = json.loads((tmp_path / "run" / "run" / "config.json").read_text())
    assert config["aux_classes"] == ["nodule"]
    # The adapted model has the base model's classes and outputs only; nodules are still judged as non-COVID.
    adapted = load_model(tmp_path / "adapted", device="cpu")
    assert adapted.manifest.classes == ("covid", "normal", "viral_pneumonia")
    assert adapted.network.head.fc.out_features == 3
    assert result.after["counts"]["nodule"] == result.before["counts"]["nodule"] > 0


def test_the_model_s_own_training_folders_are_found_where_its_manifest_names_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.models.loading import load_model
    from cxr_core.training.adapt import training_folders
    from tests.conftest import make_model_folder

    classes = ("covid", "normal", "viral_pneumonia")
    make_labelled_folder(tmp_path / "data" / "a", per_class={"train": 2, "val": 1}, size=32)
    make_labelled_folder(tmp_path / "data" / "b", per_class={"train": 2, "val": 1}, size=32)
    both = make_model_folder(tmp_path / "weights", "cnn5", classes, size=32, id="both", training_data={"root": "data/a + data/b"})
    missing = make_model_folder(tmp_path / "weights", "cnn5", classes, size=32, id="missing", training_data={"root": "data/a + data/gone"})
    unknown = make_model_folder(tmp_path / "weights", "cnn5", classes, size=32, id="unknown")
    monkeypatch.chdir(tmp_path / "weights")  # not where the names are relative to: the folder above weights/ is tried next
    model = load_model(both, device="cpu")
    assert [p.resolve() for p in training_folders(model.manifest, model.path)] == [(tmp_path / "data" / n).resolve() for n in "ab"]
    for folder in (missing, unknown):  # part of the data missing, or none named: no replay rather than a partial one
        model = load_model(folder, device="cpu")
        assert training_folders(model.manifest, model.path) == ()
    # A model adapted to a site was trained on that adaptation's view: not the public data to replay.
    from cxr_core.training.adapt import build_adapt_folder

    site = make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class={"all": 8}, splits=False, size=32)
    build_adapt_folder(site, tmp_path / "data" / "view", [tmp_path / "data" / "a"])
    adapted = make_model_folder(tmp_path / "weights", "cnn5", classes, size=32, id="adapted", training_data={"root": "data/view"})
    model = load_model(adapted, device="cpu")
    assert training_folders(model.manifest, model.path) == ()


def test_cli_adapt_replays_the_model_s_training_data_unless_told_not_to(tmp_path: Path) -> None:
    from tests.conftest import make_model_folder

    classes = ("covid", "normal", "viral_pneumonia")
    make_labelled_folder(tmp_path / "data", per_class={"train": 12, "val": 4, "test": 2}, size=48, seed=4)
    make_model_folder(tmp_path / "weights", "cnn5", classes, size=32, id="site-base", training_data={"root": "data"})
    # A hospital's films: COVID-19, normal and nodule, no (children's) viral pneumonia.
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal", "nodule"), per_class={"all": 16}, splits=False, size=48, seed=3)
    env = {**os.environ, "CXR_WEIGHTS_DIR": str(tmp_path / "weights"), "CXR_DEVICE": "cpu", "PYTHONPATH": str(ROOT),
           "CXR_VAR_DIR": str(tmp_path / "var")}
    command = [sys.executable, "-m", "cxr_core", "adapt", str(site), "--model", "site-base", "--epochs", "1", "--batch-size", "8"]
    done = subprocess.run([*command, "--out", str(tmp_path / "adapted"), "--run-dir", str(tmp_path / "run"), "--json", "--record", "bob",
                           "--target-sensitivity", "0.9"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert json.loads((tmp_path / "adapted" / "manifest.json").read_text())["training"]["config"]["target_sensitivity"] == 0.9
    assert result["films"]["replay_train"] > 0 and result["films"]["replay_val"] > 0
    assert "replayed the model's training data found at data" in result["notes"][0]
    # --record: both scorings of the held-out half stored as site validations, by the given user.
    from cxr_core.state.site_validations import list_validations

    stored = {v.model: v for v in list_validations(db=tmp_path / "var" / "cxr.sqlite3")}
    assert set(stored) == {result["base"], result["model"]}
    for key, side in ((result["base"], "before"), (result["model"], "after")):
        assert stored[key].user == "bob" and stored[key].n == result["films"]["held_out"] and stored[key].result == result[side]
        assert stored[key].data_name == "site, held-out half (adapt)"
    alone = subprocess.run([*command, "--out", str(tmp_path / "alone"), "--run-dir", str(tmp_path / "run-alone"), "--no-replay"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    # Without the training data the site's missing class stops it, with a message that names the ways on.
    assert alone.returncode != 0 and "viral_pneumonia" in alone.stderr and "--distill" in alone.stderr and "Traceback" not in alone.stderr
    # At a hospital without the model's training data, the message says that is why.
    make_model_folder(tmp_path / "weights", "cnn5", classes, size=32, id="elsewhere", training_data={"root": "../public/cxr"})
    command[command.index("site-base")] = "elsewhere"
    away = subprocess.run([*command, "--out", str(tmp_path / "away"), "--run-dir", str(tmp_path / "run-away")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert away.returncode != 0 and "trained on, ../public/cxr, are not on this machine" in away.stderr and "Traceback" not in away.stderr
    # Settings that cannot work are refused before anything trains.
    for flags, message in ((["--target-sensitivity", "1.2"], "need 0.5 <= S < 1"), (["--crossfit", "1"], "at least 2 folds")):
        refused = subprocess.run([*command, "--out", str(tmp_path / "refused"), "--run-dir", str(tmp_path / "run-refused"), *flags],
                                 capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert refused.returncode != 0 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert not (tmp_path / "refused").exists()


def test_a_validation_report_has_every_figure_and_no_file_name(densenet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The document a hospital keeps: figures with intervals, the confusion matrix, the offered
    threshold, the warnings and the disclaimer; the films' names (which can carry a patient's) never."""
    import shutil

    from cxr_core.inference import DISCLAIMER
    from cxr_core.state.site_validations import record_validation
    from cxr_core.training.validation import estimate_text

    monkeypatch.setenv("CXR_VAR_DIR", str(tmp_path / "var"))
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal", "nodule"), per_class={"all": 3}, splits=False, size=64)
    first = sorted((site / "covid").iterdir())[0]
    shutil.move(first, site / "covid" / "Smith_John_MRN123.png")
    result = validate_site(densenet, site, bootstrap=50)
    stored = record_validation(result, user="alice", data_name="Site B")
    report = stored.report()
    assert report.startswith(f"# Site validation of `{densenet.key}`")
    assert f"- Validated on {stored.created} by alice." in report and f"`{result.data_sha256}`" in report
    assert "Site B, 9 read (covid 3, nodule 3, normal 3)" in report
    assert f"| COVID-19 sensitivity | {estimate_text(result.as_dict()['covid_sensitivity'])} |" in report
    assert f"| AUROC, COVID-19 vs not | {estimate_text(result.auroc)} |" in report
    assert "| folder nodule | " in report and "called viral pneumonia" in report  # the model's classes, named
    # Each section once, in order.
    assert [line for line in report.splitlines() if line.startswith("## ")] == (
        ["## Warnings", "## Figures", "## Confusion matrix (rows: the folders' labels; columns: the model's decisions)"]
        + ["## Reliability on these films"] * bool(result.reliability)
        + ["## Site threshold offered (not applied)"] * bool(result.suggested_threshold) + ["## Input check"])
    assert "too few to conclude" in report and DISCLAIMER in report
    assert ("## Site threshold offered (not applied)" in report) == (result.suggested_threshold is not None)
    assert "PPV and NPV above are at these films' COVID-19 share (33.3%)" in report and "| 5% | " in report
    assert "Smith" not in report and "MRN" not in report and ".png" not in report


def test_cli_validate_writes_the_report_and_refuses_a_folder_that_is_not_there(use_weights: Path, tmp_path: Path) -> None:
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal"), per_class={"all": 3}, splits=False, size=64)
    env = {**os.environ, "CXR_VAR_DIR": str(tmp_path / "var")}
    cmd = [sys.executable, "-m", "cxr_core", "validate", str(site), "--model", "densenet121-test"]
    done = subprocess.run([*cmd, "--record", "alice", "--report", str(tmp_path / "report.md")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Site validation of `densenet121-test@0.0.1`") and "by alice" in report and "Site B" not in report
    refused = subprocess.run([*cmd, "--report", str(tmp_path / "missing" / "report.md")], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
    assert refused.returncode == 2 and "its folder does not exist" in refused.stderr


def test_predictive_values_follow_bayes_and_reproduce_a_sets_own_at_its_share() -> None:
    from cxr_core.training.validation import predictive_values, predictive_values_at

    assert predictive_values(0.9, 0.9, 0.5) == pytest.approx((0.9, 0.9))
    assert predictive_values(0.9, 0.9, 0.1) == pytest.approx((0.5, 0.81 / 0.82))
    assert predictive_values(0.0, 1.0, 0.2) == (None, 0.8)  # nothing is called COVID-19: no PPV
    # 40 COVID-19 films (30 found), 60 others (45 left alone): at the set's own share (0.4), the set's own PPV and NPV.
    assert predictive_values(30 / 40, 45 / 60, 0.4) == pytest.approx((30 / 45, 45 / 55))
    figures = {"covid_sensitivity": {"value": 0.9, "ci95": [0.8, 0.95]}, "non_covid_specificity": {"value": 0.8, "ci95": [0.7, 0.9]}}
    rare = predictive_values_at(figures, 0.05)
    assert rare is not None and rare["ppv"]["value"] == pytest.approx(0.045 / (0.045 + 0.19))
    assert rare["ppv"]["range"][0] < rare["ppv"]["value"] < rare["ppv"]["range"][1]
    assert rare["npv"]["range"][0] < rare["npv"]["value"] < rare["npv"]["range"][1]
    assert predictive_values_at({**figures, "covid_sensitivity": {"value": None, "ci95": None}}, 0.05) is None
    with pytest.raises(ValueError):
        predictive_values_at(figures, 0.0)

"""Model card facts derived from the metrics: training time across resumes, and test-vs-validation shift."""

from __future__ import annotations

from cxr_core.training.finalize import _shift_notes, _training_hours


def _source(acc: float, recalls: dict[str, tuple[float, int]]) -> dict:
    return {"accuracy": acc, "per_class": {c: {"recall": r, "n": n} for c, (r, n) in recalls.items()}}


def test_training_hours_sum_epochs_across_resumes() -> None:
    # The last process ran 1 h; the epochs (some from earlier processes) add up to 3 h.
    training = {"seconds": 3600.0, "history": [{"seconds": 3600.0}, {"seconds": 5400.0}, {"seconds": 1800.0}]}
    assert _training_hours(training) == 3.0
    assert _training_hours({"seconds": 7200.0, "history": []}) == 2.0


def test_shift_note_names_the_source_and_its_weakest_class() -> None:
    metrics = {
        "val": {"by_source": {"a": _source(0.96, {"x": (0.97, 10)}), "b": _source(0.95, {"x": (0.97, 10), "y": (0.93, 5), "z": (0.0, 0)})}},
        "test": {"by_source": {"a": _source(0.94, {"x": (0.95, 10)}), "b": _source(0.76, {"x": (0.61, 10), "y": (1.0, 5), "z": (0.0, 0)})}},
    }
    notes = _shift_notes(metrics)
    assert len(notes) == 1  # source a dropped 0.02: within noise, no note
    assert "`b`" in notes[0] and "0.760" in notes[0] and "0.950" in notes[0] and "weakest class there is x" in notes[0]
    assert _shift_notes({"test": metrics["test"]}) == []  # nothing to compare against


def test_refresh_keeps_checks_and_reviewer_note_and_adds_the_gate_measurement(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from cxr_core.training.finalize import REVIEWER_HEADING, refresh_model_card
    from tests.conftest import make_model_folder

    folder = make_model_folder(tmp_path, "cnn5", ("covid", "normal", "viral_pneumonia"), size=32,
                               metrics={"test": {"n": 10, "accuracy": 0.8, "auroc_macro": 0.9, "ece": 0.03, "confusion_matrix": [[4, 0, 0], [1, 2, 0], [0, 1, 2]],
                                                 "per_class": {c: {"n": 3, "precision": 0.8, "recall": 0.8, "specificity": 0.9, "f1": 0.8} for c in ("covid", "normal", "viral_pneumonia")},
                                                 "abstention": {"answered": 0.9, "accuracy_answered": 0.8889, "accuracy_abstained": 0.0, "n_abstained": 1}}})
    (folder / "README.md").write_text(f"# old\n- Data check: 3 duplicates removed.\n\n{REVIEWER_HEADING}\nLooked at by eye: fine.\n")
    gate = {"chest": {"n": 1293, "wrongly_rejected_rate": 0.0008, "warned_rate": 0.041},
            "non_chest": {"n": 214, "rejected_or_warned_rate": 1.0, "rejected_rate": 0.9766},
            "non_chest_without_dicom_headers": {"rejected_or_warned_rate": 1.0, "rejected_rate": 0.9393}}
    (folder / "gate_measurement.json").write_text(json.dumps(gate))
    card = refresh_model_card(folder)
    assert card == (folder / "README.md").read_text()
    assert "- Data check: 3 duplicates removed." in card
    assert card.rstrip().endswith("Looked at by eye: fine.") and card.count(REVIEWER_HEADING) == 1
    assert "n = 1293: 0.08% rejected, 4.1% warned" in card and "(97.7% rejected)" in card and "(93.9% rejected) with their DICOM headers removed" in card
    assert "names a class for 90.0% of these films" in card and '"uncertain" for 1;' in card
    assert refresh_model_card(folder) == card  # idempotent


def test_the_shortcut_probe_of_this_version_goes_in_the_card_and_a_stale_one_does_not(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from cxr_core.models.manifest import read_manifest
    from cxr_core.training.finalize import refresh_model_card
    from tests.conftest import make_model_folder

    folder = make_model_folder(tmp_path, "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    probe = {"model": read_manifest(folder).key, "split": "test", "blur_sigma_px_at_224": 1.2, "zoom": 1.3,
             "groups": {"kermany/normal": {"n": 120, "flipped_by_blur": 58, "flipped_by_sharpening": 17, "flipped_by_zoom": 97}}}
    (folder / "shortcut_probe.json").write_text(json.dumps(probe))
    card = refresh_model_card(folder)
    assert "kermany/normal 58/120 by blur, 17/120 by sharpening, 97/120 by zoom" in card
    assert "zoomed in (the central 1/1.3 of each side" in card
    (folder / "shortcut_probe.json").write_text(json.dumps({**probe, "model": "someone-else@0.0.1"}))
    assert "Shortcut probe" not in refresh_model_card(folder)


def test_the_crop_flips_of_the_shortcut_probe_reach_the_card(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from cxr_core.models.manifest import read_manifest
    from cxr_core.training.finalize import refresh_model_card
    from tests.conftest import make_model_folder

    folder = make_model_folder(tmp_path, "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    group = {"n": 120, "flipped_by_blur": 1, "flipped_by_sharpening": 2, "flipped_by_zoom": 3,
             "flipped_by_crop_top_bottom": 44, "flipped_by_crop_top": 5, "flipped_by_crop_bottom": 6}
    probe = {"model": read_manifest(folder).key, "split": "test", "blur_sigma_px_at_224": 1.2, "zoom": 1.3,
             "crop": {"top_and_bottom": 0.1, "one_edge": 0.15}, "groups": {"kermany/normal": group}}
    (folder / "shortcut_probe.json").write_text(json.dumps(probe))
    card = refresh_model_card(folder)
    assert "3/120 by zoom, 44/120 by cropping top and bottom, 5/120 the top, 6/120 the bottom" in card
    assert "10% of the rows off top and bottom, or 15% off one edge" in card


def test_the_probes_crops_cut_the_named_rows_and_keep_the_size() -> None:
    import numpy as np

    from tests.conftest import load_script

    probe = load_script("probe_shortcuts")
    # Row r holds the value r: after a crop and the stretch back, the first and last rows
    # tell which rows survived.
    film = np.repeat(np.arange(200, dtype=np.uint8)[:, None], 150, axis=1)
    both, top, bottom = probe.crop_top_bottom(film), probe.crop_top(film), probe.crop_bottom(film)
    assert both.shape == top.shape == bottom.shape == film.shape
    assert both[0, 0] in (20, 21) and both[-1, 0] in (178, 179)  # 10% (20 rows) off each end
    assert top[0, 0] in (30, 31) and top[-1, 0] in (198, 199)  # 15% (30 rows) off the top only
    assert bottom[0, 0] in (0, 1) and bottom[-1, 0] in (168, 169)
    assert (probe.zoom_in(film) != film).any()
    framed = probe.black_frame(film + 10)
    assert framed.shape == film.shape and (framed[:16] == 0).all() and (framed[:, :12] == 0).all()  # 8% of 200 rows, of 150 columns
    assert (framed[16:-16, 12:-12] == (film + 10)[16:-16, 12:-12]).all()
    assert probe.clahe(film).shape == film.shape and (probe.clahe(film) != film).any()


def test_a_probe_report_under_its_old_name_and_without_zoom_still_reaches_the_card(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from cxr_core.models.manifest import read_manifest
    from cxr_core.training.finalize import refresh_model_card
    from tests.conftest import make_model_folder

    folder = make_model_folder(tmp_path, "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    probe = {"model": read_manifest(folder).key, "split": "test", "blur_sigma_px_at_224": 1.2,
             "groups": {"kermany/normal": {"n": 120, "flipped_by_blur": 58, "flipped_by_sharpening": 17}}}
    (folder / "sharpness_probe.json").write_text(json.dumps(probe))
    card = refresh_model_card(folder)
    assert "kermany/normal 58/120 by blur, 17/120 by sharpening." in card and "zoom" not in card.split("Shortcut probe")[1].split("\n")[0]


def test_refreshing_with_a_sealed_split_stores_its_evaluation_and_draws_its_figures(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A candidate trained with --seal-test gets its test figures when the split is read at shipping,
    so the Models page never shows none, or an older version's."""
    import base64
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import plotly.io as pio

    from cxr_core.models.manifest import read_manifest
    from tests.conftest import make_model_folder
    from tests.synthetic import make_labelled_folder

    folder = make_model_folder(tmp_path / "weights", "resnet50", ("covid", "other"), head="sigmoid", size=64, metrics={"test_sealed": {"n": 10}})
    data = make_labelled_folder(tmp_path / "data", ("covid", "normal"), per_class={"test": 5}, size=64)
    script = Path(__file__).resolve().parents[1] / "scripts" / "refresh_model_card.py"
    done = subprocess.run([sys.executable, str(script), str(folder), "--abstention", str(data), "--split", "test"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    test = read_manifest(folder).metrics["test"]
    assert test["n"] == 10 and "abstention" in test and "test_sealed" not in read_manifest(folder).metrics
    z = pio.read_json(folder / "figures" / "test_confusion.json").data[0].z
    if isinstance(z, dict):  # plotly stores numeric arrays base64-encoded
        z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape([int(n) for n in z["shape"].split(",")])
    confusion = np.asarray(z)
    assert confusion.sum() == 10 and confusion.tolist() == test["confusion_matrix"]  # every scored film, as stored
    for name in ("test_roc.json", "test_reliability.json"):
        assert pio.read_json(folder / "figures" / name).data, name

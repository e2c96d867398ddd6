"""Cross-fitting: temperature and threshold fitted on scores from runs that never trained on the film."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxr_core.training.calibration import choose_threshold, fit_temperature
from cxr_core.training.config import TrainConfig
from tests.synthetic import make_labelled_folder


def test_every_film_is_scored_once_by_the_run_of_the_fold_it_was_held_out_of(tmp_path: Path) -> None:
    from cxr_core.training.crossval import fold_of, out_of_fold_logits
    from cxr_core.training.prepare import prepare_data
    from cxr_core.training.trainer import final_spec, label_plan, load_exported, predict_arrays

    data_root = make_labelled_folder(tmp_path / "data", per_class={"train": 8, "val": 4, "test": 2}, seed=5)
    config = TrainConfig(data_dir=str(data_root), arch="cnn5", out=str(tmp_path / "w"), model_id="tiny", schedule=((32, 1),),
                         batch_size=8, lr=3e-3, workers=1, device="cpu")
    data = prepare_data(data_root, label_plan(config), 32)
    oof = out_of_fold_logits(config, data, 3, tmp_path / "cf")

    pool = [*data.train.records, *data.val.records]
    assert sorted(str(r.path) for r in oof.records) == sorted(str(r.path) for r in pool)  # each film once, no test film
    assert oof.logits.shape == (len(pool), 3) and oof.labels.shape == (len(pool),)
    assert sum(f["n_val"] for f in oof.folds) == len(pool) and len(oof.folds) == 3
    # A film's row is what its own fold's run says of it, not another fold's run.
    images = {str(r.path): i for i, r in enumerate(data.train.records)}
    row = next(i for i, r in enumerate(oof.records) if str(r.path) in images)
    fold = fold_of(oof.records[row], 3) + 1
    pixels = data.train.subset([images[str(oof.records[row].path)]]).resized(32)
    scored = {f: predict_arrays(load_exported(config, tmp_path / "cf" / f"fold-{f}"), pixels, final_spec(config), torch.device("cpu"))[0]
              for f in (1, 2, 3)}
    assert np.allclose(oof.logits[row], scored[fold], atol=1e-4)
    assert not all(np.allclose(scored[fold], scored[other], atol=1e-4) for other in (1, 2, 3) if other != fold)


def test_a_crossfitted_adaptation_keeps_the_weights_and_calibrates_on_out_of_fold_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.models.loading import load_model
    from cxr_core.training.adapt import AdaptationError, adapt
    from cxr_core.training.crossval import out_of_fold_logits
    from cxr_core.training.prepare import prepare_data
    from cxr_core.training.trainer import label_plan, probabilities
    from tests.conftest import tiny_site_adaptation

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base, site, common = tiny_site_adaptation(tmp_path, 20)
    with pytest.raises(AdaptationError, match="at least 2 folds"):
        adapt(base, site, tmp_path / "bad", run_dir=tmp_path / "run-bad", crossfit=1, **common)
    plain = adapt(base, site, tmp_path / "plain", run_dir=tmp_path / "run-plain", **common)
    fitted = adapt(base, site, tmp_path / "fitted", run_dir=tmp_path / "run-fitted", crossfit=2, **common)

    # The same seed trains the same exported weights: only the calibration's films differ.
    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "fitted" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    n_pool = plain.films["adapt"] + plain.films["validation"]
    assert f"out-of-fold scores of {n_pool} training and validation films" in " ".join(fitted.notes)
    assert "the validation split's" in " ".join(plain.notes)
    manifest = load_model(tmp_path / "fitted", device="cpu").manifest
    assert "out-of-fold" in manifest.training["calibrated_on"]
    assert "out-of-fold scores" in (tmp_path / "fitted" / "README.md").read_text(encoding="utf-8")

    # The manifest's temperature and threshold are the ones the out-of-fold scores give (the fold
    # runs are finished, so this reads them back rather than training again).
    config = TrainConfig.from_dict(json.loads((tmp_path / "run-fitted" / "run" / "config.json").read_text()))
    data = prepare_data(config.data_dirs, label_plan(config), 32, mask_text=config.mask_burned_in)
    oof = out_of_fold_logits(config, data, 2, tmp_path / "run-fitted" / "crossfit")
    assert len(oof.labels) == n_pool
    temperature = fit_temperature(oof.logits, oof.labels, "softmax")
    assert manifest.temperature == pytest.approx(round(temperature, 4))
    p = probabilities(oof.logits, "softmax", temperature)[:, 0]
    assert manifest.thresholds["covid"] == pytest.approx(round(choose_threshold(p, oof.labels == 0, 0.95), 4))
    plain_manifest = load_model(tmp_path / "plain", device="cpu").manifest
    assert (plain_manifest.temperature, plain_manifest.thresholds) != (manifest.temperature, manifest.thresholds)

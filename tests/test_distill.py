"""Learning without forgetting: the distillation term, and adaptation at a site that lacks a class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cxr_core.training.config import TrainConfig
from cxr_core.training.distill import distillation_loss, load_teacher
from tests.synthetic import make_labelled_folder


def test_the_term_is_zero_for_the_same_answers_and_grows_with_the_difference() -> None:
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    aux = torch.tensor([[5.0], [-3.0]])  # an auxiliary output, after the model's classes: ignored
    same = torch.cat([teacher, aux], dim=1)
    assert distillation_loss(same, teacher, "softmax").item() == pytest.approx(0.0, abs=1e-6)
    near = torch.cat([teacher + torch.tensor([0.3, 0.0, 0.0]), aux], dim=1)
    far = torch.cat([teacher + torch.tensor([3.0, 0.0, 0.0]), aux], dim=1)
    assert 0 < distillation_loss(near, teacher, "softmax").item() < distillation_loss(far, teacher, "softmax").item()
    # KL(p || q) at temperature 2, times 4, worked by hand for one film.
    p, q = torch.softmax(teacher[:1] / 2, 1), torch.softmax(far[:1, :3] / 2, 1)
    assert distillation_loss(far[:1], teacher[:1], "softmax").item() == pytest.approx(4 * float((p * (p / q).log()).sum()), rel=1e-5)
    # Weighted: a film of weight 0 does not count.
    mixed = torch.cat([far[:1], same[1:]])
    assert distillation_loss(mixed, teacher, "softmax", torch.tensor([0.0, 1.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_the_sigmoid_term_is_a_kl_between_bernoullis() -> None:
    teacher = torch.tensor([[1.0], [-2.0]])
    assert distillation_loss(teacher.clone(), teacher, "sigmoid").item() == pytest.approx(0.0, abs=1e-6)
    student = torch.tensor([[-1.0], [-2.0]])
    p, q = torch.sigmoid(torch.tensor(0.5)), torch.sigmoid(torch.tensor(-0.5))
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    assert distillation_loss(student, teacher, "sigmoid").item() == pytest.approx(4 * float(kl) / 2, rel=1e-5)


def test_distillation_needs_a_trained_model_to_keep(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="init must be"):
        TrainConfig(data_dir="x", arch="cnn5", out="o", model_id="m", distill=1.0).validate()
    with pytest.raises(ValueError, match="weight"):
        TrainConfig(data_dir="x", arch="cnn5", out="o", model_id="m", init="w.safetensors", distill=-1.0).validate()


def test_the_teacher_is_the_base_model_frozen(tmp_path: Path) -> None:
    from cxr_core.models.loading import load_model
    from tests.conftest import make_model_folder

    base = make_model_folder(tmp_path / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    teacher = load_teacher("cnn5", 3, base / "model.safetensors", torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), load_model(base, device="cpu").network(x).float(), atol=1e-2)
    with pytest.raises(ValueError, match="does not hold every weight"):
        load_teacher("cnn5", 4, base / "model.safetensors", torch.device("cpu"))


def test_a_site_without_one_of_the_model_classes_adapts_with_distillation_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.models.loading import load_model
    from cxr_core.training.adapt import AdaptationError, adapt
    from tests.conftest import make_model_folder

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base = make_model_folder(tmp_path / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    # A hospital's set: COVID-19, normal and nodule films, no (children's) viral pneumonia; no replay.
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal", "nodule"), per_class={"all": 16}, splits=False, size=48, seed=3)
    with pytest.raises(AdaptationError, match="viral_pneumonia"):
        adapt(base, site, tmp_path / "refused", version="1.0.0-site", epochs=1, batch_size=8, run_dir=tmp_path / "run0", device="cpu")
    result = adapt(base, site, tmp_path / "adapted", version="1.0.0-site", epochs=1, batch_size=8,
                   run_dir=tmp_path / "run", device="cpu", distill=1.0)
    assert result.films["replay_train"] == 0
    config = json.loads((tmp_path / "run" / "run" / "config.json").read_text())
    assert config["distill"] == 1.0
    validation = json.loads((tmp_path / "run" / "run" / "validation.json").read_text())
    assert any("viral_pneumonia" in n and "distillation" in n for n in validation["notes"])
    adapted = load_model(tmp_path / "adapted", device="cpu")
    assert adapted.manifest.classes == ("covid", "normal", "viral_pneumonia") and adapted.network.head.fc.out_features == 3
    assert result.after["n"] == result.before["n"] > 0


def test_a_site_without_covid_films_and_no_replay_is_told_why_it_cannot_adapt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.training.adapt import AdaptationError, adapt
    from tests.conftest import make_model_folder

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base = make_model_folder(tmp_path / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    site = make_labelled_folder(tmp_path / "site", ("normal", "nodule"), per_class={"all": 16}, splits=False, size=48, seed=3)
    with pytest.raises(AdaptationError, match="None of the validation films is covid.*--replay"):
        adapt(base, site, tmp_path / "adapted", version="1.0.0-site", epochs=1, batch_size=8, run_dir=tmp_path / "run", device="cpu", distill=1.0)
    assert not (tmp_path / "adapted").exists()



def test_films_of_skipped_sources_get_no_distillation_term(tmp_path: Path) -> None:
    from cxr_core.training.trainer import train
    from tests.conftest import make_model_folder
    from tests.test_training_run import tiny_config

    data = make_labelled_folder(tmp_path / "data", per_class={"train": 8, "val": 3, "test": 2}, size=32)
    base = make_model_folder(tmp_path / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    init = str(base / "model.safetensors")

    def losses(name: str, **changes: object) -> list[float]:
        config = tiny_config(data, tmp_path / name / "out", schedule=((32, 2),), init=init, **changes)
        result, _ = train(config, tmp_path / name / "run")
        return [h["train_loss"] for h in result.history]

    plain = losses("plain")
    # Synthetic films have no source: skipping "" skips every film, which trains exactly as no term.
    assert losses("skipped", distill=1.0, distill_skip_sources=("",)) == plain
    assert losses("distilled", distill=1.0) != plain
    # Every class has films: the term on the classes without films compares nothing.
    assert losses("no-missing-class", distill=1.0, distill_missing_only=True) == plain


def test_the_term_on_missing_classes_compares_only_their_probability() -> None:
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    # Probability moved between covid and normal only (viral's share kept): no term on viral alone...
    p = torch.softmax(teacher, 1)
    swapped = torch.log(torch.stack([p[:, 1], p[:, 0], p[:, 2]], 1))
    assert distillation_loss(swapped, teacher, "softmax", temperature=1.0, classes=[2]).item() == pytest.approx(0.0, abs=1e-6)
    # ...which the full term does see.
    assert distillation_loss(swapped, teacher, "softmax", temperature=1.0).item() > 0.05
    # Viral's share changed: the Bernoulli KL of (viral, the rest), worked by hand, times T².
    student = teacher + torch.tensor([0.0, 0.0, 1.5])
    pt, qt = torch.softmax(teacher / 2, 1)[:, 2], torch.softmax(student / 2, 1)[:, 2]
    kl = pt * torch.log(pt / qt) + (1 - pt) * torch.log((1 - pt) / (1 - qt))
    assert distillation_loss(student, teacher, "softmax", classes=[2]).item() == pytest.approx(4 * float(kl.mean()), rel=1e-5)
    for bad in ([], [0, 1, 2]):
        with pytest.raises(ValueError, match="some, not all"):
            distillation_loss(student, teacher, "softmax", classes=bad)


def test_a_site_adaptation_distils_only_the_class_it_has_no_films_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from cxr_core.training.adapt import adapt
    from tests.conftest import make_model_folder

    monkeypatch.setenv("CXR_DEVICE", "cpu")
    base = make_model_folder(tmp_path / "weights", "cnn5", ("covid", "normal", "viral_pneumonia"), size=32)
    site = make_labelled_folder(tmp_path / "site", ("covid", "normal", "nodule"), per_class={"all": 16}, splits=False, size=48, seed=3)
    with caplog.at_level(logging.INFO, logger="cxr_core.training.trainer"):
        adapt(base, site, tmp_path / "adapted", version="1.0.0-site", epochs=1, batch_size=8, run_dir=tmp_path / "run",
              device="cpu", distill=1.0, distill_classes="missing")
    assert json.loads((tmp_path / "run" / "run" / "config.json").read_text())["distill_missing_only"] is True
    assert any("classes without training films only: viral_pneumonia" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="multi-class"):
        TrainConfig(data_dir="x", arch="cnn5", out="o", model_id="m", init="w.safetensors", distill=1.0, binary_positive="covid",
                    distill_missing_only=True).validate()

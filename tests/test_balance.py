"""Class balancing by (source, label) group: weights and the weighted loss, by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_core.training.config import TrainConfig
from cxr_core.training.dataset import Record
from cxr_core.training.trainer import _loss_fn, autocast_enabled, sample_weights

CLASSES = ("covid", "normal", "viral_pneumonia")


def _records(groups: list[tuple[str | None, str, int]]) -> tuple[tuple[Record, ...], np.ndarray]:
    records, labels = [], []
    for source, label, n in groups:
        for i in range(n):
            records.append(Record(Path(f"{source}-{label}-{i}.png"), label, "train", None, source))
            labels.append(CLASSES.index(label))
    return tuple(records), np.array(labels)


def _config(**kw: object) -> TrainConfig:
    return replace(TrainConfig(data_dir="d", arch="cnn5", out="o", model_id="m", classes=CLASSES), **kw)  # type: ignore[arg-type]


def test_source_balance_gives_every_source_and_label_group_the_same_weight() -> None:
    # The shared data's shape: adults hold covid and normal, children normal and viral.
    records, labels = _records([("adult", "covid", 6), ("adult", "normal", 4), ("child", "normal", 2), ("child", "viral_pneumonia", 8)])
    w = sample_weights(_config(balance="source"), records, labels)
    assert w is not None and w.shape == (20,)
    assert w.mean() == pytest.approx(1.0)
    # 20 films in 4 groups: each group's total is 5, so a film weighs 5 / group size.
    expected = np.array([5 / 6] * 6 + [5 / 4] * 4 + [5 / 2] * 2 + [5 / 8] * 8)
    np.testing.assert_allclose(w, expected)
    # Within the children, normal and viral weigh the same in total; plain class weights
    # (covid 20/18, normal 20/18, viral 20/24) would favour viral 8*0.83 : 2*1.11 = 3 : 1.
    child_normal, child_viral = w[10:12].sum(), w[12:].sum()
    assert child_normal == pytest.approx(child_viral)


def test_films_without_a_source_are_grouped_by_label_only() -> None:
    records, labels = _records([(None, "covid", 3), (None, "normal", 1)])
    w = sample_weights(_config(balance="source"), records, labels)
    np.testing.assert_allclose(w, [2 / 3, 2 / 3, 2 / 3, 2.0])
    assert sample_weights(_config(balance="weights"), records, labels) is None


def test_weighted_cross_entropy_matches_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 1, 2])
    w = torch.tensor([1.0, 3.0, 0.5])
    loss = _loss_fn(_config(balance="source"), np.array([0, 1, 2]), torch.device("cpu"))(logits, y, w)
    per_film = -torch.log_softmax(logits, 1)[torch.arange(3), y]
    assert float(loss) == pytest.approx(float((per_film * w).sum() / w.sum()), rel=1e-6)
    # Without weights it is the plain mean.
    plain = _loss_fn(_config(balance="none"), np.array([0, 1, 2]), torch.device("cpu"))(logits, y, None)
    assert float(plain) == pytest.approx(float(F.cross_entropy(logits, y)))


def test_binary_loss_takes_per_film_weights() -> None:
    cfg = replace(_config(balance="source"), binary_positive="covid")
    logits = torch.tensor([[1.5], [-0.5]])
    y = torch.tensor([0, 1])  # covid, other
    w = torch.tensor([2.0, 1.0])
    loss = _loss_fn(cfg, np.array([0, 1]), torch.device("cpu"))(logits, y, w)
    per_film = F.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor([1.0, 0.0]), reduction="none")
    assert float(loss) == pytest.approx(float((per_film * w).sum() / 3.0), rel=1e-6)


def test_cpu_bf16_follows_the_config_and_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_core.training import trainer

    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert autocast_enabled(_config(), cpu) is True
    assert autocast_enabled(_config(amp_cpu=False), cpu) is False
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert autocast_enabled(_config(), cpu) is False


def test_source_balance_is_accepted_by_the_config_and_the_command_line() -> None:
    _config(balance="source").validate()
    with pytest.raises(ValueError):
        _config(balance="groups").validate()

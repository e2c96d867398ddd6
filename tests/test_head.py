"""Last-layer refitting (cxr_core.training.head): weights, the partial-label loss, the L2 pull, projection."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core.training.head import NOT_POSITIVE, LinearHead, direction_projection, fit_linear_head, group_weights


def test_group_weights_split_the_total_between_positives_and_equal_negative_groups() -> None:
    positive = np.array([1, 1, 0, 0, 0, 0, 0], dtype=bool)
    groups = ["c/covid", "c/covid", "a/normal", "a/normal", "a/normal", "b/normal", "d/pneumonia"]
    w = group_weights(positive, groups)
    assert w.sum() == pytest.approx(1.0)
    assert w[:2].sum() == pytest.approx(0.5)
    # three negative groups, each 1/6 of the total however many films it has
    assert w[2:5].sum() == pytest.approx(1 / 6)
    assert w[5] == pytest.approx(1 / 6)
    assert w[6] == pytest.approx(1 / 6)


def _blobs(rng: np.random.Generator, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    centres = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    labels = np.repeat(np.arange(3), n)
    return centres[labels] + rng.normal(scale=0.7, size=(3 * n, 3)), labels


def test_softmax_head_learns_separable_classes_from_a_zero_start() -> None:
    rng = np.random.default_rng(0)
    x, y = _blobs(rng)
    start = LinearHead(np.zeros((3, 3)), np.zeros(3))
    head = fit_linear_head(x, y, np.ones(len(y)), start, head="softmax", l2=1e-4)
    assert np.mean(np.argmax(head.logits(x), axis=1) == y) > 0.97
    # a strong pull keeps the start
    kept = fit_linear_head(x, y, np.ones(len(y)), start, head="softmax", l2=1e3)
    assert np.abs(kept.weight).max() < 0.01


def test_not_positive_films_lower_the_positive_probability_only() -> None:
    rng = np.random.default_rng(1)
    x, y = _blobs(rng)
    # A fourth cluster, known not to be class 0 but of no head class, sits where class 0 is:
    extra = np.array([3.0, 0.0, 0.0]) + rng.normal(scale=0.7, size=(60, 3)) + np.array([0.0, 0.0, 1.5])
    start = LinearHead(np.zeros((3, 3)), np.zeros(3))
    without = fit_linear_head(x, y, np.ones(len(y)), start, head="softmax", l2=1e-3)
    xs, ys = np.vstack([x, extra]), np.concatenate([y, np.full(60, NOT_POSITIVE)])
    with_extra = fit_linear_head(xs, ys, np.ones(len(ys)), start, head="softmax", l2=1e-3)

    def p0(head: LinearHead, feats: np.ndarray) -> np.ndarray:
        z = head.logits(feats)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True))[:, 0]

    assert p0(with_extra, extra).mean() < p0(without, extra).mean() - 0.2
    assert p0(with_extra, x[y == 0]).mean() > 0.5  # class 0 itself is still called class 0


def test_sigmoid_head_fits_one_output() -> None:
    rng = np.random.default_rng(2)
    x, y = _blobs(rng)
    target = (y == 0).astype(int)
    head = fit_linear_head(x, target, np.ones(len(y)), LinearHead(np.zeros((1, 3)), np.zeros(1)), head="sigmoid", l2=1e-4)
    assert head.weight.shape == (1, 3)
    assert np.mean((head.logits(x)[:, 0] > 0) == target.astype(bool)) > 0.97


def test_direction_projection_removes_the_differences_between_means() -> None:
    rng = np.random.default_rng(3)
    means = rng.normal(size=(3, 6))
    p = direction_projection(means)
    assert np.allclose(p, p.T)
    assert np.allclose(p @ p, p)
    projected = means @ p
    assert np.allclose(projected[1], projected[0])
    assert np.allclose(projected[2], projected[0])
    # directions orthogonal to the differences are kept
    other = np.linalg.svd((means[1:] - means[:1]))[2][-1]
    assert np.allclose(other @ p, other)


def test_a_refitted_folder_carries_the_new_head_and_the_same_backbone(tmp_path, tiny_arch: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cxr_core.inference import predict_with_features
    from cxr_core.models.loading import load_model
    from cxr_core.training.head import write_refitted_folder
    from tests.conftest import make_model_folder

    base = make_model_folder(tmp_path / "weights", tiny_arch, ("covid", "normal", "viral_pneumonia"), size=32, thresholds={"covid": 0.4})
    rng = np.random.default_rng(4)
    head = LinearHead(rng.normal(size=(3, 64)).astype(np.float32), rng.normal(size=3).astype(np.float32))
    out = tmp_path / "refitted"
    manifest = write_refitted_folder(base, out, head, version="2.0.0", temperature=1.3, threshold=0.25,
                                     training={"recipe": "test"}, training_data={"root": "x"}, metrics={})
    assert manifest.version == "2.0.0" and manifest.thresholds == {"covid": 0.25} and manifest.temperature == 1.3
    old, new = load_model(base, device="cpu"), load_model(out, device="cpu")
    batch = torch.rand(2, 3, 32, 32)
    old_logits, old_features = predict_with_features(old, batch)
    new_logits, new_features = predict_with_features(new, batch)
    assert np.allclose(old_features, new_features)  # the backbone is untouched
    assert np.allclose(new_logits.numpy(), head.logits(new_features), atol=1e-2)  # float16 storage
    assert not np.allclose(old_logits.numpy(), new_logits.numpy(), atol=1e-2)
    with pytest.raises(Exception, match="does not fit"):
        write_refitted_folder(base, tmp_path / "bad", LinearHead(np.zeros((2, 64)), np.zeros(2)), version="2.0.1", temperature=1.0,
                              threshold=0.5, training={}, training_data={}, metrics={})

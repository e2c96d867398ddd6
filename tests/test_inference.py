"""Probabilities, batching, temperature and the decision rule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.io import read_image
from cxr_core.inference import decide, logits_to_probabilities, predict
from cxr_core.models.manifest import Manifest


def images(n: int, seed: int = 0) -> list[XrayImage]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = (96 + 16 * i, 80 + 8 * i)  # different sizes: preprocessing must equalise them
        pixels = rng.random(shape, dtype=np.float32)
        out.append(read_image(_png(pixels), name=f"img{i}"))
    return out


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_probabilities_are_a_distribution(densenet) -> None:  # type: ignore[no-untyped-def]
    results = predict(densenet, images(3))
    for result in results:
        assert result.classes == ("covid", "normal", "viral_pneumonia")
        assert abs(sum(result.probabilities) - 1.0) < 1e-6
        assert all(0.0 <= p <= 1.0 for p in result.probabilities)
        assert result.model == "densenet121-test@0.0.1" and result.decision in result.classes
        assert result.predicted in (*result.classes, None)  # None: rejected (these are noise images) or uncertain


def test_batched_equals_one_by_one(densenet) -> None:  # type: ignore[no-untyped-def]
    films = images(5)
    together = predict(densenet, films, batch_size=4)
    alone = [predict(densenet, [f], batch_size=1)[0] for f in films]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_binary_head_gives_complementary_probabilities(resnet) -> None:  # type: ignore[no-untyped-def]
    result = predict(resnet, images(1))[0]
    assert result.classes == ("covid", "other")
    assert abs(result.probability("covid") + result.probability("other") - 1.0) < 1e-9


def _manifest(**fields: object) -> Manifest:
    base = Manifest(id="m", version="1", name="m", architecture="densenet121", classes=("covid", "normal", "viral_pneumonia"), head="softmax", weights_sha256="0" * 64)
    return replace(base, **fields)  # type: ignore[arg-type]


def test_temperature_softens_without_changing_the_ranking() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    sharp = logits_to_probabilities(logits, _manifest())[0]
    soft = logits_to_probabilities(logits, _manifest(temperature=2.0))[0]
    np.testing.assert_allclose(sharp, torch.softmax(logits, 1)[0].numpy(), atol=1e-9)
    np.testing.assert_allclose(soft, torch.softmax(logits / 2, 1)[0].numpy(), atol=1e-9)
    assert list(np.argsort(sharp)) == list(np.argsort(soft)) and soft.max() < sharp.max()


def test_sigmoid_probabilities() -> None:
    manifest = _manifest(classes=("covid", "other"), head="sigmoid")
    probs = logits_to_probabilities(torch.tensor([[0.0], [2.0]]), manifest)
    np.testing.assert_allclose(probs[0], [0.5, 0.5])
    np.testing.assert_allclose(probs[1], [1 / (1 + np.exp(-2)), 1 - 1 / (1 + np.exp(-2))], atol=1e-6)


@pytest.mark.parametrize(
    "probs, thresholds, expected",
    [
        ((0.2, 0.5, 0.3), {}, "normal"),  # most probable
        ((0.35, 0.6, 0.05), {"covid": 0.3}, "covid"),  # threshold reached: sensitivity first
        ((0.25, 0.3, 0.45), {"covid": 0.3}, "viral_pneumonia"),  # below threshold: best of the rest
        ((0.45, 0.1, 0.45), {"covid": 0.5}, "viral_pneumonia"),
    ],
)
def test_decision_rule(probs: tuple[float, ...], thresholds: dict, expected: str) -> None:
    assert decide(probs, _manifest(thresholds=thresholds)) == expected


def test_binary_decision_uses_threshold() -> None:
    manifest = _manifest(classes=("covid", "other"), head="sigmoid", thresholds={"covid": 0.3})
    assert decide((0.31, 0.69), manifest) == "covid"
    assert decide((0.29, 0.71), manifest) == "other"
    assert decide((0.49, 0.51), _manifest(classes=("covid", "other"), head="sigmoid")) == "other"

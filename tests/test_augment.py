"""Training augmentation: identity when off, and the sharpness range does what it says."""

from __future__ import annotations

from dataclasses import replace

import torch

from cxr_core.training.augment import AugmentConfig, augment
from cxr_core.training.config import TrainConfig


def _film(size: int = 224) -> torch.Tensor:
    """(2, 1, S, S) in [0, 1]: a soft blob with sharp bars (rib-like edges)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = 0.5 + 0.3 * torch.exp(-(x**2 + y**2) * 2)
    bars = ((torch.arange(size) // 4) % 2).float().view(-1, 1).expand(size, size) * 0.15
    img = (base + bars).clamp(0, 1)
    return torch.stack([img, img.flip(-1)]).unsqueeze(1)


def _edge_energy(batch: torch.Tensor) -> float:
    lap = batch[..., 1:-1, 2:] + batch[..., 1:-1, :-2] + batch[..., 2:, 1:-1] + batch[..., :-2, 1:-1] - 4 * batch[..., 1:-1, 1:-1]
    return float(lap.pow(2).mean())


def _only_sharpness(amount: float) -> AugmentConfig:
    return replace(AugmentConfig.none(), sharpness=amount)


def test_no_augmentation_is_the_identity() -> None:
    film = _film()
    assert torch.equal(augment(film, AugmentConfig.none(), torch.Generator().manual_seed(1)), film)


def test_sharpness_spans_blur_to_unsharp_masking() -> None:
    film = _film()
    energies = []
    for seed in range(40):
        out = augment(film, _only_sharpness(1.0), torch.Generator().manual_seed(seed))
        assert out.shape == film.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        energies.append(_edge_energy(out) / _edge_energy(film))
    # Some draws blur (edge energy down by more than half), some sharpen (up by a quarter).
    assert min(energies) < 0.5
    assert max(energies) > 1.25


def test_a_run_recorded_before_the_sharpness_augmentation_resumes_without_it() -> None:
    config = TrainConfig(data_dir="d", arch="cnn5", out="o", model_id="m", classes=("a", "b"))
    old = config.as_dict()
    del old["augment"]["sharpness"]
    assert TrainConfig.from_dict(old).augment.sharpness == 0.0
    assert TrainConfig.from_dict(config.as_dict()).augment.sharpness == 1.0

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


def _box(size: int = 224, half: int = 40) -> torch.Tensor:
    """(1, 1, S, S): a bright centred square of side 2 * ``half``."""
    img = torch.zeros(1, 1, size, size)
    c = size // 2
    img[..., c - half : c + half, c - half : c + half] = 1.0
    return img


def _extent(batch: torch.Tensor) -> tuple[int, int]:
    """Width and height, in pixels, of the bright region of a (1, 1, H, W) image."""
    mask = batch[0, 0] > 0.5
    return int(mask.any(0).sum()), int(mask.any(1).sum())


def test_aspect_augmentation_stretches_width_against_height_within_its_range() -> None:
    config = replace(AugmentConfig.none(), aspect=0.25)
    ratios = []
    for seed in range(60):
        w, h = _extent(augment(_box(), config, torch.Generator().manual_seed(seed)))
        ratios.append(w / h)
        # area roughly kept: one side grows as the other shrinks
        assert abs(w * h / 80**2 - 1) < 0.1
    assert 1 / 1.25 - 0.03 <= min(ratios) < 0.9
    assert 1.1 < max(ratios) <= 1.25 + 0.03


def test_without_aspect_the_geometry_and_random_stream_are_as_before() -> None:
    # The affine step as it was before the aspect option, written out: a run recorded
    # then (aspect 0) must replay the same augmentation when resumed.
    import math

    import torch.nn.functional as F

    film = _film()
    config = replace(AugmentConfig.none(), rotate_deg=10.0, translate=0.08, scale=(0.85, 1.35))
    g = torch.Generator().manual_seed(5)
    n = film.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    angle = uniform(-10.0, 10.0) * math.pi / 180
    zoom = uniform(0.85, 1.35)
    tx, ty = uniform(-0.08, 0.08) * 2, uniform(-0.08, 0.08) * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(film.shape), align_corners=False)
    expected = F.grid_sample(film, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    out = augment(film, config, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # and a square zoom keeps a square square
    w, h = _extent(augment(_box(), replace(AugmentConfig.none(), scale=(1.3, 1.3)), torch.Generator().manual_seed(0)))
    assert w == h and abs(w - 80 * 1.3) <= 2


def test_a_run_recorded_before_cpu_bf16_resumes_in_fp32() -> None:
    config = TrainConfig(data_dir="d", arch="cnn5", out="o", model_id="m", classes=("a", "b"))
    old = config.as_dict()
    del old["amp_cpu"]
    assert TrainConfig.from_dict(old).amp_cpu is False
    assert TrainConfig.from_dict(config.as_dict()).amp_cpu is True


def test_edge_crop_moves_each_edge_on_its_own_within_its_range() -> None:
    # A film bright on its left half and top half: after cropping the edges by (l, r, t, b)
    # and stretching back, the film's middle (u = 0.5) lands at (0.5 - l) / (1 - l - r).
    size, crop = 200, 0.2
    film = torch.zeros(1, 1, size, size)
    film[..., :, : size // 2] = 0.5
    film[..., : size // 2, :] += 0.5
    config = replace(AugmentConfig.none(), edge_crop=crop)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        for _ in range(4):  # angle, zoom, tx, ty: drawn (at their zero ranges) before the crop
            torch.rand(1, generator=g)
        left, right, top, bottom = (float(torch.rand(1, generator=g)) * crop for _ in range(4))
        out = augment(film, config, torch.Generator().manual_seed(seed))[0, 0]
        column = int((out[size * 3 // 4] > 0.25).sum())  # bottom rows: bright only on the left
        row = int((out[:, size * 3 // 4] > 0.25).sum())  # right columns: bright only on the top
        assert abs(column - size * (0.5 - left) / (1 - left - right)) <= 1.5
        assert abs(row - size * (0.5 - top) / (1 - top - bottom)) <= 1.5


def test_edge_crop_keeps_the_random_stream_of_the_other_options() -> None:
    # Runs recorded before the option (edge_crop 0) replay the same augmentation, and the
    # crop's draws come after the geometry's: a negligible crop leaves the same picture.
    film = _film()
    base = replace(AugmentConfig.none(), rotate_deg=10.0, translate=0.08, scale=(0.85, 1.35), aspect=0.2)
    plain = augment(film, base, torch.Generator().manual_seed(3))
    assert torch.equal(plain, augment(film, replace(base, edge_crop=0.0), torch.Generator().manual_seed(3)))
    tiny = augment(film, replace(base, edge_crop=1e-6), torch.Generator().manual_seed(3))
    torch.testing.assert_close(tiny, plain, atol=1e-3, rtol=0)
    assert not torch.equal(augment(film, replace(base, edge_crop=0.2), torch.Generator().manual_seed(3)), plain)


def test_acquisition_artefacts_are_drawn_from_the_generator_and_reach_every_kind() -> None:
    from cxr_core.training.augment import MAX_FRAME

    film = _film(96).repeat(16, 1, 1, 1)
    config = replace(AugmentConfig.none(), acquisition=1.0)
    out = augment(film, config, torch.Generator().manual_seed(3))
    again = augment(film, config, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and out.shape == film.shape and out.dtype == film.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    # Every film got a black frame (the synthetic film is nowhere black), at most MAX_FRAME deep.
    border_black = (out[:, 0, :, 0] == 0).float().mean(dim=1) + (out[:, 0, 0, :] == 0).float().mean(dim=1)
    assert bool((border_black > 0).any())
    centre = out[:, 0, int(96 * MAX_FRAME) + 2 : -int(96 * MAX_FRAME) - 2, int(96 * MAX_FRAME) + 2 : -int(96 * MAX_FRAME) - 2]
    assert float((centre == 0).float().mean()) < 0.1
    # CLAHE and the rest change the films beyond the frame.
    assert float((out - film).abs().mean()) > 0.02


def test_acquisition_off_keeps_the_random_stream_and_probability_zero_is_identity() -> None:
    film = _film(64)
    base = augment(film, AugmentConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(base, augment(film, replace(AugmentConfig(), acquisition=0.0), torch.Generator().manual_seed(5)))
    with_it = augment(film, replace(AugmentConfig(), acquisition=0.5), torch.Generator().manual_seed(5))
    assert not torch.equal(base, with_it)
    # The artefacts are drawn after every other option: before them, the stream is the same.
    from cxr_core.training.augment import acquire

    assert torch.equal(with_it, acquire(base, 0.5, _generator_after(film, AugmentConfig(), 5)))


def _generator_after(film: torch.Tensor, config: AugmentConfig, seed: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    augment(film, config, generator)
    return generator


def test_acquisition_without_occluders_draws_no_frame_or_box_and_keeps_the_stream() -> None:
    from cxr_core.training.augment import acquire

    film = _film(96).repeat(16, 1, 1, 1)
    with_occluders = acquire(film, 1.0, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    without = acquire(film, 1.0, generator, occluders=False)
    # The synthetic film is nowhere darker than 0.5 and CLAHE keeps it well above black: a black
    # pixel on an edge is a frame or a box.
    def black_edges(out: torch.Tensor) -> int:
        return int((out[:, 0, 0, :] == 0).sum() + (out[:, 0, -1, :] == 0).sum() + (out[:, 0, :, 0] == 0).sum())
    assert black_edges(with_occluders) > 0 and black_edges(without) == 0
    assert float((without - film).abs().mean()) > 0.02  # CLAHE, resolution and JPEG still apply
    # The same number of draws per film either way, so the stream afterwards does not depend on it.
    after = torch.Generator().manual_seed(3)
    acquire(film, 1.0, after)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=after))


def test_acquisition_positive_rate_leaves_the_positive_films_as_they_are_and_draws_the_others() -> None:
    film = _film(96).repeat(2, 1, 1, 1)
    positive = torch.tensor([True, False, False, True])
    plain = augment(film, AugmentConfig(), torch.Generator().manual_seed(7))
    config = replace(AugmentConfig(), acquisition=1.0, acquisition_positive=0.0)
    out = augment(film, config, torch.Generator().manual_seed(7), positive=positive)
    # Positive films: the rest of the augmentation, untouched by artefacts (up to 8-bit rounding).
    torch.testing.assert_close(out[positive], plain[positive], atol=0.5 / 255 + 1e-6, rtol=0)
    # The others: every artefact drawn, as with the one rate for all.
    everyone = augment(film, replace(config, acquisition_positive=None), torch.Generator().manual_seed(7), positive=positive)
    assert torch.equal(out[~positive], everyone[~positive])
    assert float((out[~positive] - plain[~positive]).abs().mean()) > 0.02
    # Without the labels there is nothing to tell the classes apart by: one rate for every film.
    assert torch.equal(augment(film, config, torch.Generator().manual_seed(7)), everyone)


def test_acquisition_positive_rate_is_recorded_and_read_back_with_the_run() -> None:
    from dataclasses import asdict

    config = TrainConfig(data_dir="d", arch="densenet121", out="o", model_id="m", augment=replace(AugmentConfig(), acquisition=0.3, acquisition_positive=0.0))
    back = TrainConfig.from_dict(asdict(config))
    assert back.augment.acquisition_positive == 0.0 and back.augment.acquisition == 0.3
    old = asdict(config)
    del old["augment"]["acquisition_positive"]  # a run recorded before the option: one rate for all
    assert TrainConfig.from_dict(old).augment.acquisition_positive is None

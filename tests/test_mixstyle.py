"""MixStyle: what it changes while training, and that it leaves inference alone."""

from __future__ import annotations

import torch

from cxr_core.models.architectures import build_network
from cxr_core.training.config import TrainConfig
from cxr_core.training.mixstyle import channel_statistics, mix_styles, mixing_styles, restyle
from cxr_core.training.trainer import mix_style_layers


def _films(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Films with very different exposure: a batch whose statistics differ a lot.
    return torch.rand(n, 3, 64, 64, generator=g) * torch.linspace(0.2, 2.0, n).view(n, 1, 1, 1)


def test_mixed_statistics_lie_between_the_two_films_and_the_content_is_kept() -> None:
    x = torch.randn(8, 4, 16, 16) * torch.arange(1, 9).view(8, 1, 1, 1).float() + torch.arange(8).view(8, 1, 1, 1).float()
    out = mix_styles(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    mu_in, mu_out = x.mean(dim=(2, 3)), out.mean(dim=(2, 3))
    lo, hi = mu_in.min(dim=0).values, mu_in.max(dim=0).values
    assert torch.all(mu_out >= lo - 1e-4) and torch.all(mu_out <= hi + 1e-4)
    assert not torch.allclose(mu_out, mu_in, atol=1e-3)  # some film took another's statistics
    # The normalised pattern (the content) of every film is unchanged.
    def z(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)
    assert torch.allclose(z(out), z(x), atol=1e-3)


def test_the_same_generator_seed_mixes_the_same_way() -> None:
    x = torch.randn(6, 3, 8, 8)
    a = mix_styles(x, torch.Generator().manual_seed(5))
    b = mix_styles(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_hooks_act_in_training_only_and_are_gone_after_the_block() -> None:
    torch.manual_seed(0)
    net = build_network("densenet121", 3)
    layers = mix_style_layers(TrainConfig(data_dir="d", arch="densenet121", out="o", model_id="m", mix_style=1.0))
    assert layers == ("backbone.denseblock1", "backbone.denseblock2")
    x = _films()
    net.eval()
    with torch.no_grad():
        plain = net(x)
        with mixing_styles(net, layers, 1.0, torch.Generator().manual_seed(0)):
            assert torch.equal(net(x), plain)  # eval mode: untouched
        net.train()
        torch.manual_seed(1)
        unmixed_train = net(x)
        with mixing_styles(net, layers, 1.0, torch.Generator().manual_seed(0)):
            torch.manual_seed(1)
            mixed_train = net(x)
        torch.manual_seed(1)
        after = net(x)
    assert not torch.allclose(mixed_train, unmixed_train, atol=1e-4)
    assert torch.equal(after, unmixed_train)  # the hooks were removed


def test_off_by_default() -> None:
    assert mix_style_layers(TrainConfig(data_dir="d", arch="resnet50", out="o", model_id="m")) == ()


def test_restyle_gives_every_film_the_statistics_asked_for_and_keeps_its_pattern() -> None:
    x = torch.randn(3, 4, 16, 16) * 3 + 2
    mean, spread = torch.arange(4.0).view(1, 4, 1, 1), torch.full((1, 4, 1, 1), 0.5)
    out = restyle(x.to(torch.bfloat16), mean, spread)
    assert out.dtype == torch.bfloat16
    mu, sigma = channel_statistics(out)
    assert torch.allclose(mu, mean.expand(3, -1, -1, -1), atol=0.05) and torch.allclose(sigma, spread.expand(3, -1, -1, -1), atol=0.02)
    per_film = restyle(x, mean.expand(3, -1, -1, -1), spread.expand(3, -1, -1, -1))  # one reference per film: the same
    assert torch.allclose(per_film, restyle(x, mean, spread))
    def z(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)
    assert torch.allclose(z(restyle(x, mean, spread)), z(x), atol=1e-3)


"""Masking schedules: alpha_t, its derivative and the quantities derived from them."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import noise_schedule
from noise_schedule import get_noise

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "noise"
NAMES = ["loglinear", "linear", "cosine", "geometric"]


def schedule(name):
    """The schedule as the configs build it (configs/noise/<name>.yaml through get_noise)."""
    return get_noise(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_the_named_class(name):
    assert isinstance(schedule(name), noise_schedule.SCHEDULES[name])


@pytest.mark.parametrize("name", NAMES)
def test_alpha_strictly_decreasing_from_one_to_zero(name):
    noise = schedule(name)
    t = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
    a = noise.alpha(t)
    assert (a.diff() < 0).all()
    assert abs(a[0].item() - 1.0) < 1e-2  # alpha_0 ~ 1
    assert a[-1].item() < 1e-2  # alpha_1 ~ 0
    assert ((a > 0) & (a <= 1)).all()


@pytest.mark.parametrize("name", NAMES)
def test_dalpha_matches_central_finite_difference(name):
    noise = schedule(name)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    fd = (noise.alpha(t + h) - noise.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(noise.dalpha(t), fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_loss_weight_is_minus_dalpha_over_mask_prob(name):
    noise = schedule(name)
    t = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    w = noise.loss_weight(t)
    h = 1e-6
    fd = (noise.alpha(t + h) - noise.alpha(t - h)) / (2 * h)  # derivative from alpha alone
    torch.testing.assert_close(w, -fd / (1.0 - noise.alpha(t)), rtol=1e-5, atol=1e-9)
    assert (w > 0).all()


def test_loglinear_loss_weight_is_one_over_t():
    for eps in (1e-3, 0.1):
        noise = noise_schedule.LogLinear(eps=eps)
        t = torch.linspace(1e-3, 1.0, 1000, dtype=torch.float64)
        torch.testing.assert_close(noise.loss_weight(t), 1.0 / t, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(noise.alpha(t), 1.0 - (1.0 - eps) * t, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_unmask_prob_is_a_probability_and_matches_posterior(name):
    noise = schedule(name)
    g = torch.Generator().manual_seed(0)
    t = 0.01 + 0.99 * torch.rand(500, generator=g, dtype=torch.float64)
    s = t * torch.rand(500, generator=g, dtype=torch.float64)  # 0 <= s < t
    p = noise.unmask_prob(t, s)
    assert ((p >= 0) & (p <= 1)).all()
    a_t, a_s = noise.alpha(t), noise.alpha(s)
    torch.testing.assert_close(p, (a_s - a_t) / (1 - a_t), rtol=1e-12, atol=1e-12)
    # Nothing is revealed when s = t.
    torch.testing.assert_close(noise.unmask_prob(t, t), torch.zeros_like(t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_unmask_prob_matches_simulated_forward_process(name):
    """Each token gets masked at a random time tau with P(tau <= t) = 1 - alpha_t.

    P(visible at s | masked at t) = P(tau > s | tau <= t) must equal unmask_prob(t, s).
    tau is drawn by inverse-CDF sampling on a fine grid.
    """
    noise = schedule(name)
    grid = torch.linspace(0.0, 1.0, 20001, dtype=torch.float64)
    cdf = 1.0 - noise.alpha(grid)  # increasing
    g = torch.Generator().manual_seed(1)
    u = torch.rand(400_000, generator=g, dtype=torch.float64) * cdf[-1]
    tau = grid[torch.searchsorted(cdf, u).clamp(max=grid.numel() - 1)]
    for t, s in [(1.0, 0.5), (0.6, 0.3), (0.3, 0.05)]:
        masked_at_t = tau <= t
        frac = (tau[masked_at_t] > s).double().mean().item()
        expected = noise.unmask_prob(torch.tensor(t, dtype=torch.float64), torch.tensor(s)).item()
        n = masked_at_t.sum().item()
        se = (expected * (1 - expected) / n) ** 0.5
        assert abs(frac - expected) < 5 * se + 1e-3, (t, s, frac, expected)


@pytest.mark.parametrize("name", NAMES)
def test_sigma_is_minus_log_alpha(name):
    noise = schedule(name)
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    torch.testing.assert_close(noise.sigma(t), -torch.log(noise.alpha(t)))
    torch.testing.assert_close(noise.mask_prob(t), 1.0 - noise.alpha(t))


def test_get_noise_passes_hyper_parameters_from_dictconfig():
    noise = get_noise(OmegaConf.create({"type": "loglinear", "eps": 0.25}))
    assert isinstance(noise, noise_schedule.LogLinear)
    assert noise.alpha(torch.tensor(1.0)).item() == pytest.approx(0.25)
    cos = get_noise(OmegaConf.create({"type": "cosine", "eps": 0.1}))
    assert isinstance(cos, noise_schedule.Cosine)
    assert cos.alpha(torch.tensor(1.0)).item() == pytest.approx(0.1)
    lin = get_noise(OmegaConf.create({"type": "linear", "sigma_min": 0.5, "sigma_max": 3.0}))
    assert lin.alpha(torch.tensor(0.0)).item() == pytest.approx(torch.exp(torch.tensor(-0.5)))
    assert lin.alpha(torch.tensor(1.0)).item() == pytest.approx(torch.exp(torch.tensor(-3.0)))
    geo = get_noise(OmegaConf.create({"type": "geometric", "sigma_min": 0.01, "sigma_max": 4.0}))
    # sigma_t = s_min^(1-t) s_max^t: geometric mean at t = 1/2.
    assert geo.sigma(torch.tensor(0.5)).item() == pytest.approx((0.01 * 4.0) ** 0.5, rel=1e-5)

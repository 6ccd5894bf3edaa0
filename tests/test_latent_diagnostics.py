"""Posterior-collapse diagnostics (evaluation/latent_diagnostics.py) on hand-built encoders, and the
training-only remedies (free bits, cyclical beta, the encoder's initial head)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from algorithms import losses
from evaluation import latent_diagnostics as ld
from models.dit import InferDIT


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def stats_of(mu, log_sigma, t=None, position_mask=None, chunks=1):
    """Run LatentStats over `chunks` batches and summarise, as validation does."""
    t = torch.rand(mu.shape[0], generator=gen(1)) if t is None else t
    s = ld.LatentStats()
    for part in range(chunks):
        rows = slice(part * mu.shape[0] // chunks, (part + 1) * mu.shape[0] // chunks)
        pm = None if position_mask is None else position_mask[rows]
        s.add(mu[rows], log_sigma[rows], t[rows], pm)
    return ld.LatentStats.summary(s.sums(), s.rows(), float(mu.shape[0]), seed=0)


# ---------------------------------------------------------------- hand-built encoders


def test_collapsed_encoder_has_no_active_unit_and_no_information():
    mu, log_sigma = torch.zeros(300, 8), torch.zeros(300, 8)  # r = prior for every input
    out = stats_of(mu, log_sigma)
    assert out["active_units"] == 0
    assert abs(out["mutual_information"]) < 1e-9  # every r(z|x_m) is the same density
    assert max(out["kl_per_dim"]) < 1e-12
    warning = ld.collapse_warning({**out, "kl_closed": 0.0})
    assert warning is not None and "collapsed" in warning and "fade_to_prior" in warning


def test_informative_encoder_counts_its_dimensions_and_reaches_log_classes():
    # 4 classes, 300 rows; dims 0 and 1 code the class (+-3), sigma 0.01: I(z; x) = log 4
    classes = torch.arange(300) % 4
    mu = torch.zeros(300, 6)
    mu[:, 0] = 3.0 * (classes % 2 * 2 - 1)
    mu[:, 1] = 3.0 * (classes // 2 * 2 - 1)
    log_sigma = torch.full((300, 6), math.log(0.01))
    log_sigma[:, 2:] = 0.0  # dims 2.. are the prior: inactive, no KL
    out = stats_of(mu, log_sigma)
    assert out["active_units"] == 2
    assert out["mutual_information"] == pytest.approx(math.log(4), abs=1e-3)
    assert out["kl_per_dim"][2:] == [0.0] * 4
    kl = sum(out["kl_per_dim"])
    assert ld.collapse_warning({**out, "kl_closed": kl}) is None


def test_kl_without_information_is_not_an_active_unit():
    # sigma < 1 but the same mean for every input: KL > 0, yet z says nothing about x
    mu, log_sigma = torch.full((200, 4), 0.7), torch.full((200, 4), math.log(0.5))
    out = stats_of(mu, log_sigma)
    assert min(out["kl_per_dim"]) > 0.3
    assert out["active_units"] == 0
    assert abs(out["mutual_information"]) < 1e-6
    assert ld.collapse_warning({**out, "kl_closed": sum(out["kl_per_dim"])}) is not None


def test_mutual_information_is_capped_by_log_rows_for_unique_codes():
    mu = torch.arange(50, dtype=torch.float64)[:, None] * 10.0  # 50 distinct, separated codes
    mi = ld.mutual_information(mu, torch.full_like(mu, -3.0), generator=gen())
    assert mi == pytest.approx(math.log(50), abs=1e-6)


def test_mutual_information_of_overlapping_gaussians_matches_closed_form():
    # two classes at +-1 with sigma 1 in one dim: I = H(z) - H(z|x), by numerical integration
    n = 4000
    mu = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)[:, None].double()
    est = ld.mutual_information(mu, torch.zeros_like(mu), generator=gen(3))
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    mix = 0.5 * (Normal(1.0, 1.0).log_prob(z).exp() + Normal(-1.0, 1.0).log_prob(z).exp())
    h_z = -(mix * mix.log()).sum() * (z[1] - z[0])
    exact = float(h_z - 0.5 * math.log(2 * math.pi * math.e))  # H(z|x) of a unit Gaussian
    assert est == pytest.approx(exact, abs=0.03)  # Monte-Carlo error ~ 0.01 at n = 4000


def test_kl_per_dim_matches_torch_distributions():
    mu = torch.randn(5, 3, generator=gen())
    log_sigma = 0.5 * torch.randn(5, 3, generator=gen(1))
    want = kl_divergence(Normal(mu.double(), log_sigma.double().exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(ld.kl_per_dim(mu, log_sigma), want)


def test_active_units_match_an_independent_variance():
    x = torch.randn(40, 5, generator=gen(), dtype=torch.float64) * torch.tensor(
        [0.01, 0.05, 0.2, 1.0, 0.0], dtype=torch.float64
    )
    n, var = ld.active_units(x.sum(0), (x**2).sum(0), 40.0)
    torch.testing.assert_close(var, x.var(0, correction=1))
    assert n == int((x.var(0) > 0.01).sum())


def test_accumulating_batches_gives_the_one_batch_numbers():
    mu = torch.randn(60, 4, generator=gen())
    log_sigma = -torch.rand(60, 4, generator=gen(1))
    one, three = stats_of(mu, log_sigma), stats_of(mu, log_sigma, chunks=3)
    for key in ("active_units", "kl_per_dim", "mu_var_per_dim", "kl_by_t"):
        assert one[key] == pytest.approx(three[key]), key
    assert one["mutual_information"] == pytest.approx(three["mutual_information"], abs=1e-6)


def test_kl_by_t_puts_each_row_in_its_bin():
    mu = torch.zeros(4, 2)
    mu[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # KL = mu^2 / 2 per row
    t = torch.tensor([0.05, 0.07, 0.55, 0.999])
    out = stats_of(mu, torch.zeros(4, 2), t=t)
    assert out["kl_by_t"]["0.0-0.1"] == pytest.approx((0.5 + 2.0) / 2)
    assert out["kl_by_t"]["0.5-0.6"] == pytest.approx(4.5)
    assert out["kl_by_t"]["0.9-1.0"] == pytest.approx(8.0)
    assert out["kl_by_t"]["0.2-0.3"] is None


def test_per_position_latents_ignore_padding():
    mu = torch.zeros(6, 3, 2)
    mu[:, 2] = torch.arange(6, dtype=torch.float32)[:, None] * 5.0  # only at a padded position
    mask = torch.tensor([[True, True, False]] * 6)
    out = stats_of(mu, torch.zeros(6, 3, 2), position_mask=mask)
    assert max(out["kl_per_dim"]) == 0.0
    assert out["active_units"] == 0
    assert abs(out["mutual_information"]) < 1e-9
    unmasked = stats_of(mu, torch.zeros(6, 3, 2))
    assert unmasked["active_units"] == 2  # the same latents counted with the padding: active


# ---------------------------------------------------------------- remedies


def test_free_bits_penalty_values():
    kl = torch.tensor([[0.1, 0.5, 0.0, 2.0]])
    lam = torch.tensor([2.0])
    got = losses.free_bits_penalty(kl, lam, free_bits=0.3, group=1)
    assert float(got) == pytest.approx(2.0 * ((0.3 - 0.1) + 0.0 + 0.3 + 0.0))
    grouped = losses.free_bits_penalty(kl, lam, free_bits=0.5, group=2)  # groups 0.6, 2.0 vs 1.0
    assert float(grouped) == pytest.approx(2.0 * 0.4)
    whole = losses.free_bits_penalty(kl, lam, free_bits=1.0, group=4)  # 2.6 < 4
    assert float(whole) == pytest.approx(2.0 * (4.0 - 2.6))
    with pytest.raises(ValueError, match="does not divide"):
        losses.free_bits_penalty(kl, lam, free_bits=0.5, group=3)


def test_free_bits_cancels_the_kl_gradient_below_the_floor_only():
    mu = torch.tensor([[0.1, 2.0]], requires_grad=True)
    log_sigma = torch.tensor([[-0.05, -0.5]], requires_grad=True)
    lam = torch.tensor([3.0])
    kl = losses.kl_closed_per_dim(mu, log_sigma)  # dim 0 ~0.01 nats, dim 1 ~2.6 nats
    total = (lam[:, None] * kl).sum() + losses.free_bits_penalty(kl, lam, 0.5)
    g_mu, g_ls = torch.autograd.grad(total, (mu, log_sigma))
    assert g_mu[0, 0] == 0.0 and g_ls[0, 0] == 0.0  # below the floor: no KL pull
    assert float(g_mu[0, 1]) == pytest.approx(3.0 * 2.0)  # above: d(lam mu^2/2)/dmu = lam mu
    assert float(g_ls[0, 1]) == pytest.approx(3.0 * (math.exp(-1.0) - 1.0), rel=1e-5)


def test_free_bits_floor_is_on_the_weighted_batch_mean():
    """A heavily weighted row above the floor does not pull the others down: while the
    weighted mean is below the floor every row's KL gradient is cancelled."""
    mu = torch.tensor([[1.5], [0.1], [0.2]], requires_grad=True)  # KL 1.125, 0.005, 0.02
    log_sigma = torch.zeros(3, 1, requires_grad=True)
    lam = torch.tensor([10.0, 1.0, 1.0])  # weighted mean KL = (11.25 + 0.025) / 12 = 0.94
    kl = losses.kl_closed_per_dim(mu, log_sigma)
    penalty = losses.free_bits_penalty(kl, lam, free_bits=1.0)
    assert penalty.tolist() == pytest.approx((lam * (1.0 - (11.25 + 0.025) / 12)).tolist())
    total = (lam[:, None] * kl).sum() + penalty.sum()
    (g_mu,) = torch.autograd.grad(total, mu)
    assert g_mu.abs().max() < 1e-6
    above = losses.free_bits_penalty(kl, lam, free_bits=0.5)  # mean 0.94 > 0.5: no term
    assert above.abs().max() == 0.0


def cyclical_reference(step, init, interval, cycles, ramp):
    """Fu et al.'s schedule written out independently."""
    if step >= cycles * interval:
        return 1.0
    tau = (step % interval) / interval
    return 1.0 if tau > ramp else init + (1 - init) * tau / ramp


@pytest.mark.parametrize("init", [0.0, 0.2])
def test_cyclical_beta_follows_fu_et_al(init):
    for step in range(0, 1300, 7):
        got = losses.kl_beta(step, "cyclical", init, 300, cycles=4, ramp=0.5)
        assert got == pytest.approx(min(1.0, cyclical_reference(step, init, 300, 4, 0.5)))
    assert losses.kl_beta(0, "cyclical", init, 300, cycles=4, ramp=0.5) == init
    assert losses.kl_beta(300, "cyclical", init, 300, cycles=4, ramp=0.5) == init  # restart
    assert losses.kl_beta(149, "cyclical", 0.0, 300, cycles=4, ramp=0.5) < 1.0
    assert losses.kl_beta(160, "cyclical", 0.0, 300, cycles=4, ramp=0.5) == 1.0


@pytest.mark.parametrize("mu_std,log_sigma", [(0.0, 0.0), (0.0, -2.0), (0.3, -1.0)])
def test_encoder_head_initialisation(encoder_cfg, vocab, mu_std, log_sigma):
    torch.manual_seed(0)
    cfg = encoder_cfg(mu_init_std=mu_std, init_log_sigma=log_sigma)
    enc = InferDIT(cfg, 4, True, vocab + 1, "auto").eval()
    x0 = torch.randint(0, vocab, (16, 8), generator=gen())
    mu, ls = enc(x0, torch.zeros_like(x0, dtype=torch.bool), torch.zeros(16))
    torch.testing.assert_close(ls, torch.full_like(ls, log_sigma))
    if mu_std == 0:
        assert mu.abs().max() == 0.0  # the prior's mean for every input
    else:
        assert mu.std(0).min() > 0.01  # the mean already differs between inputs


def test_fade_posterior_ends_at_the_encoder_and_at_the_prior():
    mu, log_sigma = torch.randn(4, 3, generator=gen()), -torch.rand(4, 3, generator=gen(1))
    same = losses.fade_posterior(mu, log_sigma, torch.ones(4))
    torch.testing.assert_close(same[0], mu)
    torch.testing.assert_close(same[1], log_sigma)
    prior = losses.fade_posterior(mu, log_sigma, torch.zeros(4))
    assert prior[0].abs().max() == 0.0 and prior[1].abs().max() == 0.0


def test_faded_kl_is_at_most_p_times_the_kl():
    mu = 2 * torch.randn(64, 5, generator=gen(), dtype=torch.float64)
    log_sigma = torch.randn(64, 5, generator=gen(1), dtype=torch.float64)
    p = torch.rand(64, generator=gen(2), dtype=torch.float64)
    faded = losses.kl_closed_per_dim(*losses.fade_posterior(mu, log_sigma, p))
    full = losses.kl_closed_per_dim(mu, log_sigma)
    assert (faded <= p[:, None] * full + 1e-12).all()
    unit = losses.kl_closed_per_dim(*losses.fade_posterior(mu, torch.zeros_like(mu), p))
    torch.testing.assert_close(unit, p[:, None] * 0.5 * mu**2)  # mean part: exactly p x


def test_time_weighted_faded_kl_integrates_to_the_kl_once():
    """With the loglinear schedule, w(t) p_t = 1 - eps: int_eps^1 w(t) KL(r_t) dt <= KL(r),
    where an unfaded posterior pays KL(r) int w(t) dt ~ log(1 / eps) times."""
    from noise_schedule import LogLinear

    noise = LogLinear()
    t = torch.linspace(1e-3, 1.0, 200001, dtype=torch.float64)
    mu, log_sigma = torch.tensor([[1.3]], dtype=torch.float64), torch.tensor([[-0.7]])
    kl = float(losses.kl_closed_per_dim(mu, log_sigma.double()))
    r_t = losses.fade_posterior(mu.expand(len(t), 1), log_sigma.double().expand(len(t), 1),
                                noise.mask_prob(t))  # fmt: skip
    weighted = noise.loss_weight(t) * losses.kl_closed_per_dim(*r_t)[:, 0]
    integral = float(torch.trapezoid(weighted, t))
    assert integral <= kl
    assert integral >= 0.5 * 1.3**2 * (1 - 1e-3) * 0.99  # at least its mean part
    unfaded = kl * float(torch.trapezoid(noise.loss_weight(t), t))
    assert unfaded > 6 * kl

"""The maths of the objectives (losses.py), checked against independent derivations."""

import math

import pytest
import torch
import torch.nn.functional as F

from algorithms import losses
from noise_schedule import Cosine, LogLinear


def normal_logpdf(x, mean, std):
    log_std = torch.log(torch.as_tensor(std, dtype=torch.float64))
    return -0.5 * ((x - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------- sample_t


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("micro,n_micro", [(4, 3), (1, 5), (8, 1)])
def test_antithetic_t_is_stratified_over_the_global_batch(seed, micro, n_micro):
    eps, global_n = 1e-3, micro * n_micro
    parts = []
    for j in range(n_micro):  # every rank / accumulation step seeds the generator alike
        g = torch.Generator().manual_seed(seed)
        parts.append(
            losses.sample_t(
                micro, eps=eps, antithetic=True, generator=g, offset=j * micro, global_n=global_n
            )
        )
    t = torch.cat(parts).double()
    assert t.shape == (global_n,)
    assert ((t >= eps) & (t <= 1.0)).all()
    width = (1.0 - eps) / global_n
    strata = torch.floor((t - eps) / width).long().clamp(max=global_n - 1)
    assert sorted(strata.tolist()) == list(range(global_n))  # exactly one t per stratum


def test_antithetic_micro_batches_differ_without_offsets():
    """Sanity of the test above: without offsets the micro-batches would collide."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = losses.sample_t(4, eps=1e-3, antithetic=True, generator=g1, offset=0, global_n=8)
    b = losses.sample_t(4, eps=1e-3, antithetic=True, generator=g2, offset=4, global_n=8)
    assert not torch.isclose(a[:, None], b[None, :]).any()


def test_plain_t_of_the_micro_batches_and_ranks_are_the_global_draw_sliced():
    """antithetic_sampling=False: every micro-batch / rank draws from the same seed, so
    each takes its slice of one global draw (the same n values everywhere before)."""
    parts = [
        losses.sample_t(4, eps=0.0, antithetic=False, generator=torch.Generator().manual_seed(5),
                        offset=k * 4, global_n=12)
        for k in range(3)
    ]  # fmt: skip
    whole = losses.sample_t(
        12, eps=0.0, antithetic=False, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[0], parts[1])


def test_plain_t_in_range_and_roughly_uniform():
    g = torch.Generator().manual_seed(0)
    eps = 0.1
    t = losses.sample_t(20000, eps=eps, antithetic=False, generator=g).double()
    assert ((t >= eps) & (t <= 1.0)).all()
    # Mean of U[eps, 1] is (1 + eps) / 2; standard error ~ 0.26 / sqrt(20000) = 0.0018.
    assert abs(t.mean().item() - (1 + eps) / 2) < 0.01


# ------------------------------------------------------------------------- discretize_t


@pytest.mark.parametrize("T", [1, 4, 10])
def test_discretize_t_maps_onto_the_grid(T):
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.rand(1000, generator=g).clamp_min(1e-6), torch.tensor([1.0])])
    d = losses.discretize_t(t, T)
    k = d * T
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-5)  # on the grid
    assert ((k.round() >= 1) & (k.round() <= T)).all()  # {1/T, ..., 1}
    assert (d >= t - 1e-7).all() and (d - t < 1.0 / T + 1e-6).all()  # step covers (d-1/T, d]
    assert d[-1].item() == 1.0


def test_discretize_t_on_exact_grid_points():
    t = torch.tensor([0.25, 0.5, 0.75, 1.0, 0.2500001, 0.001])
    expected = torch.tensor([0.25, 0.5, 0.75, 1.0, 0.5, 0.25])
    assert torch.equal(losses.discretize_t(t, 4), expected)


# --------------------------------------------------------------------------------- KL


def test_kl_one_sample_is_log_r_minus_log_prior():
    torch.manual_seed(0)
    B, K, d = 3, 5, 4
    mu, log_sigma = torch.randn(B, d, dtype=torch.float64), 0.5 * torch.randn(B, d).double()
    z, eps = losses.reparameterize(mu, log_sigma, K)
    assert z.shape == (B, K, d)
    torch.testing.assert_close(z, mu[:, None] + log_sigma.exp()[:, None] * eps)
    log_r = normal_logpdf(z, mu[:, None], log_sigma.exp()[:, None]).sum(-1)
    log_p = normal_logpdf(z, 0.0, 1.0).sum(-1)
    torch.testing.assert_close(losses.kl_one_sample(z, eps, log_sigma), log_r - log_p)


def test_kl_one_sample_averages_to_closed_form():
    """Mean over 200k draws within 5 standard errors (+1e-3) of KL(N(mu, s^2) || N(0, I))."""
    torch.manual_seed(0)
    B, K, d = 4, 200_000, 3
    mu = torch.randn(B, d, dtype=torch.float64)
    log_sigma = 0.4 * torch.randn(B, d, dtype=torch.float64)
    z, eps = losses.reparameterize(mu, log_sigma, K)
    kl = losses.kl_one_sample(z, eps, log_sigma)  # (B, K)
    closed = losses.kl_closed_form(mu, log_sigma)
    se = kl.std(1) / math.sqrt(K)
    assert ((kl.mean(1) - closed).abs() < 5 * se + 1e-3).all(), (kl.mean(1), closed)
    # Closed form checked independently with torch.distributions.
    q = torch.distributions.Normal(mu, log_sigma.exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(closed, torch.distributions.kl_divergence(q, p).sum(-1))


def test_kl_one_sample_per_position_latents_sum_over_positions():
    torch.manual_seed(1)
    B, K, L, d = 2, 3, 5, 2
    mu, log_sigma = torch.randn(B, L, d).double(), 0.3 * torch.randn(B, L, d).double()
    z, eps = losses.reparameterize(mu, log_sigma, K)
    assert z.shape == (B, K, L, d)
    log_r = normal_logpdf(z, mu[:, None], log_sigma.exp()[:, None]).sum((-1, -2))
    log_p = normal_logpdf(z, 0.0, 1.0).sum((-1, -2))
    torch.testing.assert_close(losses.kl_one_sample(z, eps, log_sigma), log_r - log_p)


# ------------------------------------------------------------------------- KL annealing


def test_kl_beta_linear_warmup_then_one():
    init, interval = 0.2, 100
    betas = [losses.kl_beta(s, "klweight", init, interval) for s in range(0, 301)]
    assert betas[0] == pytest.approx(init)
    assert betas[50] == pytest.approx(init + (1 - init) * 0.5)
    assert betas[100] == pytest.approx(1.0)
    diffs = [betas[i + 1] - betas[i] for i in range(100)]
    assert all(dd == pytest.approx((1 - init) / interval) for dd in diffs)  # linear
    assert all(b == 1.0 for b in betas[100:])  # capped at exactly 1


def test_kl_beta_none_is_one():
    for step in (0, 1, 10, 10_000):
        assert losses.kl_beta(step, "none", 0.0, 1000) == 1.0


# ------------------------------------------------------------------------------- IWAE


def test_iwae_k1_is_the_delbo():
    torch.manual_seed(0)
    B = 6
    recon = -5 * torch.rand(B, 1, dtype=torch.float64)
    kl = torch.randn(B, 1, dtype=torch.float64)
    lam_rec = 0.5 + torch.rand(B, dtype=torch.float64)
    lam_kl = 0.5 + torch.rand(B, dtype=torch.float64)
    for beta in (1.0, 0.3):
        got = losses.iwae_delbo(recon, kl, lam_rec, lam_kl, beta)
        expected = lam_rec * (-recon[:, 0]) + lam_kl * beta * kl[:, 0]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Exactly representable weights: bit-exact.
    lam = torch.full((B,), 2.0, dtype=torch.float64)
    got = losses.iwae_delbo(recon, kl, lam, lam, 1.0)
    assert torch.equal(got, 2.0 * (-recon[:, 0]) + 2.0 * kl[:, 0])


def test_iwae_identical_particles_equal_single_particle():
    torch.manual_seed(0)
    recon, kl = -3 * torch.rand(4, 1), torch.randn(4, 1)
    lam = torch.tensor([1.0, 2.0, 3.0, 0.5])
    one = losses.iwae_delbo(recon, kl, lam, lam)
    many = losses.iwae_delbo(recon.expand(4, 8), kl.expand(4, 8), lam, lam)
    torch.testing.assert_close(one, many)


def test_iwae_is_numerically_stable_for_large_log_weights():
    recon = torch.tensor([[-2000.0, -2001.0, -5000.0]])
    kl = torch.zeros(1, 3)
    one = torch.ones(1)
    loss = losses.iwae_delbo(recon, kl, one, one)
    expected = -(2000.0 - math.log(1 + math.exp(-1.0)) + math.log(3.0))
    assert torch.isfinite(loss).all()
    assert loss.item() == pytest.approx(-expected, rel=1e-6)


def test_iwae_bound_tightens_with_particles_on_linear_gaussian():
    """p(z) = N(0,1), p(x|z) = N(x; z, 1) so log p(x) = log N(x; 0, 2).

    Deliberately imperfect r(z|x) = N(0.2 x, 0.6^2) (the posterior is N(x/2, 1/2)).
    -loss is the IWAE bound; its mean over many draws must increase with K and stay
    below log p(x). Gaps: K=1 ~ KL(r || posterior) = 0.33 nats; standard errors ~ 0.003.
    """
    torch.manual_seed(0)
    x, draws = 1.5, 40_000
    mu = torch.full((draws, 1), 0.2 * x, dtype=torch.float64)
    log_sigma = torch.full((draws, 1), math.log(0.6), dtype=torch.float64)
    one = torch.ones(draws, dtype=torch.float64)
    means = {}
    for K in (1, 4, 16):
        z, eps = losses.reparameterize(mu, log_sigma, K)  # (draws, K, 1)
        recon = normal_logpdf(torch.tensor(x), z, 1.0).sum(-1)  # log p(x | z_k)
        kl = losses.kl_one_sample(z, eps, log_sigma)  # log r - log p(z)
        bound = -losses.iwae_delbo(recon, kl, one, one)
        means[K] = bound.mean().item()
        if K == 1:  # analytic ELBO: E_r[log p(x|z)] - KL(r || p)
            m, s = 0.2 * x, 0.6
            elbo = (-0.5 * math.log(2 * math.pi) - 0.5 * ((x - m) ** 2 + s**2)) - (
                0.5 * (m**2 + s**2 - 1 - 2 * math.log(s))
            )
            se = bound.std().item() / math.sqrt(draws)
            assert abs(means[1] - elbo) < 5 * se
    log_px = normal_logpdf(x, 0.0, math.sqrt(2.0))
    assert means[1] + 0.05 < means[4] < means[16] < log_px, (means, log_px)
    assert log_px - means[16] < log_px - means[1]


# ---------------------------------------------------------------------------- weights


def test_steps_weighting_t1_is_a_plain_vae_elbo():
    noise = LogLinear()
    t = losses.discretize_t(torch.tensor([0.3, 0.9, 1.0]), 1)
    assert torch.equal(t, torch.ones(3))
    lam_rec, lam_kl = losses.loss_weights(t, noise, "steps", 1)
    assert torch.equal(lam_rec, torch.ones(3))
    assert torch.equal(lam_kl, torch.ones(3))
    recon, kl = torch.tensor([[-3.0], [-1.0], [-7.5]]), torch.tensor([[0.5], [2.0], [0.25]])
    loss = losses.iwae_delbo(recon, kl, lam_rec, lam_kl, 1.0)
    assert torch.equal(loss, -recon[:, 0] + kl[:, 0])  # recon + KL exactly


@pytest.mark.parametrize("noise", [LogLinear(), Cosine()])
def test_steps_weighting_general_T(noise):
    T = 4
    t = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    lam_rec, lam_kl = losses.loss_weights(t, noise, "steps", T)
    s = t - 1.0 / T
    expected = T * (noise.alpha(s) - noise.alpha(t)) / (1 - noise.alpha(t))
    torch.testing.assert_close(lam_rec, expected)
    assert lam_rec[0].item() == pytest.approx(T)  # last step reveals everything
    assert torch.equal(lam_kl, torch.full_like(t, float(T)))


@pytest.mark.parametrize("noise", [LogLinear(), Cosine()])
@pytest.mark.parametrize("T", [0, 1, 4])
def test_once_weighting_is_mdlm_reconstruction_plus_one_kl(noise, T):
    """kl_weighting=once: E_t[lam_rec (-recon)] is the MDLM NELBO given z (the same weights
    as MDLM's, continuous or T steps) and the KL counts once per sequence, whatever t."""
    t = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    if T:
        t = losses.discretize_t(t, T)
    lam_rec, lam_kl = losses.loss_weights(t, noise, "once", T)
    torch.testing.assert_close(lam_rec, _mdlm_weight64(noise, t, T))
    assert torch.equal(lam_kl, torch.ones_like(t))
    recon, kl = torch.tensor([[-3.0], [-1.0], [-7.5], [-2.0]]), torch.full((4, 1), 0.5)
    loss = losses.iwae_delbo(recon.double(), kl.double(), lam_rec, lam_kl, 1.0)
    torch.testing.assert_close(loss, -lam_rec * recon[:, 0].double() + 0.5)


def _mdlm_weight64(noise, t: torch.Tensor, T: int) -> torch.Tensor:
    """MDLM's reconstruction weight in closed form (float64), for LogLinear / Cosine (eps
    1e-3). T = 0: w(t) = -alpha'_t / (1 - alpha_t), i.e. 1 / t for loglinear and, for
    cosine, (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) = (pi/2) cot(pi t/4) (eps cancels).
    T > 0: T (alpha_s - alpha_t) / (1 - alpha_t) with s = t - 1/T, and T at s <= 0."""
    name = "loglinear" if isinstance(noise, LogLinear) else "cosine"
    if T == 0:
        return 1.0 / t if name == "loglinear" else (math.pi / 2) / torch.tan(math.pi * t / 4)
    s = t - 1.0 / T
    a_t, a_s = _alpha64(name, t), _alpha64(name, s.clamp_min(0.0))
    return torch.where(s <= 0, float(T), T * (a_s - a_t) / (1 - a_t))


@pytest.mark.parametrize("noise", [LogLinear(), Cosine()])
def test_time_weighting_is_the_continuous_weight(noise):
    t = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    lam_rec, lam_kl = losses.loss_weights(t, noise, "time", 0)
    torch.testing.assert_close(lam_rec, _mdlm_weight64(noise, t, 0))
    torch.testing.assert_close(lam_kl, _mdlm_weight64(noise, t, 0))


# ----------------------------------------------------------------- SUBS log-likelihood


def test_masked_token_logp_ignores_mask_and_padding_logits():
    torch.manual_seed(0)
    N, V, extra = 10, 6, 3
    logits = torch.randn(N, V + extra)
    targets = torch.randint(0, V, (N,))
    got = losses.masked_token_logp(logits, targets, V)
    expected = torch.log_softmax(logits[:, :V], -1)[torch.arange(N), targets]
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32
    huge = logits.clone()
    huge[:, V:] = 1e4  # the [MASK] / padding logits must not compete
    torch.testing.assert_close(losses.masked_token_logp(huge, targets, V), expected)
    bf = losses.masked_token_logp(logits.bfloat16(), targets, V)
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, expected, rtol=0.05, atol=0.05)


def test_uniform_prediction_gives_log_v_per_token():
    """Spec sanity invariant: uniform predictions over V tokens cost log V per token."""
    V = 50
    logits = torch.zeros(7, V + 1)
    logits[:, V] = 3.0  # mask logit
    logp = losses.masked_token_logp(logits, torch.randint(0, V, (7,)), V)
    torch.testing.assert_close(logp, torch.full((7,), -math.log(V)))


def test_scatter_rows_and_mask_tokens():
    mask = torch.tensor([[True, False, True], [False, False, True]])
    out = losses.scatter_rows(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
    torch.manual_seed(0)
    x0 = torch.randint(0, 5, (4, 5000))
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    noise = LogLinear()
    xt = losses.mask_tokens(x0, t, noise, mask_id=5)
    masked = xt == 5
    assert torch.equal(xt[~masked], x0[~masked])
    frac = masked.double().mean(1)
    # Binomial standard error <= 0.5 / sqrt(5000) = 0.007.
    torch.testing.assert_close(frac, noise.mask_prob(t).double(), rtol=0, atol=0.035)


def test_masked_token_logp_gradient_flows_only_to_real_logits():
    logits = torch.randn(4, 6, requires_grad=True)
    losses.masked_token_logp(logits, torch.tensor([0, 1, 2, 3]), 5).sum().backward()
    assert torch.equal(logits.grad[:, 5], torch.zeros(4))
    expected = F.one_hot(torch.tensor([0, 1, 2, 3]), 5) - torch.softmax(logits[:, :5], -1)
    torch.testing.assert_close(logits.grad[:, :5], expected.detach())


def test_antithetic_t_follows_its_documented_formula():
    """Sample i of the global batch gets eps + (1 - eps) ((u + i / N) mod 1) with one shared
    u ~ U[0, 1) in float64 (u - i / N would give the same strata, another assignment)."""
    t = losses.sample_t(4, eps=0.1, antithetic=True, generator=torch.Generator().manual_seed(3),
                        offset=2, global_n=8)  # fmt: skip
    u = torch.rand(1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = 0.1 + 0.9 * torch.remainder(u + torch.arange(2, 6, dtype=torch.float64) / 8, 1.0)
    torch.testing.assert_close(t, expected.float(), rtol=0, atol=0)
    iid = losses.sample_t(3, eps=0.0, antithetic=False, offset=1, global_n=5,
                          generator=torch.Generator().manual_seed(4))  # fmt: skip
    draws = torch.rand(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(iid, draws[1:4].float(), rtol=0, atol=0)  # this slice's draws


def _alpha64(name: str, t: torch.Tensor) -> torch.Tensor:
    """The schedules' alpha_t written out again in float64 (noise_schedule.py's docstrings)."""
    if name == "loglinear":
        return 1 - (1 - 1e-3) * t
    if name == "linear":
        return torch.exp(-(1e-3 + t * (7.0 - 1e-3)))
    if name == "cosine":
        return 1e-3 + (1 - 1e-3) * torch.cos(math.pi * t / 2)
    return torch.exp(-(1e-4 ** (1 - t)) * 20.0**t)  # geometric


@pytest.mark.parametrize("name", ["loglinear", "linear", "cosine", "geometric"])
@pytest.mark.parametrize("steps", [0, 1, 4])
def test_loss_weights_of_every_schedule_against_an_independent_computation(name, steps):
    """T = 0: w(t) = -alpha'(t) / (1 - alpha_t); T > 0 (kl_weighting=time or steps): the
    T-step weight T (alpha_s - alpha_t) / (1 - alpha_t) with s = t - 1/T, and T at the last
    step (s <= 0: alpha_0 counts as 1); the KL weight: w (time), T (steps), 1 (once)."""
    from noise_schedule import SCHEDULES

    noise = SCHEDULES[name]()
    t = torch.tensor([0.05, 0.25, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    if steps == 0:
        grad_t = t.clone().requires_grad_(True)
        (dalpha,) = torch.autograd.grad(_alpha64(name, grad_t).sum(), grad_t)
        expected = -dalpha / (1 - _alpha64(name, t))
    else:
        s = t - 1.0 / steps
        a_t, a_s = _alpha64(name, t), _alpha64(name, s.clamp_min(0.0))
        expected = torch.where(s <= 0, float(steps), steps * (a_s - a_t) / (1 - a_t))
    for weighting, kl in (("time", expected), ("once", torch.ones_like(t))):
        lam_rec, lam_kl = losses.loss_weights(t.float(), noise, weighting, steps)
        torch.testing.assert_close(lam_rec.double(), expected, rtol=2e-4, atol=1e-5)
        torch.testing.assert_close(lam_kl.double(), kl, rtol=2e-4, atol=1e-5)
    if steps:
        lam_rec, lam_kl = losses.loss_weights(t.float(), noise, "steps", steps)
        torch.testing.assert_close(lam_rec.double(), expected, rtol=2e-4, atol=1e-5)
        assert (lam_kl == steps).all()


def test_kl_beta_holds_then_ramps():
    """hold: beta = init for the first `hold` steps, then the schedule from its start."""
    init, hold, interval = 0.2, 5, 10
    for step in range(30):
        ramp = max(0, step - hold)
        expected = min(1.0, init + (1 - init) * ramp / interval)
        got = losses.kl_beta(step, "klweight", init, interval, hold=hold)
        assert got == pytest.approx(expected)
    assert losses.kl_beta(3, "none", 0.0, 10, hold=5) == 1.0
    # cyclical: the cycles start after the hold
    cyc = [losses.kl_beta(s, "cyclical", 0.0, 10, cycles=2, ramp=0.5, hold=4) for s in range(30)]
    assert cyc[:5] == [0.0] * 5 and cyc[9] == 1.0 and cyc[14] == 0.0 and cyc[24:] == [1.0] * 6


def test_kl_beta_edges_and_defaults():
    """interval 0: no annealing (beta = 1); interval 1: init at step 0, then 1; the cycle
    ramp never shorter than one step; defaults (one cycle, ramp 1) anneal like klweight."""
    assert losses.kl_beta(0, "klweight", 0.0, 0) == 1.0
    assert [losses.kl_beta(s, "klweight", 0.0, 1) for s in (0, 1, 2)] == [0.0, 1.0, 1.0]
    # interval 2, ramp 0.5: a 1-step ramp (max(1, 0.5 * 2)) -> beta 0 then 1 in each cycle
    assert [losses.kl_beta(s, "cyclical", 0.0, 2, cycles=2, ramp=0.5) for s in range(5)] == [
        0.0, 1.0, 0.0, 1.0, 1.0,
    ]  # fmt: skip
    # interval 4, ramp 0.1: max(1, 0.4) = a 1-step ramp, not 0.4 steps
    assert losses.kl_beta(1, "cyclical", 0.0, 4, cycles=1, ramp=0.1) == 1.0
    assert losses.kl_beta(1, "cyclical", 0.0, 3, cycles=1, ramp=0.5) == pytest.approx(1 / 1.5)
    default = [losses.kl_beta(s, "cyclical", 0.2, 10) for s in range(12)]
    assert default == [losses.kl_beta(s, "klweight", 0.2, 10) for s in range(12)]


def test_ar_loss_is_the_next_token_nll_of_real_tokens_against_a_float64_reference():
    """objectives.ar_loss on a padded batch: -sum_i log p(x_i | x_<i) over the real targets
    i >= 1 (the first token is given), with only the first V logits in the softmax, and
    the count of those targets; here against a float64 loop over rows and positions."""
    from algorithms import objectives

    V, V_out, B, L = 5, 8, 3, 6  # V_out > V: the [MASK] and padding ids never compete
    torch.manual_seed(0)
    table = torch.randn(V_out, V_out, dtype=torch.float64)  # logits of the next token

    def net(inputs, out_mask):  # a bigram model: logits depend on the previous token
        return table[inputs][out_mask].float()

    x0 = torch.randint(0, V, (B, L))
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, 4:] = False  # row 1 ends with two padding positions
    key_mask[2, 2:] = False
    x0[~key_mask] = V + 1  # a padding id
    spec = objectives.DiffusionSpec(noise=LogLinear(), mask_id=V, vocab_size=V)
    out = objectives.ar_loss(net, x0, key_mask, spec)
    want, count = torch.zeros(B, dtype=torch.float64), 0
    for b in range(B):
        for i in range(1, L):
            if key_mask[b, i]:
                logp = table[x0[b, i - 1], :V].log_softmax(-1)[x0[b, i]]
                want[b] -= logp
                count += 1
    torch.testing.assert_close(out.per_seq.double(), want, rtol=1e-5, atol=1e-5)
    assert int(out.num_tokens) == count == 5 + 3 + 1
    no_padding = objectives.ar_loss(net, x0[:1], None, spec)
    torch.testing.assert_close(no_padding.per_seq.double(), want[:1], rtol=1e-5, atol=1e-5)
    assert int(no_padding.num_tokens) == L - 1


class BigramNet:
    """A test backbone: the logits of a position are table[token there] + shift(z), and
    every call is recorded (what it was given is what the objective passed)."""

    def __init__(self, v_out: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(v_out, v_out, generator=g, dtype=torch.float64)
        self.w = torch.randn(v_out, generator=g, dtype=torch.float64)
        self.calls = []

    def logits(self, xt, z=None):  # (B, L, V_out) float64
        out = self.table[xt]
        if z is not None:
            out = out + z.double().flatten(1).sum(-1)[:, None, None] * self.w
        return out

    def __call__(self, xt, sigma, key_mask=None, out_mask=None, z=None):
        self.calls.append(
            {"xt": xt.clone(), "key_mask": key_mask, "z": z, "out_mask": out_mask, "sigma": sigma}
        )
        return self.logits(xt, z)[out_mask].float()


def padded_batch(V: int, B: int = 4, L: int = 6):
    torch.manual_seed(3)
    x0 = torch.randint(0, V, (B, L))
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, 3:] = key_mask[3, 5:] = False
    x0[~key_mask] = V + 1  # the padding id
    return x0, key_mask, torch.tensor([0.9, 0.6, 0.95, 0.8])


def reference_nll(net, x0, xt, mask_id, V, z=None) -> torch.Tensor:
    """sum over masked positions of -log p(x0 | xt, z), the softmax over the V real ids: (B,)."""
    logp = net.logits(xt, z)[..., :V].log_softmax(-1)
    picked = logp.gather(-1, x0.clamp_max(V - 1)[..., None])[..., 0]
    return -(picked * (xt == mask_id)).sum(-1)


def test_mdlm_loss_and_the_prior_nelbo_against_a_float64_reference():
    """mdlm_loss and vae_prior_nelbo (the decoder's NELBO with z ~ N(0, I)) on a padded
    batch: padding is never masked and reaches the network as key_mask, z has the latent's
    shape, per_seq = (1/t) * NLL of the masked tokens (log-linear, T = 0), the token count
    is the real tokens', and MDLM's logged `recon` is that NLL (a positive number)."""
    from algorithms import objectives

    V = 5
    x0, key_mask, t = padded_batch(V)
    spec = objectives.DiffusionSpec(noise=LogLinear(), mask_id=V, vocab_size=V)
    for name in ("mdlm", "prior"):
        net = BigramNet(V + 2)
        if name == "mdlm":
            out = objectives.mdlm_loss(net, x0, key_mask, t, spec)
        else:
            out = objectives.vae_prior_nelbo(net, x0, key_mask, t, spec, (3,))
        (call,) = net.calls
        xt, z = call["xt"], call["z"]
        assert call["key_mask"] is key_mask
        assert torch.equal(xt[~key_mask], x0[~key_mask]), "padding is never masked"
        assert (xt == V).any() and torch.equal(call["out_mask"], xt == V)
        if name == "prior":
            assert z.shape == (4, 3) and z.std() > 0.3  # a draw from N(0, I), not zeros
        nll = reference_nll(net, x0, xt, V, V, z)
        torch.testing.assert_close(out.per_seq.double(), nll / t.double(), rtol=1e-5, atol=1e-6)
        assert int(out.num_tokens) == int(key_mask.sum()) == 4 * 6 - 3 - 1
        if name == "mdlm":
            torch.testing.assert_close(out.stats["recon"].double(), nll, rtol=1e-5, atol=1e-6)


def test_vae_loss_defaults_to_the_bound_and_logs_the_positive_reconstruction_nll():
    """vae_loss without beta is the DELBO (beta = 1): per_seq = w(t) (NLL + KL), with the
    KL of the given z noise recomputed here; the logged recon is the NLL (> 0)."""
    from algorithms import objectives

    V, d = 5, 3
    x0, key_mask, t = padded_batch(V)
    spec = objectives.DiffusionSpec(noise=LogLinear(), mask_id=V, vocab_size=V)
    mu, log_sigma = torch.randn(4, d) * 0.5, torch.randn(4, d) * 0.2
    encoder = lambda x0, visible, sigma, key_mask: (mu, log_sigma)  # noqa: E731
    eps = torch.randn(4, 1, d)
    net = BigramNet(V + 2)
    draws = objectives.Draws(mask_u=torch.rand(x0.shape), z_eps=eps)
    out = objectives.vae_loss(net, encoder, x0, key_mask, t, spec, draws=draws)
    (call,) = net.calls
    z = mu.double() + log_sigma.double().exp() * eps[:, 0].double()
    torch.testing.assert_close(call["z"].double(), z, rtol=1e-6, atol=1e-6)
    nll = reference_nll(net, x0, call["xt"], V, V, z)
    # log N(z; mu, sigma) - log N(z; 0, I), summed over the d dimensions
    kl = (-log_sigma.double() - 0.5 * eps[:, 0].double() ** 2 + 0.5 * z**2).sum(-1)
    w = 1 / t.double()
    torch.testing.assert_close(out.per_seq.double(), w * (nll + kl), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["recon"].double(), nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats["kl"].double(), kl, rtol=1e-5, atol=1e-6)


def test_one_step_masks_everything_and_a_time_conditioned_decoder_gets_sigma_of_t():
    """T = 1: every t rounds up to 1, so (almost: alpha(1) = eps) every real token is
    masked; time_conditioning=True feeds sigma(t) = -log alpha(t), else 0. No padding:
    the token count is B * L."""
    from algorithms import objectives

    V = 5
    x0 = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.5, 0.1, 0.9])
    for steps, conditioned in ((1, False), (0, True)):
        spec = objectives.DiffusionSpec(
            noise=LogLinear(), mask_id=V, vocab_size=V, num_steps=steps,
            time_conditioning=conditioned,
        )  # fmt: skip
        net = BigramNet(V + 2)
        out = objectives.mdlm_loss(net, x0, None, t, spec)
        (call,) = net.calls
        assert int(out.num_tokens) == 24
        if steps == 1:
            assert (call["xt"] == V).float().mean() > 0.9  # ~ 1 - 1e-3 at t = 1
            torch.testing.assert_close(call["sigma"], torch.zeros(4))
        else:
            want = -torch.log1p(-(1 - 1e-3) * t.double())
            torch.testing.assert_close(call["sigma"].double(), want, rtol=1e-5, atol=1e-6)


def test_free_bits_mu_std_and_the_latent_of_per_position_z_on_a_padded_batch():
    """Per-position z (B, L, d) with padding: the free-bits term is lam_kl * sum over groups
    of relu(nats * group - weighted batch mean of the group's KL), the KL counting real
    positions only; the logged mu_std is the population std of mu over the batch averaged
    over its entries; the kept Latent carries the padding mask."""
    from algorithms import objectives

    V, d, group, nats = 5, 4, 2, 3.0
    x0, key_mask, t = padded_batch(V)
    B, L = x0.shape
    spec = objectives.DiffusionSpec(noise=LogLinear(), mask_id=V, vocab_size=V)
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(B, L, d, generator=g) * 0.3
    mu[..., 0] *= 3.5  # dimension 0 above its own floor, its group (0, 1) below: group matters
    log_sigma = torch.randn(B, L, d, generator=g) * 0.1 - 0.2
    encoder = lambda x0, visible, sigma, key_mask: (mu, log_sigma)  # noqa: E731
    draws = objectives.Draws(
        torch.rand(x0.shape, generator=g), torch.randn(B, 1, L, d, generator=g)
    )
    args = (BigramNet(V + 2), encoder, x0, key_mask, t, spec)
    plain = objectives.vae_loss(*args, draws=draws)
    floored = objectives.vae_loss(*args, draws=draws, free_bits=objectives.FreeBits(nats, group))
    m, ls = mu.double(), log_sigma.double()
    kl = (0.5 * (m**2 + (2 * ls).exp() - 1) - ls) * key_mask[..., None]  # (B, L, d)
    per_group = kl.sum(1).view(B, d // group, group).sum(-1)  # (B, groups)
    w = 1 / t.double()  # the KL's weight: log-linear, T = 0, kl_weighting=time
    mean = (w[:, None] * per_group).sum(0) / w.sum()
    extra = w * torch.relu(nats * group - mean).sum()
    assert extra.min() > 0, "the floor must bind for the test to say anything"
    per_dim = (w[:, None] * kl.sum(1)).sum(0) / w.sum()
    assert per_dim[0] > nats > per_dim[1] and per_dim[:2].sum() < nats * group
    torch.testing.assert_close(floored.stats["free_bits"].double(), extra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        (floored.per_seq - plain.per_seq).double(), extra, rtol=1e-5, atol=1e-5
    )
    want_std = m.flatten(1).std(0, correction=0).mean()
    torch.testing.assert_close(plain.stats["mu_std"].double(), want_std.expand(B))
    assert plain.latent.position_mask is key_mask


def test_per_position_kls_leave_the_padding_positions_out():
    """Per-position latents (model.latent1d=False): both KL estimates of a padded row are
    those of its real positions, against normal log-densities in float64."""
    torch.manual_seed(4)
    B, K, L, d = 3, 2, 5, 4
    mu, log_sigma = torch.randn(B, L, d).double(), 0.3 * torch.randn(B, L, d).double()
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    z, eps = losses.reparameterize(mu, log_sigma, K)  # (B, K, L, d)
    log_r = normal_logpdf(z, mu[:, None], log_sigma.exp()[:, None]).sum(-1)  # (B, K, L)
    log_p = normal_logpdf(z, 0.0, 1.0).sum(-1)
    want = ((log_r - log_p) * real[:, None]).sum(-1)
    torch.testing.assert_close(losses.kl_one_sample(z, eps, log_sigma, real), want)
    sigma2 = (2 * log_sigma).exp()
    closed = 0.5 * (mu**2 + sigma2 - 1 - 2 * log_sigma).sum(-1)  # (B, L)
    torch.testing.assert_close(losses.kl_closed_form(mu, log_sigma, real), (closed * real).sum(-1))


def test_free_bits_group_0_is_one_floor_for_all_of_z_and_small_weights_are_kept():
    """group 0 (recipe=cpu's choice) = one group of all d dimensions; the weighted mean
    divides by the weights' sum even when it is below 1 (kl_weighting=once, short T)."""
    kl = torch.tensor([[0.1, 0.2, 0.0, 0.3], [0.4, 0.0, 0.1, 0.1]], dtype=torch.float64)
    lam = torch.tensor([0.2, 0.05], dtype=torch.float64)
    got = losses.free_bits_penalty(kl, lam, free_bits=0.5, group=0)
    torch.testing.assert_close(got, losses.free_bits_penalty(kl, lam, free_bits=0.5, group=4))
    mean = (0.2 * 0.6 + 0.05 * 0.6) / 0.25  # both rows hold 0.6 nats in all
    torch.testing.assert_close(got, lam * (0.5 * 4 - mean))


def test_decoupled_strata_draw_from_the_given_generator_only():
    """The global batch's draws come from the step's generator (split invariance), not
    from the global RNG."""
    draws = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(7)
        draws.append(losses.sample_t(4, eps=1e-3, antithetic=True, generator=g, decoupled=True))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)

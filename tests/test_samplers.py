"""Samplers: ancestral masked diffusion (ddpm / vae, with and without cache) and AR decoding."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from models.dit import GenDIT
from noise_schedule import LogLinear
from sampling import samplers

V = 5  # real tokens 0..4
MASK = V


def fixed_logits_denoiser(table):
    """Logits that depend only on the position: table (L, V_out)."""

    def denoise(xt, sigma, z, out_mask):
        assert out_mask.shape == xt.shape
        return table.expand(xt.shape[0], *table.shape)[out_mask]

    return denoise


def all_mask(b, length):
    return torch.full((b, length), MASK, dtype=torch.long)


def run(denoise, x_init, seed=0, **kwargs):
    kwargs.setdefault("steps", 8)
    g = torch.Generator().manual_seed(seed)
    return samplers.sample_masked(
        denoise, x_init, mask_id=MASK, vocab_size=V, noise=LogLinear(), generator=g, **kwargs
    )


# ---------------------------------------------------------------------------- basics


@pytest.mark.parametrize("cache", [False, True])
def test_fixed_logits_leave_no_mask_and_never_emit_the_mask(cache):
    torch.manual_seed(0)
    table = torch.randn(6, V + 1)
    table[:, V] = 50.0  # the [MASK] logit is the largest but must never be sampled
    x, stats = run(fixed_logits_denoiser(table), all_mask(4, 6), cache=cache, steps=3)
    assert not (x == MASK).any()
    assert ((x >= 0) & (x < V)).all()
    assert stats.network_calls >= 1


def test_one_hot_denoiser_gives_all_k():
    for k in range(V):
        table = torch.zeros(7, V + 1)
        table[:, k] = 1e4
        table[:, V] = 2e4
        x, _ = run(fixed_logits_denoiser(table), all_mask(3, 7), steps=5, seed=k)
        assert torch.equal(x, torch.full_like(x, k))


def test_one_step_samples_follow_the_softmax():
    """steps=1 from t=1 to eps reveals (almost) everything by Gumbel-max from the logits.

    Per position, token frequencies over 20k sequences match softmax(logits[:V]) within
    5 binomial standard errors + 2e-3 (the ~1e-5 fraction left for the argmax step).
    """
    torch.manual_seed(1)
    table = torch.randn(3, V + 1)
    x, _ = run(fixed_logits_denoiser(table), all_mask(20_000, 3), steps=1)
    p = torch.softmax(table[:, :V].double(), -1)  # (L, V)
    freq = torch.stack([torch.bincount(x[:, pos], minlength=V) for pos in range(3)]).double()
    freq /= x.shape[0]
    tol = 5 * (p * (1 - p) / x.shape[0]).sqrt() + 2e-3
    assert ((freq - p).abs() < tol).all(), (freq, p)


def test_reveal_fraction_follows_the_reverse_process():
    """First step 1 -> s reveals each masked position w.p. (alpha_s - alpha_1)/(1 - alpha_1)."""
    calls = []

    def denoise(xt, sigma, z, out_mask):
        calls.append(out_mask.clone())
        return torch.zeros(int(out_mask.sum()), V + 1)

    steps, eps = 4, 1e-5
    run(denoise, all_mask(100, 40), steps=steps, eps=eps)
    grid = [1.0 - i * (1.0 - eps) / steps for i in range(steps + 1)]  # t_i from 1 to eps

    def alpha(t):  # the log-linear schedule written out: 1 - (1 - 1e-3) t
        return 1.0 - (1.0 - 1e-3) * t

    def reveal(t, s):  # P(masked at t, visible at s) / P(masked at t)
        return (alpha(s) - alpha(t)) / (1.0 - alpha(t))

    expected = reveal(grid[0], grid[1])  # ~0.249
    frac = calls[0].double().mean().item()
    se = math.sqrt(expected * (1 - expected) / 4000)
    assert abs(frac - expected) < 5 * se, (frac, expected)
    # Second step: among the still-masked positions.
    still = ~calls[0]
    frac2 = calls[1][still].double().mean().item()
    expected2 = reveal(grid[1], grid[2])  # ~0.333
    se2 = math.sqrt(expected2 * (1 - expected2) / int(still.sum()))
    assert abs(frac2 - expected2) < 5 * se2, (frac2, expected2)


def test_mdlm_sampling_passes_no_latent():
    seen = []

    def denoise(xt, sigma, z, out_mask):
        seen.append(z)
        return torch.zeros(int(out_mask.sum()), V + 1)

    run(denoise, all_mask(2, 4), steps=3, latent=None)
    assert seen and all(z is None for z in seen)


# ------------------------------------------------------------------ conditional sampling


@pytest.mark.parametrize("cache", [False, True])
def test_unmasked_positions_are_never_changed(cache):
    torch.manual_seed(2)
    B, Lx = 6, 12
    fixed = torch.zeros(Lx, dtype=torch.bool)
    fixed[:2] = fixed[5:7] = fixed[-2:] = True  # prefix, interior span, suffix
    x_init = all_mask(B, Lx)
    x_init[:, fixed] = torch.randint(0, V, (B, int(fixed.sum())))
    masks = []

    def denoise(xt, sigma, z, out_mask):
        masks.append(out_mask.clone())
        logits = torch.randn(int(out_mask.sum()), V + 1)
        logits[:, V] = 100.0
        return logits

    latent = lambda n: torch.randn(n, 4)  # noqa: E731
    x, _ = run(denoise, x_init, steps=6, cache=cache, latent=latent, fixz=False)
    assert torch.equal(x[:, fixed], x_init[:, fixed])
    assert not (x == MASK).any()
    assert all(not (m & fixed).any() for m in masks)  # never even asked about them
    assert torch.equal(x_init[:, ~fixed], all_mask(B, int((~fixed).sum())))  # input untouched


# -------------------------------------------------------------------------- latent z


def tagged_latent(counter):
    """z (n, 3): column 0 is the row index (a tag to follow rows), the rest is random."""

    def latent(n):
        counter.append(n)
        z = torch.randn(n, 3)
        z[:, 0] = torch.arange(n, dtype=torch.float32)
        return z

    return latent


@pytest.mark.parametrize("fixz", [True, False])
def test_fixz_uses_one_z_per_sequence_for_the_whole_chain(fixz):
    torch.manual_seed(3)
    B, Lx, steps = 4, 8, 3
    recorded, draws = [], []

    def denoise(xt, sigma, z, out_mask):
        recorded.append(z.clone())
        return torch.randn(int(out_mask.sum()), V + 1)

    # eps = 0.3 leaves ~30% masked for the final greedy step, which must use the same z.
    x, _ = run(
        denoise, all_mask(B, Lx), steps=steps, eps=0.3, latent=tagged_latent(draws), fixz=fixz
    )
    assert not (x == MASK).any()
    assert len(recorded) == steps + 1  # every step plus the final noise-removal step
    first = recorded[0]
    assert torch.equal(first[:, 0], torch.arange(B, dtype=torch.float32))
    if fixz:
        assert draws == [B]  # drawn once
        for z in recorded:
            rows = z[:, 0].long()
            assert torch.equal(z[:, 1:], first[rows, 1:])
    else:
        assert len(draws) == steps + 1  # redrawn at every step
        for prev, cur in zip(recorded[:-1], recorded[1:], strict=True):
            rows = cur[:, 0].long()
            lookup = {int(r): i for i, r in enumerate(prev[:, 0].long())}
            for j, r in enumerate(rows.tolist()):
                if r in lookup:
                    assert not torch.equal(cur[j, 1:], prev[lookup[r], 1:])


def gendit_denoiser(seed=0):
    cfg = OmegaConf.create(
        dict(
            hidden_size=16,
            cond_dim=8,
            n_heads=2,
            n_blocks=1,
            length=8,
            dropout=0.0,
            latent_dim=4,
            latentMLP=True,
            latent1d=True,
            latent_struc="adaln",
            vocab_multiple=1,
            gelu="auto",
        )
    )
    torch.manual_seed(seed)
    net = GenDIT(cfg, V + 1).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn_like(p))

    def denoise(xt, sigma, z, out_mask):
        return net(xt, sigma, z=z, out_mask=out_mask)

    return net, denoise


def test_randomised_gendit_depends_on_z():
    net, _ = gendit_denoiser()
    x = torch.randint(0, V + 1, (2, 8))
    with torch.no_grad():
        a = net(x, torch.zeros(2), z=torch.randn(2, 4))
        b = net(x, torch.zeros(2), z=torch.randn(2, 4))
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("fixz", [True, False])
def test_cache_gives_identical_tokens_with_fewer_row_evaluations(fixz):
    _, denoise = gendit_denoiser(seed=4)
    outs = {}
    for cache in (False, True):
        gz = torch.Generator().manual_seed(123)
        latent = lambda n, gz=gz: torch.randn(n, 4, generator=gz)  # noqa: E731
        outs[cache] = run(
            denoise, all_mask(4, 8), seed=7, steps=32, cache=cache, latent=latent, fixz=fixz
        )
    (x_nc, s_nc), (x_c, s_c) = outs[False], outs[True]
    assert torch.equal(x_nc, x_c)
    assert not (x_c == MASK).any()
    assert s_c.row_evals < s_nc.row_evals
    assert 4 * 32 <= s_nc.row_evals <= 4 * 33  # no cache: every row at every step (+ final)
    assert s_c.as_dict(4)["nfe_per_sequence"] == s_c.row_evals / 4


def test_different_seeds_give_different_samples():
    _, denoise = gendit_denoiser(seed=5)
    latent = lambda n: torch.randn(n, 4)  # noqa: E731
    a, _ = run(denoise, all_mask(4, 8), seed=1, latent=latent)
    b, _ = run(denoise, all_mask(4, 8), seed=2, latent=latent)
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------- gumbel_argmax


def test_gumbel_argmax_frequencies_match_softmax():
    """200k draws: each frequency within 5 binomial standard errors (+1e-4) of softmax."""
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -3.0], dtype=torch.float64)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    idx = samplers.gumbel_argmax(logits.expand(n, -1), generator=g, chunk=4096)
    assert idx.dtype == torch.long
    freq = torch.bincount(idx, minlength=5).double() / n
    p = torch.softmax(logits, -1)
    tol = 5 * (p * (1 - p) / n).sqrt() + 1e-4
    assert ((freq - p).abs() < tol).all(), (freq, p)


def test_gumbel_argmax_uses_float64_noise():
    """The result equals argmax(logits + Gumbel) with float64 uniforms from the generator.

    Logit gaps of 1e-12 are invisible in float32, so only a float64 computation can match.
    """
    torch.manual_seed(0)
    base = torch.randn(50, 1, dtype=torch.float64)
    logits = base + 1e-12 * torch.arange(6, dtype=torch.float64)  # nearly tied rows
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    got = samplers.gumbel_argmax(logits, generator=g1)
    u = torch.rand(logits.shape, generator=g2, dtype=torch.float64)
    expected = (logits - torch.log(-torch.log(u))).argmax(-1)
    assert torch.equal(got, expected)
    g3 = torch.Generator().manual_seed(9)
    got32 = samplers.gumbel_argmax(logits.float(), generator=g3)
    assert torch.equal(got32, (logits.float().double() - torch.log(-torch.log(u))).argmax(-1))


# ------------------------------------------------------------------------ autoregressive


def test_sample_autoregressive_follows_a_deterministic_rule():
    bos, length = 2, 9

    def logits_fn(prefix):
        b, i = prefix.shape
        logits = torch.zeros(b, i, V + 1)
        nxt = (prefix + 1) % V
        logits.scatter_(2, nxt[..., None], 50.0)
        logits[..., V] = 100.0  # excluded: only the first vocab_size logits compete
        return logits

    g = torch.Generator().manual_seed(0)
    x = samplers.sample_autoregressive(logits_fn, 3, length, bos_id=bos, vocab_size=V, generator=g)
    expected = (bos + torch.arange(length)) % V
    assert torch.equal(x, expected.expand(3, -1))


def test_sample_autoregressive_sees_the_growing_prefix():
    lengths = []

    def logits_fn(prefix):
        lengths.append(prefix.shape[1])
        return torch.zeros(prefix.shape[0], prefix.shape[1], V + 1)

    x = samplers.sample_autoregressive(logits_fn, 2, 5, bos_id=0, vocab_size=V)
    assert lengths == [1, 2, 3, 4]
    assert (x[:, 0] == 0).all() and ((x >= 0) & (x < V)).all()


# ---------------------------------------------------------------- time conditioning
def sigma_recorder(calls):
    """A denoiser that records the sigma of each call and predicts token 0 everywhere."""

    def denoise(xt, sigma, z, out_mask):
        calls.append(sigma.clone())
        logits = torch.full((int(out_mask.sum()), V + 1), -5.0)
        logits[:, 0] = 5.0
        return logits

    return denoise


def loglinear_sigma(t: float, eps: float = 1e-3) -> float:
    """sigma(t) = -log alpha(t), alpha(t) = 1 - (1 - eps) t (the log-linear schedule)."""
    return -math.log(1.0 - (1.0 - eps) * t)


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_a_time_conditioned_model_gets_the_sigma_of_each_step(time_conditioning):
    """Step i of the grid 1 -> eps feeds sigma(t_i) (t_i = 1 - i (1 - eps) / T), the final
    noise removal sigma(eps); a model without time conditioning gets 0 throughout."""
    calls, steps, eps = [], 4, 1e-5
    run(sigma_recorder(calls), all_mask(3, 6), steps=steps, eps=eps, seed=2,
        time_conditioning=time_conditioning)  # fmt: skip
    grid = [1.0 - i * (1.0 - eps) / steps for i in range(steps + 1)]
    assert len(calls) in (steps, steps + 1)  # + the noise removal if masks were left
    for call, t in zip(calls, grid[:steps] + [grid[-1]], strict=False):
        want = loglinear_sigma(t) if time_conditioning else 0.0
        assert call.shape == (3,)
        torch.testing.assert_close(call, torch.full((3,), want), rtol=1e-5, atol=1e-6)
    if time_conditioning:
        assert calls[0][0] > 6.0  # sigma(1) = log(1000): not a zero that happens to match


def test_any_order_sigma_follows_the_visible_fraction_when_time_conditioned():
    """One position per call: with k of L tokens visible sigma = -log(k / L), and an
    all-[MASK] row gets sigma(1), the noisiest level seen in training."""
    calls, length = [], 4
    samplers.sample_any_order(
        sigma_recorder(calls), all_mask(2, length), mask_id=MASK, vocab_size=V,
        noise=LogLinear(), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    want = [loglinear_sigma(1.0)] + [-math.log(k / length) for k in range(1, length)]
    assert len(calls) == length
    for call, sigma in zip(calls, want, strict=True):
        torch.testing.assert_close(call, torch.full((2,), sigma), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("predictor", ["vae", "any_order"])
def test_sampling_a_time_conditioned_module_feeds_its_decoder_sigma(tmp_path, predictor):
    """Through generate(): time_conditioning=True reaches the sampler (sigma > 0 while
    masks remain), and the samples differ from the same weights fed sigma = 0."""
    from test_end_to_end import build, make_cfg

    from sampling.generation import generate

    cfg = make_cfg(tmp_path, "time_conditioning=True", "model.length=16", "eval.disable_ema=True")
    module = build(cfg)[1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a network whose output depends on sigma (AdaLN is zero-init)
        for p in module.backbone.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    seen, forward = [], module.backbone.forward

    def spy(xt, sigma, *args, **kwargs):
        seen.append(sigma.clone())
        return forward(xt, sigma, *args, **kwargs)

    module.backbone.forward = spy
    samples = {}
    for conditioned in (True, False):
        module.cfg.time_conditioning = conditioned
        seen.clear()
        g = torch.Generator().manual_seed(5)
        samples[conditioned] = generate(
            module, num_samples=4, predictor=predictor, steps=8, generator=g
        )[0]
        if conditioned:
            assert len(seen) >= 8 and all((s > 0).all() for s in seen[:8])
            assert seen[0].max() == pytest.approx(loglinear_sigma(1.0), rel=1e-4)
        else:
            assert all((s == 0).all() for s in seen)
    assert not torch.equal(samples[True], samples[False])


def test_a_random_order_comes_from_the_generator_alone():
    """sample_any_order(order="random"): the same generator seed gives the same order and
    samples whatever the global RNG did in between; another seed another order."""

    def order_of(seed: int, global_seed: int):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        revealed = []

        def denoise(xt, sigma, z, out_mask):
            revealed.append(out_mask.nonzero()[:, 1].tolist())
            return torch.zeros(int(out_mask.sum()), V + 1)

        x, _ = samplers.sample_any_order(
            denoise, all_mask(2, 8), mask_id=MASK, vocab_size=V, order="random",
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return revealed, x

    a, xa = order_of(1, global_seed=0)
    b, xb = order_of(1, global_seed=99)
    c, _ = order_of(2, global_seed=0)
    assert a == b and torch.equal(xa, xb)
    assert a != c
    assert sorted(p for step in a for p in step[:1]) == list(range(8))  # a permutation


@pytest.mark.parametrize("batch", [1, 7])  # 7 > L: a (L,) sigma would not index
def test_sample_stats_report_network_calls_and_row_evaluations_per_sequence(batch):
    """as_dict: network_calls (batched decoder calls) and nfe_per_sequence = row
    evaluations / batch, also for one sequence; sigma has one entry per row (B != L)."""
    sigmas = []

    def denoise(xt, sigma, z, out_mask):
        sigmas.append(sigma.shape)
        return torch.zeros(int(out_mask.sum()), V + 1)

    _, stats = samplers.sample_any_order(
        denoise, all_mask(batch, 5), mask_id=MASK, vocab_size=V, noise=None
    )
    assert stats.as_dict(batch) == {
        "steps": 5,
        "network_calls": 5,
        "nfe_per_sequence": 5.0,  # every row is evaluated at each of the 5 calls
    }
    assert sigmas == [torch.Size([batch])] * 5


@pytest.mark.parametrize("top_p,kept", [(0.5, 1), (0.75, 2), (0.875, 3), (0.876, 4)])
def test_top_p_at_a_cumulative_boundary_keeps_the_smallest_set_reaching_it(top_p, kept):
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in binary): the smallest set whose mass
    reaches top_p = 1/2 is the first token alone, 3/4 the first two, and so on."""
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64).log()  # exact
    out = samplers.filter_logits(logits, top_p=top_p)
    assert torch.isfinite(out[0]).tolist() == [True] * kept + [False] * (4 - kept)


@pytest.mark.parametrize("cache", [False, True])
def test_a_one_token_sequence_is_sampled(cache):
    """L = 1 (the smallest row): every path indexes positions, not only their first two."""
    x, stats = run(fixed_logits_denoiser(torch.zeros(1, V + 1)), all_mask(3, 1), cache=cache)
    assert x.shape == (3, 1) and not (x == MASK).any() and stats.row_evals > 0

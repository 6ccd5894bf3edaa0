"""RADD's losses (t-, lambda-, k-DCE, t-DSE), SEDD's score entropy and the exact
any-order likelihood, against independent derivations on tiny models.

The reference is enumeration: with L = 4 positions every subset of masked positions is
one network call, which gives every conditional p(x_i | x_visible); from them the
any-order AR NLL of each of the L! orders, their mean (what every DCE loss estimates)
and the NLL of the uniform mixture over orders (an exact likelihood they bound).
"""

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf

from algorithms import losses, objectives
from algorithms.radd import SEDD, TDSE
from models.dit import DIT
from models.radd import RADD
from noise_schedule import LogLinear

V = 3  # real tokens; [MASK] = V


class Uniform(torch.nn.Module):
    """A denoiser whose logits are all zero: the uniform prediction."""

    def forward(self, xt, sigma, key_mask=None, out_mask=None, **_):
        n = int(out_mask.sum()) if out_mask is not None else xt.numel()
        return torch.zeros(n, V + 1)


def spec_for(time_conditioning=False, eps=1e-3):
    return objectives.DiffusionSpec(
        noise=LogLinear(eps), mask_id=V, vocab_size=V, time_conditioning=time_conditioning
    )


def tiny_net(kind: str, seed: int = 0) -> torch.nn.Module:
    cfg = OmegaConf.create(dict(hidden_size=16, cond_dim=8, n_heads=2, n_blocks=2, length=4,
                                dropout=0.0, vocab_multiple=1, gelu="tanh"))  # fmt: skip
    torch.manual_seed(seed)
    net = (DIT if kind == "dit" else RADD)(cfg, V + 1)
    with torch.no_grad():  # the zero-initialised heads would make every prediction uniform
        for name, p in net.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.25 * torch.randn_like(p)
            )
    return net.eval()


def loss_of(name: str, net, x0, key_mask, t, spec):
    if name == "t_dce":
        return objectives.mdlm_loss(net, x0, key_mask, t, spec)
    if name == "lambda_dce":
        return objectives.lambda_dce_loss(net, x0, key_mask, t, spec)
    if name == "k_dce":
        return objectives.k_dce_loss(net, x0, key_mask, t, spec)
    log_score = (SEDD if name == "sedd" else TDSE)(None).log_score
    return objectives.score_entropy_loss(net, x0, key_mask, t, spec, log_score)


def draw_t(n, name, eps=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return losses.sample_t(n, eps=0.0 if name == "k_dce" else eps, antithetic=True, generator=g)


# ------------------------------------------------------------------ uniform predictions
@pytest.mark.parametrize("name", ["t_dce", "lambda_dce", "k_dce", "t_dse", "sedd"])
def test_every_loss_of_a_uniform_prediction_costs_log_v_per_token(name):
    """E[loss] per real token = log V: exactly for k-DCE (every draw) and lambda-DCE
    (E[(1/lam) Bin(n, lam)] = n), and (alpha(eps) - alpha(1)) / (1 - eps) log V for the
    time-based losses, whose t ~ U[eps, 1] leaves out [0, eps). Padding costs nothing."""
    torch.manual_seed(0)
    rows, length, eps = 4000, 6, 1e-3
    x0 = torch.randint(0, V, (rows, length))
    key_mask = torch.ones_like(x0, dtype=torch.bool)
    key_mask[::2, 4:] = False  # half the rows have 4 real tokens
    spec = spec_for(time_conditioning=name == "sedd", eps=1e-3)
    out = loss_of(name, Uniform(), x0, key_mask, draw_t(rows, name, eps), spec)
    per_token = out.per_seq.double() / key_mask.sum(1)
    mean, se = per_token.mean().item(), per_token.std().item() / math.sqrt(rows)
    factor = 1.0
    if name in ("t_dce", "t_dse", "sedd"):
        a = lambda t: spec.noise.alpha(torch.tensor(t, dtype=torch.float64)).item()
        factor = (a(eps) - a(1.0)) / (1.0 - eps)
    assert int(out.num_tokens) == int(key_mask.sum())
    if name == "k_dce":  # n / k x (k masked positions x log V): the same for every draw
        assert torch.allclose(per_token, torch.full_like(per_token, math.log(V)), atol=1e-5)
    else:
        assert abs(mean - factor * math.log(V)) < 4 * se + 1e-6, (mean, se)


def test_t_dse_of_a_normalised_network_is_t_dce_draw_by_draw():
    """RADD: the score entropy of s = log c + log(alpha / (1 - alpha)) is
    alpha / (1 - alpha) (-log c(x0)): t-DSE and t-DCE are one loss for a RADD net."""
    net, spec = tiny_net("radd"), spec_for()
    x0 = torch.randint(0, V, (64, 4), generator=torch.Generator().manual_seed(1))
    t = draw_t(64, "t_dce")
    torch.manual_seed(2)
    dce = loss_of("t_dce", net, x0, None, t, spec).per_seq
    torch.manual_seed(2)  # the same masks
    dse = loss_of("t_dse", net, x0, None, t, spec).per_seq
    assert torch.allclose(dse, dce, rtol=1e-4, atol=1e-4)
    assert (dce > 0).any()


def test_sedd_zero_logits_are_the_score_of_a_uniform_conditional():
    alpha = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    score = SEDD(None).log_score(torch.zeros(3, V, dtype=torch.float64), alpha)
    expected = torch.log(alpha / (1 - alpha) / V)[:, None].expand(3, V)  # p_t(y) / p_t(mask)
    assert torch.allclose(score, expected)
    ent = losses.score_entropy(torch.log(alpha / (1 - alpha))[:, None].expand(3, V) + 0.3,
                               torch.tensor([0, 1, 2]), alpha)  # fmt: skip
    assert (ent > 0).all()  # a wrong score costs more than the true one (0)
    exact = losses.score_entropy(torch.log(alpha / (1 - alpha))[:, None], torch.zeros(3).long(),
                                 alpha)  # fmt: skip
    assert torch.allclose(exact, torch.zeros(3, dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------- the exact any-order NLL
def conditionals(net, x0: torch.Tensor, time_conditioning=False) -> dict:
    """{masked subset: {position: log p(x_i | x_visible)}} for one sequence (L,); a
    time-conditioned net gets sigma = -log(visible fraction), at least -log alpha(1)."""
    L, out = len(x0), {}
    for k in range(1, L + 1):
        for subset in itertools.combinations(range(L), k):
            xt = x0.clone()
            xt[list(subset)] = V
            visible = max((L - k) / L, 1 - (1 - 1e-3) * 1.0)  # LogLinear(1e-3).alpha(1)
            sigma = torch.tensor([-math.log(visible) if time_conditioning else 0.0])
            logits = net(xt[None], sigma)[0, :, :V]
            logp = torch.log_softmax(logits.double(), -1)
            out[subset] = {i: logp[i, x0[i]].item() for i in subset}
    return out


def order_nll(cond: dict, order) -> float:
    return -sum(cond[tuple(sorted(order[j:]))][order[j]] for j in range(len(order)))


def enumerate_orders(net, x0, time_conditioning=False):
    """(mean over orders of the order's NLL, NLL of the uniform mixture over orders)."""
    cond = conditionals(net, x0, time_conditioning)
    nlls = torch.tensor([order_nll(cond, o) for o in itertools.permutations(range(len(x0)))])
    mixture = -(torch.logsumexp(-nlls, 0) - math.log(len(nlls)))
    return nlls.mean().item(), mixture.item(), cond


@torch.no_grad()
def test_the_dce_losses_estimate_the_any_order_nll_and_bound_the_exact_likelihood():
    """Every DCE loss's expectation is the mean over orders of the any-order AR NLL
    (RADD, Thm 2), which is >= the NLL of the uniform mixture over orders (Jensen): the
    Monte-Carlo means agree with the enumerated value within 4 standard errors."""
    net, spec = tiny_net("radd", seed=3), spec_for(eps=1e-4)
    rows = 20000
    for x0 in torch.tensor([[0, 2, 1, 1], [2, 2, 0, 1]]):
        mean_orders, mixture, _ = enumerate_orders(net, x0)
        assert mean_orders > mixture + 1e-3  # a bound, strictly above for this network
        batch = x0.expand(rows, -1).contiguous()
        for name in ("t_dce", "lambda_dce", "k_dce"):
            torch.manual_seed(4)
            per_seq = loss_of(name, net, batch, None, draw_t(rows, name, 1e-4, seed=5), spec)
            per_seq = per_seq.per_seq.double()
            mean, se = per_seq.mean().item(), per_seq.std().item() / math.sqrt(rows)
            assert abs(mean - mean_orders) < 4 * se + 2e-3, (name, mean, se, mean_orders)


@torch.no_grad()
@pytest.mark.parametrize("name", ["t_dce", "lambda_dce", "k_dce"])
def test_each_draw_weights_the_masked_conditionals_as_its_loss_says(name):
    """For every masked subset S: t-DCE = w(t) sum_S -log p, lambda-DCE = (1 / lam) sum_S,
    k-DCE = (L / |S|) sum_S (the uniforms put S first); with S uniform given |S| and the
    weights, the expectations are the enumerated mean over orders above."""
    net, spec = tiny_net("radd", seed=3), spec_for()
    x0 = torch.tensor([0, 2, 1, 1])
    cond = conditionals(net, x0)
    subsets = list(cond)
    u = torch.ones(len(subsets), 4)
    for row, subset in enumerate(subsets):
        u[row, list(subset)] = torch.linspace(0.0, 0.001, len(subset))  # S first, and < lam
    k = torch.tensor([len(s) for s in subsets])
    if name == "k_dce":
        t, weight = (k - 1 + 0.5) / 4, 4 / k  # u_k picks k = |S|
    else:
        t = torch.linspace(0.2, 0.9, len(subsets))
        weight = 1 / t if name == "lambda_dce" else spec.noise.loss_weight(t)
    draws = objectives.Draws(mask_u=u)
    batch = x0.expand(len(subsets), -1).contiguous()
    if name == "t_dce":  # mask_u < 1 - alpha_t masks S exactly
        out = objectives.mdlm_loss(net, batch, None, t, spec, draws)
    else:
        fn = objectives.lambda_dce_loss if name == "lambda_dce" else objectives.k_dce_loss
        out = fn(net, batch, None, t, spec, draws)
    expected = torch.tensor([-sum(cond[s].values()) for s in subsets]) * weight
    assert torch.allclose(out.per_seq.double(), expected.double(), rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["radd", "dit", "dit_time"])
def test_any_order_nll_is_the_enumerated_likelihood_of_that_order(kind):
    timed = kind == "dit_time"
    net, spec = tiny_net(kind[:4].strip("_"), seed=7), spec_for(time_conditioning=timed)
    x0 = torch.tensor([[1, 0, 2, 2], [0, 0, 1, 2], [2, 1, 1, 0]])
    forward = torch.arange(4.0).expand(3, 4)
    got = objectives.any_order_nll(net, x0, None, forward, spec, rows_per_call=6)
    rank = torch.rand(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got_random = objectives.any_order_nll(net, x0, None, rank, spec, rows_per_call=64)
    for b in range(3):
        _, _, cond = enumerate_orders(net, x0[b], timed)
        assert got[b].item() == pytest.approx(order_nll(cond, [0, 1, 2, 3]), rel=1e-6, abs=1e-5)
        order = rank[b].argsort().tolist()
        assert got_random[b].item() == pytest.approx(order_nll(cond, order), rel=1e-6, abs=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["radd", "dit_time"])
def test_any_order_nll_of_a_padded_row_is_its_unpadded_nll(kind):
    timed = kind == "dit_time"  # sigma from the visible share of the real positions
    net, spec = tiny_net(kind[:4].strip("_"), seed=8), spec_for(time_conditioning=timed)
    x0 = torch.tensor([[1, 2, 0, 0], [2, 0, 1, 1]])
    key_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    nll = objectives.any_order_nll(net, x0, key_mask, torch.arange(4.0).expand(2, 4), spec)
    short = objectives.any_order_nll(net, x0[:1, :3], None, torch.arange(3.0)[None], spec)
    # the padded row attends to 3 tokens only (key_mask), as the 3-token row does
    assert nll[0].item() == pytest.approx(short[0].item(), rel=1e-6, abs=1e-5)


# --------------------------------------------------------------------- forward process
def test_mask_exactly_k_masks_k_real_positions_uniformly():
    g = torch.Generator().manual_seed(0)
    n, L = 30000, 5
    key_mask = torch.ones(n, L, dtype=torch.bool)
    key_mask[:, 4] = False  # 4 real positions
    k = torch.full((n,), 2)
    masked = losses.mask_exactly_k(torch.rand(n, L, generator=g), k, key_mask)
    assert (masked.sum(1) == 2).all() and not masked[:, 4].any()
    subsets = torch.unique(masked[:, :4].long(), dim=0, return_counts=True)[1].double()
    assert len(subsets) == 6  # C(4, 2), each about 1 / 6
    assert ((subsets / n - 1 / 6).abs() < 4 * math.sqrt(1 / 6 * 5 / 6 / n)).all()


def test_k_is_uniform_on_one_to_n():
    g = torch.Generator().manual_seed(1)
    u = losses.sample_t(1200, eps=0.0, antithetic=True, generator=g)
    n = torch.full((1200,), 6)
    k = torch.minimum((u * n).floor().long() + 1, n)
    assert torch.bincount(k, minlength=7)[1:].tolist() == [200] * 6  # stratified: exact


def test_decoupled_strata_hold_one_independent_draw_each():
    parts = [
        losses.sample_t(4, eps=0.0, antithetic=True, decoupled=True, offset=4 * j, global_n=12,
                        generator=torch.Generator().manual_seed(9))
        for j in range(3)
    ]  # fmt: skip
    t = torch.cat(parts).double()
    assert torch.floor(t * 12).long().tolist() == list(range(12))
    gaps = (t * 12 - torch.arange(12)).tolist()  # the offsets inside the strata differ
    assert len({round(v, 4) for v in gaps}) == 12


def test_k_dce_of_a_row_without_real_tokens_costs_nothing_and_ties_mask_exactly_k():
    x0 = torch.tensor([[1, 2, 0], [0, 0, 0]])
    key_mask = torch.tensor([[True, True, True], [False, False, False]])
    out = objectives.k_dce_loss(Uniform(), x0, key_mask, torch.tensor([0.5, 0.5]), spec_for())
    assert torch.isfinite(out.per_seq).all() and out.per_seq[1] == 0
    u = torch.tensor([[0.3, 0.3, 0.3, 0.9]])  # a tie at the k-th value
    assert int(losses.mask_exactly_k(u, torch.tensor([2])).sum()) == 2


def test_batched_draws_keep_each_draws_own_spread_of_mu():
    """mu_std of a draw is the spread of the encoder mean over that draw's rows, whatever
    the number of draws stacked in one call."""
    from types import SimpleNamespace

    from evaluation import validation

    g, n, d = 3, 4, 2
    sums = {}
    mu = torch.arange(g * n * d, dtype=torch.float32).reshape(g * n, d) ** 1.5  # per draw

    def compute_loss(batch, t, beta, num_particles, draws):
        stats = {"mu_std": mu.flatten(1).std(0, correction=0).mean().expand(g * n)}
        latent = objectives.Latent(mu, torch.zeros_like(mu), t, None)
        return objectives.LossOutput(torch.zeros(g * n), torch.tensor(g * n * 5), stats, latent)

    module = SimpleNamespace(
        cfg=SimpleNamespace(seed=1), eval_particles=1, compute_loss=compute_loss,
        draw_t=lambda n, seed, accumulate: torch.rand(n),
        algorithm=SimpleNamespace(validation_extras=lambda *a: {}),
        _accumulate=lambda k, v: sums.__setitem__(k, sums.get(k, 0.0) + float(v)),
        _latent_stats=SimpleNamespace(add=lambda *a: None),
    )  # fmt: skip
    validation._draws_at_once(module, {"input_ids": torch.zeros(n, 5, dtype=torch.long)}, 0,
                              list(range(g)))  # fmt: skip
    for draw in range(g):
        own = mu[draw * n : (draw + 1) * n].std(0, correction=0).mean().item()
        assert sums[f"mu_std_{draw}"] / n == pytest.approx(own, rel=1e-5)


@pytest.mark.parametrize("cls", ["LambdaDCE", "KDCE", "TDSE", "SEDD"])
def test_each_algorithm_passes_the_padding_mask_and_the_global_draws_to_its_loss(cls):
    """The algorithm's loss is its objective on this batch's padding mask and on the
    pre-drawn global-batch uniforms (the split-invariance and exact resume rest on them):
    a padded row and fixed draws give exactly the direct objective's numbers."""
    from types import SimpleNamespace

    from algorithms import radd

    algo = getattr(radd, cls)(None)
    spec = spec_for(time_conditioning=cls == "SEDD")
    net = tiny_net("dit" if cls == "SEDD" else "radd", seed=11)
    x0 = torch.tensor([[1, 2, 0, 1], [2, 0, 1, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    t = torch.tensor([0.55, 0.8])
    draws = objectives.Draws(mask_u=torch.rand(2, 4, generator=torch.Generator().manual_seed(3)))
    module = SimpleNamespace(backbone=net, spec=spec)
    batch = {"input_ids": x0, "attention_mask": mask}
    with torch.no_grad():
        got = algo.loss(module, batch, t, 1.0, 1, draws, False).per_seq
        name = {"LambdaDCE": "lambda_dce", "KDCE": "k_dce", "TDSE": "t_dse", "SEDD": "sedd"}[cls]
        if name in ("t_dse", "sedd"):
            want = objectives.score_entropy_loss(net, x0, mask, t, spec, algo.log_score, draws)
        else:
            fn = objectives.lambda_dce_loss if name == "lambda_dce" else objectives.k_dce_loss
            want = fn(net, x0, mask, t, spec, draws)
    assert torch.equal(got, want.per_seq)
    torch.manual_seed(0)  # without the draws the global RNG would decide: other numbers
    with torch.no_grad():
        other = algo.loss(module, batch, t, 1.0, 1, None, False).per_seq
    assert not torch.equal(other, got)
    with torch.no_grad():  # and without the mask the padding position would count
        nopad = algo.loss(module, {"input_ids": x0}, t, 1.0, 1, draws, False).per_seq
    assert not torch.equal(nopad, got)


def test_k_dce_draws_its_uniform_on_all_of_0_1_and_the_others_from_eps():
    from omegaconf import OmegaConf

    from algorithms import radd

    cfg = OmegaConf.create({"T": 0, "training": {"sampling_eps": 1e-3}})
    assert radd.KDCE(cfg).t_eps() == 0.0  # k = floor(u n) + 1 needs u on [0, 1)
    assert radd.LambdaDCE(cfg).t_eps() == radd.TDSE(cfg).t_eps() == 1e-3


CASES = [(n, k) for n in ("t_dce", "lambda_dce", "k_dce", "t_dse") for k in ("radd", "dit")]


@torch.no_grad()
@pytest.mark.parametrize("name, kind", [*CASES, ("sedd", "dit")])  # SEDD: time-conditioned
def test_a_padded_row_costs_what_its_unpadded_row_costs_and_recon_is_its_nll(name, kind):
    """Padding is never masked, never attended to (the backbone gets key_mask) and never
    counted; the uniforms of the padding are 0, so a loss that ignored key_mask would
    mask and score them. The logged `recon` is the masked positions' summed NLL."""
    net, spec = tiny_net(kind, seed=11), spec_for(time_conditioning=name == "sedd")
    x0 = torch.tensor([[1, 2, 0, 0], [2, 0, 1, 1]])
    key_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    u = torch.tensor([[0.1, 0.7, 0.3, 0.0], [0.2, 0.9, 0.4, 0.6]])
    t = torch.tensor([0.5, 0.5])
    full = _loss(name, net, x0, key_mask, t, spec, objectives.Draws(mask_u=u))
    short = _loss(name, net, x0[:1, :3], None, t[:1], spec, objectives.Draws(mask_u=u[:1, :3]))
    assert full.per_seq[0].item() == pytest.approx(short.per_seq[0].item(), rel=1e-5, abs=1e-6)
    assert int(full.num_tokens) == 7
    if name in ("t_dce", "lambda_dce", "k_dce"):
        assert (full.stats["recon"] > 0).all()
        weight = {"t_dce": spec.noise.loss_weight(t), "lambda_dce": 1 / t,
                  "k_dce": torch.tensor([3 / 2, 4 / 3])}[name]  # k = floor(0.5 n) + 1  # fmt: skip
        torch.testing.assert_close(full.stats["recon"] * weight, full.per_seq)


def _loss(name, net, x0, key_mask, t, spec, draws):
    if name == "t_dce":
        return objectives.mdlm_loss(net, x0, key_mask, t, spec, draws)
    if name == "lambda_dce":
        return objectives.lambda_dce_loss(net, x0, key_mask, t, spec, draws)
    if name == "k_dce":
        return objectives.k_dce_loss(net, x0, key_mask, t, spec, draws)
    log_score = (SEDD if name == "sedd" else TDSE)(None).log_score
    return objectives.score_entropy_loss(net, x0, key_mask, t, spec, log_score, draws)

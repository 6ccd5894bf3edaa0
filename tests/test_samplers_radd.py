"""RADD's `tweedie` / `euler` samplers, SEDD's `analytic` predictor and MDLM's
semi-autoregressive windows (`sampling.semi_ar`): the maths of a step on stub
denoisers, the registry wiring, one sample_eval run end to end, the config rules."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from hydra_jobs import one_thread, run_job
from omegaconf import OmegaConf
from test_end_to_end import make_cfg
from test_samplers import gendit_denoiser, sigma_recorder
from tiny import MICRO_MODEL

import algorithms
import dataloader
from config_check import ConfigError, validate_config
from noise_schedule import Cosine, Linear, LogLinear
from sampling import predictors, samplers

V = 5  # real tokens 0..4
MASK = V
SUBS_SCORE = algorithms.MDLM(None).log_score  # log_softmax(logits) + log(alpha / (1 - alpha))
RULES = {"tweedie": ("tweedie", "sample"), "euler": ("euler", "sample"),
         "analytic": ("analytic", "argmax"), "ddpm": ("tweedie", "argmax")}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def all_mask(b, length):
    return torch.full((b, length), MASK, dtype=torch.long)


def run(denoise, x_init, rule="tweedie", seed=0, latent_from_g=False, noise=None, **kwargs):
    """sample_masked with one generator for everything, as predictors.py wires it: the
    latent, when asked for, draws z from the sampler's own generator (stream order matters)."""
    update, final = RULES[rule]
    g = torch.Generator().manual_seed(seed)
    if latent_from_g:
        kwargs["latent"] = lambda n: torch.randn(n, 4, generator=g)
    kwargs.setdefault("steps", 8)
    kwargs.setdefault("log_score", SUBS_SCORE if update == "analytic" else None)
    return samplers.sample_masked(
        denoise, x_init, mask_id=MASK, vocab_size=V, noise=noise or LogLinear(), generator=g,
        update=update, final=final, **kwargs,
    )  # fmt: skip


def recording(denoise, calls):
    def wrapped(xt, sigma, z, out_mask):
        calls.append((xt.clone(), out_mask.clone()))
        return denoise(xt, sigma, z, out_mask)

    return wrapped


# ------------------------------------------------------------ (a) cache == no cache


@pytest.mark.parametrize("fixz", [True, False])
@pytest.mark.parametrize("rule", ["tweedie", "euler", "analytic"])
def test_cache_and_no_cache_give_identical_samples_with_a_latent(rule, fixz):
    """A GenDIT reading z (drawn from the sampler's generator: once per chain, or at every
    step): the per-row cache only skips rows with nothing to reveal, so the tokens are
    bit-identical and the row evaluations (NFE) fewer."""
    _, denoise = gendit_denoiser(seed=4)
    out = {
        cache: run(
            denoise,
            all_mask(4, 8),
            rule,
            seed=7,
            steps=24,
            cache=cache,
            latent_from_g=True,
            fixz=fixz,
        )  # fmt: skip
        for cache in (False, True)
    }
    (x_nc, s_nc), (x_c, s_c) = out[False], out[True]
    assert torch.equal(x_nc, x_c)
    assert not (x_c == MASK).any()
    assert s_c.row_evals <= s_nc.row_evals and s_c.network_calls <= s_nc.network_calls
    if rule != "analytic":  # analytic needs every masked position: rows leave only when done
        assert s_c.row_evals < s_nc.row_evals
    assert s_nc.row_evals == 4 * s_nc.network_calls  # no cache: every row at every call
    stats = s_c.as_dict(4)
    assert stats["nfe_per_sequence"] == s_c.row_evals / 4
    assert stats["network_calls"] == s_c.network_calls


# -------------------------------------------------------------- (b) tweedie vs ddpm


@pytest.mark.parametrize("eps,same", [(1e-5, True), (0.5, False)])
def test_tweedie_is_ddpm_but_for_the_last_step(eps, same):
    """Both reveal a masked position w.p. (alpha_s - alpha_t) / (1 - alpha_t) from the same
    uniforms, so the chains are identical up to the input of the last step. There they
    can differ: ddpm reveals by that probability and takes the argmax of what is left at
    t = eps (noise removal), tweedie reveals everything by sampling, which also shifts the
    Gumbel stream. At steps = L and eps = 1e-5 ddpm's last step leaves nothing (its
    network_calls == steps shows it), so the samples are the same; at eps = 0.5 about
    half is left for the argmax, and they differ."""
    _, denoise = gendit_denoiser(seed=2)
    L, steps, runs = 8, 8, {}
    for rule in ("ddpm", "tweedie"):
        calls = []
        runs[rule] = (*run(recording(denoise, calls), all_mask(6, L), rule, seed=3,
                           steps=steps, eps=eps), calls)  # fmt: skip
    (x_d, s_d, calls_d), (x_t, s_t, calls_t) = runs["ddpm"], runs["tweedie"]
    assert s_t.network_calls == steps and not (x_t == MASK).any()
    for (xt_d, _), (xt_t, _) in zip(calls_d[:steps], calls_t, strict=True):
        assert torch.equal(xt_d, xt_t)  # the same chain up to the last step's input
    assert s_d.network_calls == (steps if same else steps + 1)
    assert torch.equal(x_d, x_t) == same


# ---------------------------------------------------------- (c) the Euler reveal rate


def cosine_rate(t: float) -> float:
    """-alpha'_t / (1 - alpha_t) for alpha_t = 1e-3 + 0.999 cos(pi t / 2), by hand."""
    return math.pi / 2 * math.sin(math.pi * t / 2) / (1 - math.cos(math.pi * t / 2))


def test_euler_reveal_probability_is_dt_times_the_rate_clamped_to_one():
    """dt (-alpha'_t) / (1 - alpha_t), written out by hand for three schedules."""
    dt = 0.25

    def euler(noise, t):
        t = torch.tensor(t, dtype=torch.float64)
        return float(samplers.reveal_prob(noise, "euler", t, t - dt, dt))

    # log-linear: alpha = 1 - (1 - 1e-3) t, so the rate is exactly 1 / t
    assert euler(LogLinear(), 1.0) == pytest.approx(0.25, rel=1e-12)
    assert euler(LogLinear(), 0.5) == pytest.approx(0.5, rel=1e-12)
    # linear sigma: alpha = exp(-(1e-3 + 6.999 t)), -alpha' = 6.999 alpha
    a = math.exp(-(1e-3 + 6.999 * 0.75))
    assert euler(Linear(), 0.75) == pytest.approx(dt * 6.999 * a / (1 - a), rel=1e-12)
    for t in (0.9, 0.1):
        assert euler(Cosine(), t) == pytest.approx(min(1.0, dt * cosine_rate(t)), rel=1e-12)
    assert dt * cosine_rate(0.1) > 4  # t = 0.1 above: the clamp was needed


def test_euler_reveals_dt_times_the_rate_through_the_sampler():
    """Cosine schedule, 3 steps: step 1 -> 1 - dt reveals a fraction dt (pi / 2) (1 - 1e-3)
    / (1 - alpha_1) = 0.52 of the positions, the next dt w(1 - dt) = 0.91 of those left
    (the exact tweedie rule: 0.50 and 0.73; for the log-linear schedule both are dt / t),
    the last step all that remain."""
    calls = []
    zero = lambda xt, sigma, z, out_mask: torch.zeros(int(out_mask.sum()), V + 1)  # noqa: E731
    steps, eps = 3, 1e-5
    run(recording(zero, calls), all_mask(200, 200), "euler", steps=steps, eps=eps,
        noise=Cosine())  # fmt: skip
    dt = (1 - eps) / steps
    first, second = calls[0][1], calls[1][1]
    for frac, want, n in [(first.double().mean(), dt * cosine_rate(1.0), first.numel()),
                          (second[~first].double().mean(), dt * cosine_rate(1 - dt),
                           int((~first).sum()))]:  # fmt: skip
        assert abs(float(frac) - want) < 5 * math.sqrt(want * (1 - want) / n), (frac, want)
    assert calls[-1][1].sum() == (calls[-1][0] == MASK).sum()  # the last step reveals all


# --------------------------------------------------------------- (d) analytic = Tweedie


def test_analytic_step_is_the_tweedie_distribution_for_a_subs_score():
    """SEDD's step for the SUBS score p(y | xt) alpha_t / (1 - alpha_t): a token y w.p.
    p(y | xt) (alpha_s - alpha_t) / (1 - alpha_t), stay masked w.p. (1 - alpha_s) /
    (1 - alpha_t), i.e. the ddpm / tweedie step written with the reveal decision inside."""
    torch.manual_seed(0)
    logits = 3 * torch.randn(7, V, dtype=torch.float64)  # as the sampler passes them
    for noise in (LogLinear(), Cosine(), Linear()):
        for t, s in [(1.0, 0.9), (0.6, 0.55), (0.1, 1e-5)]:
            t, s = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
            a_t, a_s = noise.alpha(t), noise.alpha(s)
            analytic = samplers.analytic_step_probs(SUBS_SCORE(logits, a_t), a_t, a_s)
            reveal = float(noise.unmask_prob(t, s))
            tweedie = torch.cat(
                [reveal * torch.softmax(logits.double(), -1),
                 torch.full((7, 1), 1 - reveal, dtype=torch.float64)], -1,
            )  # fmt: skip
            torch.testing.assert_close(analytic, tweedie, rtol=1e-10, atol=1e-12)


def test_the_analytic_sampler_draws_from_the_analytic_step():
    """One step 1 -> 0.5, no noise removal: per position, the frequencies of each token
    and of "still [MASK]" over 8000 rows match analytic_step_probs within 5 standard errors."""
    torch.manual_seed(1)
    table = torch.randn(3, V + 1)
    table[:, V] = 30.0  # the [MASK] logit: never drawn
    denoise = lambda xt, sigma, z, out_mask: table.expand(xt.shape[0], -1, -1)[out_mask]  # noqa: E731
    n = 8000
    x, _ = run(denoise, all_mask(n, 3), "analytic", steps=1, eps=0.5, noise_removal=False)
    noise = LogLinear()
    a_t, a_s = noise.alpha(torch.tensor(1.0)), noise.alpha(torch.tensor(0.5))
    p = samplers.analytic_step_probs(SUBS_SCORE(table[:, :V], a_t), a_t, a_s)  # (3, V + 1)
    freq = torch.stack([torch.bincount(x[:, i], minlength=V + 1) for i in range(3)]) / n
    tol = 5 * (p * (1 - p) / n).sqrt()
    assert ((freq.double() - p).abs() < tol).all(), (freq, p)
    assert 0.45 < float(p[0, V]) < 0.55  # half stays masked: the reveal is inside the draw


# ------------------------------------------------- (e) conditioning, top-k, the latent


@pytest.mark.parametrize("fixz", [True, False])
@pytest.mark.parametrize("rule", ["tweedie", "euler", "analytic"])
def test_given_tokens_are_kept_and_every_drawn_token_is_in_the_top_k(rule, fixz):
    """Given positions (a prefix, a span, a suffix) are never changed nor projected; with
    top_k=2 every token comes from the two largest logits of its position (the logits of
    this stub depend on the position only), and without the filter others do appear."""
    torch.manual_seed(2)
    B, L = 64, 10
    table = 0.3 * torch.randn(L, V + 1)  # flat: unfiltered draws hit all V tokens
    table[:, V] = 30.0
    denoise = lambda xt, sigma, z, out_mask: table.expand(xt.shape[0], -1, -1)[out_mask]  # noqa: E731
    fixed = torch.zeros(L, dtype=torch.bool)
    fixed[:2] = fixed[4:6] = fixed[-1] = True
    x_init = all_mask(B, L)
    x_init[:, fixed] = torch.randint(0, V, (B, int(fixed.sum())))
    top2 = table[:, :V].topk(2, -1).indices  # (L, 2)
    for top_k in (2, 0):
        calls = []
        x, _ = run(recording(denoise, calls), x_init, rule, seed=5, steps=6, eps=0.3,
                   top_k=top_k, latent_from_g=True, fixz=fixz)  # fmt: skip
        assert torch.equal(x[:, fixed], x_init[:, fixed])
        assert not (x == MASK).any() and all(not (m[:, fixed]).any() for _, m in calls)
        in_top2 = (x[:, :, None] == top2[None]).any(-1)[:, ~fixed]
        assert bool(in_top2.all()) == (top_k == 2)


@pytest.mark.parametrize("rule", ["tweedie", "euler", "analytic"])
def test_a_time_conditioned_model_gets_the_sigma_of_each_step(rule):
    """Step i feeds sigma(t_i) = -log alpha(t_i); tweedie / euler make exactly `steps`
    calls (the last reveals all), analytic may add its noise removal at sigma(eps)."""
    calls, steps, eps = [], 4, 1e-5
    run(sigma_recorder(calls), all_mask(3, 6), rule, steps=steps, eps=eps, seed=2,
        time_conditioning=True)  # fmt: skip
    grid = [1.0 - i * (1.0 - eps) / steps for i in range(steps + 1)]
    assert len(calls) == steps if rule != "analytic" else len(calls) in (steps, steps + 1)
    for call, t in zip(calls, grid[:steps] + [grid[-1]], strict=False):
        want = -math.log(1.0 - (1.0 - 1e-3) * t)
        torch.testing.assert_close(call, torch.full((3,), want), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- the registry wiring


def fake_module(table, log_score):
    """What predictors.py reads of a module: a position-only 'network', no latent."""
    backbone = lambda xt, sigma, out_mask, fp32_logits: table.expand(xt.shape[0], -1, -1)[out_mask]  # noqa: E731, E501
    cfg = OmegaConf.create({"sampling": {"eps": 0.3, "noise_removal": True},
                            "time_conditioning": False})  # fmt: skip
    algorithm = SimpleNamespace(latent_shape=lambda length: None, log_score=log_score)
    return SimpleNamespace(vocab=SimpleNamespace(mask_id=MASK, size=V), cfg=cfg, backbone=backbone,
                           spec=SimpleNamespace(noise=Cosine()), algorithm=algorithm,
                           device=torch.device("cpu"))  # fmt: skip


def test_the_registered_predictors_run_their_rule_with_the_algorithms_score():
    """tweedie / euler / analytic run sample_masked with their update, final step and (for
    analytic) the module's Algorithm.log_score; each is cached and fits VADD and MDLM.
    eps = 0.3 leaves masks for the last step, so a final step swapped shows; the cosine
    schedule, since for the log-linear one the Euler rate dt / t is the exact reveal
    probability (alpha is linear in t) and euler == tweedie."""
    torch.manual_seed(3)
    table = torch.randn(6, V + 1)
    score = lambda logits, a: SUBS_SCORE(logits, a) + torch.arange(V) / 2  # noqa: E731  not SUBS
    module = fake_module(table, score)
    denoise = lambda xt, sigma, z, out_mask: table.expand(xt.shape[0], -1, -1)[out_mask]  # noqa: E731
    direct = {}
    for rule in RULES:
        direct[rule] = run(denoise, all_mask(8, 6), rule, seed=4, steps=5, eps=0.3, noise=Cosine(),
                           log_score=score if rule == "analytic" else None)[0]  # fmt: skip
    for name in ("tweedie", "euler", "analytic"):
        pred = predictors.get_predictor(name)
        assert (pred.family, pred.needs_latent, pred.fixz, pred.cached) == (
            "diffusion", False, True, True)  # fmt: skip
        x, stats = pred.run(module, all_mask(8, 6), steps=5, fixz=True, top_k=0, top_p=1.0,
                            generator=torch.Generator().manual_seed(4))  # fmt: skip
        assert torch.equal(x, direct[name]), name
        assert {"steps", "network_calls", "nfe_per_sequence"} <= set(stats)
    for a, b in [("tweedie", "euler"), ("tweedie", "ddpm"), ("analytic", "ddpm")]:
        assert not torch.equal(direct[a], direct[b])  # the rules tell apart at this seed


# ------------------------------------------------------------------- (f) semi-AR


@pytest.mark.parametrize("rule", ["ddpm", "tweedie", "euler", "analytic"])
def test_semi_ar_windows_keep_the_previous_tokens_and_make_the_longer_row(rule):
    """num_strides windows of L, each slid by stride: L + (n - 1) stride tokens; a
    window's first L - stride positions are the last window's tail and come back unchanged;
    the first window's given tokens (BOS + a prefix) open the row."""
    _, denoise = gendit_denoiser(seed=6)
    B, L, stride, n = 3, 8, 3, 4
    g = torch.Generator().manual_seed(1)
    windows = []

    def window(x_init):
        x, stats = samplers.sample_masked(
            denoise, x_init, mask_id=MASK, vocab_size=V, noise=LogLinear(), steps=5,
            generator=g, update=RULES[rule][0], final=RULES[rule][1],
            log_score=SUBS_SCORE if rule == "analytic" else None,
        )  # fmt: skip
        windows.append((x_init, x, stats.as_dict(B)))
        return x, stats.as_dict(B)

    first = all_mask(B, L)
    first[:, :3] = torch.tensor([0, 4, 2])  # BOS and a two-token prefix
    x, stats = samplers.sample_semi_ar(window, first, stride_length=stride, num_strides=n,
                                       mask_id=MASK)  # fmt: skip
    assert x.shape == (B, L + (n - 1) * stride) and not (x == MASK).any()
    assert torch.equal(x[:, :3], first[:, :3])
    assert len(windows) == n and stats["windows"] == n
    for k, (x_init, out, _) in enumerate(windows):
        given = x_init != MASK
        assert torch.equal(out[given], x_init[given])  # never changed by the sampler
        assert torch.equal(x[:, k * stride : k * stride + L], out)  # it is in the row
        if k:
            prev = windows[k - 1][1]
            assert torch.equal(x_init[:, : L - stride], prev[:, stride:])  # the kept tokens
            assert (x_init[:, L - stride :] == MASK).all()  # the freed tail is [MASK]
    for key in ("nfe_per_sequence", "network_calls", "steps"):  # summed over the windows
        assert stats[key] == pytest.approx(sum(w[2][key] for w in windows))
    with pytest.raises(ValueError, match="stride_length=9"):
        samplers.sample_semi_ar(window, first, stride_length=9, num_strides=2, mask_id=MASK)


def test_sample_eval_semi_ar_writes_the_longer_samples_with_the_prefix(tmp_path):
    """train 2 steps, then mode=sample_eval with sampling.semi_ar: the JSON names the
    windows, the file tag differs, rows are L + (n - 1) stride long, open with BOS and the
    prefix, and are scored (unigram entropy)."""
    common = [*MICRO_MODEL, "loader.global_batch_size=4", "loader.eval_batch_size=2",
              "trainer.limit_val_batches=1", "model.length=16"]  # fmt: skip
    run_job(tmp_path, *common, "trainer.max_steps=2", "trainer.val_check_interval=2",
            "callbacks.checkpoint_every_n_steps.every_n_train_steps=2")  # fmt: skip
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cfg = run_job(
        tmp_path, *common, "mode=sample_eval", f"eval.checkpoint_path={ckpt}",
        "sampling.predictor=tweedie", "sampling.steps=4", "sampling.num_sample_batches=1",
        "sampling.semi_ar=True", "sampling.stride_length=6", "sampling.num_strides=3",
        "sampling.prefix='In the beginning'",
    )  # fmt: skip
    (path,) = tmp_path.glob("samples_tweedie_T4_semiar6x3_fixzTrue_seed1_cond??????.json")
    saved = json.loads(path.read_text())
    assert (saved["semi_ar"], saved["stride_length"], saved["num_strides"]) == (True, 6, 3)
    tokens = torch.tensor(saved["token_ids"])
    assert tokens.shape == (2, 16 + 2 * 6) == (2, saved["length"])
    assert saved["unigram_entropy"] is not None and saved["nfe_per_sequence"] > 0
    tokenizer = dataloader.get_tokenizer(cfg.data)
    prefix = tokenizer.encode("In the beginning", add_special_tokens=False)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tokens[:, 1 : 1 + len(prefix)] == torch.tensor(prefix)).all()
    # no EOS at L - 1 (wrapped data's frame): it would stay inside the longer row
    assert saved["conditioning"]["given_positions"] == 1 + len(prefix)
    assert path.with_suffix(".txt").read_text().startswith("[[In the beginning")


# ---------------------------------------------------------------- (g) config rules


@pytest.fixture(scope="module")
def sample_eval_cfg(tmp_path_factory):
    """One composed mode=sample_eval config (VADD, bible, model.length=64); each case
    changes plain keys of a copy (composing costs a few tenths of a second)."""
    tmp = tmp_path_factory.mktemp("cfg")
    (tmp / "x.ckpt").write_bytes(b"")
    return make_cfg(tmp, "mode=sample_eval", f"eval.checkpoint_path={tmp / 'x.ckpt'}")


def with_values(cfg, values: dict):
    cfg = copy.deepcopy(cfg)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


AR = {"backbone": "ar", "parameterization": "ar"}
SEMI = {"sampling.semi_ar": True}


@pytest.mark.parametrize(
    "values,message",
    [
        ({**AR, "sampling.predictor": "tweedie"},
         "sampling.predictor=tweedie is for diffusion models, and parameterization=ar is not "
         "one: set sampling.predictor=ar"),
        ({**AR, **SEMI}, "parameterization=ar decodes left to right"),
        ({**SEMI, "sampling.predictor": "any_order"},
         "does not combine with sampling.predictor=any_order"),
        ({**SEMI, "sampling.stride_length": 0},
         "sampling.stride_length=0 must be an integer in [1, 63]"),
        ({**SEMI, "sampling.stride_length": 64},
         "sampling.stride_length=64 must be an integer in [1, 63]"),
        ({**SEMI, "sampling.stride_length": 65, "sampling.frame": "none"},
         "sampling.stride_length=65 must be an integer in [1, 64]"),
        ({**SEMI, "sampling.num_strides": 0}, "sampling.num_strides=0 must be an integer >= 1"),
        ({**SEMI, "sampling.suffix": "end"}, "only a prefix is supported"),
        ({**SEMI, "sampling.template": "a [MASK]"}, "only a prefix is supported"),
    ],
)  # fmt: skip
def test_config_check_refuses_bad_semi_ar_and_sampler_choices(sample_eval_cfg, values, message):
    with pytest.raises(ConfigError) as err:
        validate_config(with_values(sample_eval_cfg, values))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_check_refuses_semi_ar_on_data_it_cannot_score(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"")
    cfg = make_cfg(tmp_path, "mode=sample_eval", f"eval.checkpoint_path={tmp_path / 'x.ckpt'}",
                   "data=verse_set", "recipe=verse_set", "sampling.semi_ar=True")  # fmt: skip
    with pytest.raises(ConfigError, match=r"data=verse_set \(set data\) cannot score"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "values",
    [
        {"sampling.predictor": "tweedie", "sampling.fixz": False},
        {"training.loss_type": "mdlm", "sampling.predictor": "analytic"},
        {"training.loss_type": "mdlm", "sampling.predictor": "euler", "time_conditioning": True},
        {**SEMI, "sampling.stride_length": 63, "sampling.num_strides": 4,
         "sampling.predictor": "euler", "sampling.prefix": "In the"},
        {**SEMI, "sampling.stride_length": 64, "sampling.frame": "none"},
    ],
)  # fmt: skip
def test_config_check_accepts_the_new_samplers(sample_eval_cfg, values):
    validate_config(with_values(sample_eval_cfg, values))


def test_the_analytic_chain_ends_with_a_draw_from_the_score_not_its_argmax():
    """SEDD's Denoiser samples the last step from the score (its argmax is commented out
    in SEDD's sampling.py); MDLM's noise removal (ddpm) takes the argmax."""
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04], dtype=torch.float64)

    def fixed(xt, sigma, z, out_mask):  # p(x0 | xt) = probs at every position
        return probs.log().float().expand(int(out_mask.sum()), V).clone()

    x_init = all_mask(4000, 2)
    # one step from t = 1 to s = 0.9999 reveals about 1e-4: the last step draws the rest
    x, _ = run(fixed, x_init, "analytic", steps=1, eps=0.9999)
    freq = torch.bincount(x.flatten(), minlength=V).double() / x.numel()
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / x.numel())
    greedy, _ = run(fixed, x_init, "ddpm", steps=1, eps=0.9999)
    assert (greedy == 0).float().mean() > 0.99


def test_analytic_step_probs_for_per_row_alphas_and_an_unnormalised_score():
    """An independent float64 computation of SEDD's step: per-row alphas (N,), a score
    whose weights exceed 1 in some rows (stay clamps to 0, the row renormalises), and
    python-float alphas so close that float32 would lose the ratio's digits."""
    torch.manual_seed(2)
    score = 2 * torch.randn(6, V, dtype=torch.float64)
    a_t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.2, 0.05])
    a_s = torch.tensor([0.9, 0.31, 0.6, 0.99, 0.95, 0.06])
    got = samplers.analytic_step_probs(score, a_t, a_s)
    ratio = a_s.double() / a_t.double() - 1.0
    for i in range(6):
        w = [math.exp(float(score[i, y])) * float(ratio[i]) for y in range(V)]
        row = [*w, max(0.0, 1.0 - sum(w))]
        want = torch.tensor(row, dtype=torch.float64) / sum(row)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-15)
    assert (got[:, V] == 0).any() and (got[:, V] > 0).any()  # both kinds of row occur
    a_t, a_s = 0.123456789012, 0.123456789112  # a_s / a_t - 1 ~ 8e-10
    got = samplers.analytic_step_probs(score[:1], a_t, a_s)
    w = score[0].exp() * (a_s / a_t - 1.0)
    torch.testing.assert_close(got[0, :V], w, rtol=1e-9, atol=0)  # stay takes the rest


@pytest.mark.parametrize("rule, message", [
    (dict(update="nope"), r"update='nope', final='argmax': use one of \('tweedie'"),
    (dict(final="nope"), r"update='tweedie', final='nope': use one of"),
    (dict(update="analytic", final="sample", log_score=SUBS_SCORE),
     r"^update='analytic' ends with final='argmax' \(SEDD's denoiser step\)$"),
    (dict(update="analytic"), r"^update='analytic' needs log_score \(Algorithm.log_score\)$"),
])  # fmt: skip
def test_a_rule_the_sampler_cannot_run_is_refused_by_name(rule, message):
    with pytest.raises(ValueError, match=message):
        samplers.sample_masked(lambda *a: None, all_mask(1, 2), mask_id=MASK, vocab_size=V,
                               noise=LogLinear(), steps=1, **rule)  # fmt: skip


def test_the_analytic_chain_and_its_last_draw_use_the_generator_and_top_p():
    """eps = 0.5 leaves about half the positions to the final draw. Its samples depend on
    the sampler's generator only (not the global RNG); top_p ~ 0 keeps the top token
    in the steps and in the final draw."""
    torch.manual_seed(3)
    table = torch.randn(4, V)

    def fixed(xt, sigma, z, out_mask):
        return table.expand(xt.shape[0], -1, -1)[out_mask]

    x_init = all_mask(300, 4)
    torch.manual_seed(0)
    first, _ = run(fixed, x_init, "analytic", steps=2, eps=0.5)
    torch.manual_seed(1)
    again, _ = run(fixed, x_init, "analytic", steps=2, eps=0.5)
    assert torch.equal(first, again) and (first != MASK).all()
    top, _ = run(fixed, x_init, "analytic", steps=2, eps=0.5, top_p=1e-9)
    assert torch.equal(top, table.argmax(-1).expand(300, -1))

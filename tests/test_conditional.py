"""Conditional sampling (prefix / suffix / template infilling), top-k / top-p and RADD's
any-order autoregressive sampler, from the pure functions up to `sample_eval`."""

import json
import math
import os

import pytest
import torch
from omegaconf import OmegaConf
from test_end_to_end import build, make_cfg  # sibling module: tests/ is on sys.path

import dataloader
import runner
from config_check import ConfigError, validate_config
from diffusion import Diffusion, Vocab
from evaluation.jobs import run_sample_eval
from models.dit import GenDIT
from noise_schedule import LogLinear
from sampling import samplers
from sampling.generation import conditioning_from_text, generate, parse_template

V = 6  # real tokens 0..5
MASK = V


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are tiny: a second intra-op thread only adds synchronisation, which
    costs seconds per test on a busy machine. Restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def all_mask(b: int, length: int) -> torch.Tensor:
    return torch.full((b, length), MASK, dtype=torch.long)


def with_given(b: int, length: int, given: list[int], seed: int = 0) -> torch.Tensor:
    """All-[MASK] rows with random real tokens at the `given` positions (same in every row)."""
    x = all_mask(b, length)
    g = torch.Generator().manual_seed(seed)
    x[:, given] = torch.randint(0, V, (len(given),), generator=g)
    return x


def gendit_denoiser(seed: int = 0, length: int = 12):
    """A randomly initialised tiny GenDIT: logits depend on the context and on z."""
    cfg = OmegaConf.create(
        dict(hidden_size=16, cond_dim=8, n_heads=2, n_blocks=1, length=length, dropout=0.0,
             latent_dim=4, latentMLP=True, latent1d=True, latent_struc="adaln",
             vocab_multiple=1, gelu="auto")
    )  # fmt: skip
    torch.manual_seed(seed)
    net = GenDIT(cfg, V + 1).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return lambda xt, sigma, z, out_mask: net(xt, sigma, z=z, out_mask=out_mask)


def recording(denoise, calls: list):
    """Wrap a denoiser to record (out_mask, logits, sigma, z) of every call."""

    def wrapped(xt, sigma, z, out_mask):
        logits = denoise(xt, sigma, z, out_mask)
        calls.append((out_mask.clone(), logits.clone(), sigma.clone(), z))
        return logits

    return wrapped


def latent_gen(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda n: torch.randn(n, 4, generator=g)


# ------------------------------------------------------------------------ filter_logits


def brute_force_nucleus(probs: list[float], top_p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_top_k_keeps_exactly_the_k_largest_logits():
    torch.manual_seed(0)
    logits = torch.randn(20, 9)
    for k in (1, 3, 8):
        out = samplers.filter_logits(logits, top_k=k)
        for row, row_out in zip(logits, out, strict=True):
            assert kept(row_out) == set(row.topk(k).indices.tolist())
            assert torch.equal(row_out[torch.isfinite(row_out)], row[torch.isfinite(row_out)])
    assert torch.equal(samplers.filter_logits(logits, top_k=0), logits)  # off
    assert torch.equal(samplers.filter_logits(logits, top_k=9), logits)  # k >= V: all kept


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_top_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)  # sorted: 1, 3, 2, 0
    logits = probs.log()[None]
    expected = {0.45: {1}, 0.55: {1, 3}, 0.9: {1, 3, 2}, 0.97: {0, 1, 2, 3}, 1e-9: {1}}
    for top_p, keep in expected.items():
        assert kept(samplers.filter_logits(logits, top_p=top_p)[0]) == keep, top_p
    assert torch.equal(samplers.filter_logits(logits, top_p=1.0), logits)  # off
    torch.manual_seed(1)
    rows = 2.0 * torch.randn(50, 12)
    for top_p in (0.3, 0.7, 0.95):
        out = samplers.filter_logits(rows, top_p=top_p)
        for row, row_out in zip(rows, out, strict=True):
            p = torch.softmax(row.double(), -1).tolist()
            assert kept(row_out) == brute_force_nucleus(p, top_p)


def test_top_p_applies_to_the_mass_renormalised_after_top_k():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # Alone, top_p=0.6 needs two tokens (0.5 < 0.6); after top_k=2 the first has 0.625.
    assert kept(samplers.filter_logits(logits, top_p=0.6)[0]) == {0, 1}
    assert kept(samplers.filter_logits(logits, top_k=2, top_p=0.6)[0]) == {0}


def test_filtered_gumbel_argmax_uses_the_same_float64_noise_and_follows_the_kept_softmax():
    torch.manual_seed(2)
    logits = torch.randn(300, 7)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = samplers.gumbel_argmax(logits, g1, top_k=3, top_p=0.8)
    u = torch.rand(logits.shape, generator=g2, dtype=torch.float64)
    filtered = samplers.filter_logits(logits.double(), top_k=3, top_p=0.8)
    assert torch.equal(got, (filtered - torch.log(-torch.log(u))).argmax(-1))
    # Frequencies: only the top 2 tokens, in the ratio of their probabilities.
    row = torch.tensor([1.0, 0.2, -0.5, 0.0, 0.6], dtype=torch.float64)
    n = 40_000
    draws = samplers.gumbel_argmax(row.expand(n, -1), torch.Generator().manual_seed(0), top_k=2)
    freq = torch.bincount(draws, minlength=5).double() / n
    p = torch.zeros(5, dtype=torch.float64)
    p[[0, 4]] = torch.softmax(row[[0, 4]], -1)
    assert ((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)


# --------------------------------------------------------------- greedy with top-k / p


def row_tagged_latent(n: int) -> torch.Tensor:
    """z (n, 4) whose column 0 is the row index, so a call on a subset of rows names them."""
    return torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 3)], 1)


@pytest.mark.parametrize("sampler", ["masked", "masked_cache", "any_order", "random_order"])
@pytest.mark.parametrize("filt", [{"top_k": 1}, {"top_p": 1e-9}])
def test_top_k_one_and_tiny_top_p_make_the_sampler_greedy(sampler, filt):
    """Every revealed token is the argmax of the logits the network returned for it."""
    B, L = 3, 10
    calls = []
    denoise = recording(gendit_denoiser(seed=3, length=L), calls)
    x_init = with_given(B, L, [0, 4])
    g = torch.Generator().manual_seed(0)
    common = dict(mask_id=MASK, vocab_size=V, latent=row_tagged_latent, generator=g, **filt)
    if sampler.startswith("masked"):
        cache = sampler == "masked_cache"
        x, _ = samplers.sample_masked(
            denoise, x_init, noise=LogLinear(), steps=5, cache=cache, **common
        )
    else:
        order = "random" if sampler == "random_order" else "left_to_right"
        x, _ = samplers.sample_any_order(denoise, x_init, order=order, **common)
    seen = torch.zeros(B, L, dtype=torch.bool)
    for out_mask, logits, _, z in calls:
        revealed = torch.zeros(B, L, dtype=torch.bool)
        revealed[z[:, 0].long()] = out_mask  # the rows this call was given
        assert torch.equal(x[revealed], logits[:, :V].argmax(-1))
        seen |= revealed
    assert torch.equal(seen, x_init == MASK)


def test_sample_autoregressive_with_top_k_one_is_greedy_and_keeps_given_tokens():
    L, bos = 8, 0
    table = torch.randn(L, V + 1)

    def logits_fn(prefix):  # depends on the position only
        return table[: prefix.shape[1]].expand(prefix.shape[0], -1, -1)

    x_init = all_mask(2, L)
    x_init[:, 0], x_init[:, 3] = bos, 5
    g = torch.Generator().manual_seed(0)
    x = samplers.sample_autoregressive(
        logits_fn, 2, L, bos_id=bos, vocab_size=V, generator=g, top_k=1, x_init=x_init,
        mask_id=MASK,
    )  # fmt: skip
    greedy = table[:-1, :V].argmax(-1)  # the logits at i-1 predict token i
    expected = torch.cat([torch.tensor([bos]), greedy])
    expected[3] = 5
    assert torch.equal(x, expected.expand(2, -1))


@pytest.mark.parametrize("fixz", [True, False])
def test_cache_and_no_cache_give_identical_samples_with_top_p_and_top_k(fixz):
    outs = {}
    for cache in (False, True):
        g = torch.Generator().manual_seed(7)
        outs[cache] = samplers.sample_masked(
            gendit_denoiser(seed=4, length=8), all_mask(4, 8), mask_id=MASK, vocab_size=V,
            noise=LogLinear(), steps=32, cache=cache, latent=latent_gen(123), fixz=fixz,
            top_p=0.9, top_k=4, generator=g,
        )  # fmt: skip
    (x_nc, s_nc), (x_c, s_c) = outs[False], outs[True]
    assert torch.equal(x_nc, x_c)
    assert not (x_c == MASK).any()
    assert s_c.row_evals < s_nc.row_evals


# ---------------------------------------------------------------------- any-order AR


def test_any_order_left_to_right_reveals_one_free_position_per_call_in_increasing_order():
    B, L = 3, 12
    given = [0, 1, 5, 6, 11]  # prefix, interior span, suffix
    free = [i for i in range(L) if i not in given]
    calls = []
    x_init = with_given(B, L, given)
    x, stats = samplers.sample_any_order(
        recording(gendit_denoiser(seed=5, length=L), calls), x_init,
        mask_id=MASK, vocab_size=V, order="left_to_right", generator=torch.Generator(),
    )  # fmt: skip
    assert stats.network_calls == len(calls) == len(free) == stats.steps
    revealed = []
    for out_mask, *_ in calls:
        assert out_mask.shape == (B, L) and (out_mask.sum(1) == 1).all()
        assert (out_mask == out_mask[:1]).all()  # the same position in every row
        revealed.append(int(out_mask[0].nonzero()))
    assert revealed == free
    assert torch.equal(x[:, given], x_init[:, given]) and not (x == MASK).any()


def test_any_order_random_reveals_each_free_position_exactly_once_in_a_random_order():
    B, L = 6, 10
    given = [0, 9]
    calls = []
    x, stats = samplers.sample_any_order(
        recording(gendit_denoiser(seed=6, length=L), calls), with_given(B, L, given),
        mask_id=MASK, vocab_size=V, order="random", generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert stats.network_calls == L - len(given)
    order = torch.stack([out_mask.long().argmax(1) for out_mask, *_ in calls], 1)  # (B, n)
    for row in order.tolist():
        assert sorted(row) == list(range(1, L - 1))  # a permutation of the free positions
    assert len({tuple(r) for r in order.tolist()}) > 1  # rows have their own orders
    assert any(r != sorted(r) for r in order.tolist())
    assert not (x == MASK).any()


def test_any_order_rows_with_fewer_free_positions_leave_the_batch_early():
    L = 8
    x_init = all_mask(3, L)
    x_init[1, :5] = 2  # row 1: 3 free, row 2: none, row 0: all 8
    x_init[2] = 1
    calls = []
    x, stats = samplers.sample_any_order(
        recording(gendit_denoiser(seed=7, length=L), calls), x_init, mask_id=MASK, vocab_size=V
    )
    assert stats.network_calls == 8 and stats.row_evals == 8 + 3
    assert [c[0].shape[0] for c in calls] == [2, 2, 2, 1, 1, 1, 1, 1]
    assert torch.equal(x[x_init != MASK], x_init[x_init != MASK]) and not (x == MASK).any()


@pytest.mark.parametrize("fixz", [True, False])
def test_any_order_draws_z_once_or_at_every_call(fixz):
    draws, calls = [], []

    def latent(n):
        draws.append(n)
        return torch.randn(n, 4)

    samplers.sample_any_order(
        recording(gendit_denoiser(seed=8, length=6), calls), all_mask(2, 6),
        mask_id=MASK, vocab_size=V, latent=latent, fixz=fixz,
    )  # fmt: skip
    zs = [z for *_, z in calls]
    assert len(draws) == (1 if fixz else 6)
    assert all(torch.equal(z, zs[0]) for z in zs) == fixz


def test_any_order_sigma_follows_the_visible_fraction_for_time_conditioned_models():
    calls = []
    noise = LogLinear()
    samplers.sample_any_order(
        recording(gendit_denoiser(seed=9, length=4), calls), all_mask(2, 4),
        mask_id=MASK, vocab_size=V, noise=noise,
    )  # fmt: skip
    sigmas = [float(sigma[0]) for _, _, sigma, _ in calls]
    alpha_1 = float(noise.alpha(torch.tensor(1.0)))
    expected = [-math.log(alpha_1), -math.log(1 / 4), -math.log(2 / 4), -math.log(3 / 4)]
    assert sigmas == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------- conditioning from text


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One data cache for the module, so the Bible BPE is trained once (make_cfg reads it)."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("VADD_CACHE_DIR"):
            mp.setenv("VADD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield os.environ["VADD_CACHE_DIR"]


@pytest.fixture(scope="module")
def gpt2(cache_dir):
    data = OmegaConf.load("configs/data/bible-gpt2.yaml")
    data.cache_dir = cache_dir
    return dataloader.get_tokenizer(data)


@pytest.fixture(scope="module")
def bible(cache_dir, tmp_path_factory):
    """The default data config's tokenizer: a 2048-token byte-level BPE (cheap to sample)."""
    return dataloader.get_tokenizer(make_cfg(tmp_path_factory.mktemp("bible")).data)


@pytest.fixture(params=["gpt2", "bible"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


PREFIX = "In the beginning God created"
SUFFIX = " the heaven and the earth."
TEMPLATE = "And God said[MASK:3] there be light:[MASK:4] there was light."


def test_prefix_and_suffix_sit_inside_the_bos_eos_frame_and_round_trip(tokenizer):
    L, mask_id = 32, len(tokenizer)
    text = dict(prefix=PREFIX, suffix=SUFFIX)
    x = conditioning_from_text(tokenizer, L, **text, mask_id=mask_id, eos=True)
    pre = tokenizer.encode(PREFIX, add_special_tokens=False)
    suf = tokenizer.encode(SUFFIX, add_special_tokens=False)
    assert x.shape == (L,) and x.dtype == torch.long
    assert int(x[0]) == tokenizer.bos_token_id and int(x[-1]) == tokenizer.eos_token_id
    assert x[1 : 1 + len(pre)].tolist() == pre
    assert x[L - 1 - len(suf) : L - 1].tolist() == suf
    assert tokenizer.decode(x[1 : 1 + len(pre)]) == PREFIX
    assert tokenizer.decode(x[L - 1 - len(suf) : L - 1]) == SUFFIX
    assert int((x == mask_id).sum()) == L - 2 - len(pre) - len(suf)
    no_eos = conditioning_from_text(tokenizer, L, suffix=SUFFIX, mask_id=mask_id)
    assert no_eos[L - len(suf) :].tolist() == suf and (no_eos[1 : L - len(suf)] == mask_id).all()


def test_template_is_tokenised_piecewise_with_free_spans_and_a_free_tail(tokenizer):
    pieces = ["And God said", 3, " there be light:", 4, " there was light."]
    assert parse_template(TEMPLATE) == pieces
    assert parse_template("[MASK] a [MASK]") == [1, " a ", 1]
    L, mask_id = 40, len(tokenizer)
    x = conditioning_from_text(tokenizer, L, template=TEMPLATE, mask_id=mask_id).tolist()
    assert x[0] == tokenizer.bos_token_id
    pos = 1
    for piece in parse_template(TEMPLATE):
        if isinstance(piece, int):
            assert x[pos : pos + piece] == [mask_id] * piece
            pos += piece
        else:
            ids = tokenizer.encode(piece, add_special_tokens=False)
            assert x[pos : pos + len(ids)] == ids and tokenizer.decode(ids) == piece
            pos += len(ids)
    assert pos < L and x[pos:] == [mask_id] * (L - pos)  # the rest is free


def test_conditioning_that_does_not_fit_names_both_lengths(gpt2):
    pieces = parse_template(TEMPLATE)
    n = sum(p if isinstance(p, int) else len(gpt2.encode(p)) for p in pieces)  # text + spans
    with pytest.raises(ConfigError, match=rf"takes {n} tokens \({n + 1} with BOS.*model.length=8"):
        conditioning_from_text(gpt2, 8, template=TEMPLATE, mask_id=len(gpt2))
    with pytest.raises(ConfigError, match=r"prefix \+ sampling.suffix takes .* model.length=8"):
        conditioning_from_text(gpt2, 8, prefix=PREFIX, suffix=SUFFIX, mask_id=len(gpt2))
    with pytest.raises(ConfigError, match=r"malformed mask in .*\[MASK:x\]"):
        conditioning_from_text(gpt2, 64, template="a [MASK:x] b", mask_id=len(gpt2))
    with pytest.raises(ConfigError, match="template is set together with"):
        conditioning_from_text(gpt2, 64, template="a [MASK]", prefix="b", mask_id=len(gpt2))


# ---------------------------------------------- infilling through generate (all predictors)


@pytest.fixture(scope="module")
def modules(bible, tmp_path_factory):
    """Tiny randomly initialised VADD and MDLM modules over the Bible BPE vocabulary."""
    tmp = tmp_path_factory.mktemp("mods")
    out = {}
    for loss_type in ("vae", "mdlm"):
        cfg = make_cfg(
            tmp, f"training.loss_type={loss_type}", "model.length=32", "model.hidden_size=16",
            "model.cond_dim=8", "model.n_blocks=1", "model.latent_dim=4", "eval.disable_ema=True",
            "sampling.eps=0.2",  # leaves masks for the final greedy step to fill
        )  # fmt: skip
        runner.derive_batch_sizes(cfg, 1)
        module = Diffusion(cfg, Vocab.from_tokenizer(bible))
        torch.manual_seed(0)
        with torch.no_grad():
            for p in module.backbone.parameters():
                p.copy_(0.3 * torch.randn_like(p))
        out[loss_type] = module
    return out


CASES = [  # (model, predictor, fixz, order)
    ("vae", "vae", True, "left_to_right"),
    ("vae", "vae", False, "left_to_right"),
    ("vae", "vae_cache", True, "left_to_right"),
    ("vae", "ddpm_cache", True, "left_to_right"),
    ("vae", "any_order", True, "left_to_right"),
    ("vae", "any_order", False, "random"),
    ("mdlm", "ddpm", True, "left_to_right"),
    ("mdlm", "ddpm_cache", True, "left_to_right"),
    ("mdlm", "any_order", True, "random"),
    ("vae", "tweedie", False, "left_to_right"),  # RADD's and SEDD's samplers (issue 16)
    ("vae", "analytic", True, "left_to_right"),
    ("mdlm", "euler", True, "left_to_right"),
    ("mdlm", "analytic", True, "left_to_right"),
]


@pytest.mark.parametrize("loss_type,predictor,fixz,order", CASES)
@pytest.mark.parametrize("kind", ["prefix_suffix", "template"])
def test_infilling_never_changes_given_tokens(
    modules, bible, loss_type, predictor, fixz, order, kind
):
    module, L, mask_id = modules[loss_type], 32, len(bible)
    text = (
        dict(prefix=PREFIX, suffix=SUFFIX) if kind == "prefix_suffix" else dict(template=TEMPLATE)
    )
    cond = conditioning_from_text(bible, L, mask_id=mask_id, eos=True, **text)
    x_init = cond.repeat(2, 1)
    x, stats = generate(
        module, num_samples=2, predictor=predictor, steps=6, fixz=fixz, x_init=x_init,
        generator=torch.Generator().manual_seed(0), order=order, top_p=0.95,
    )  # fmt: skip
    given = cond != mask_id
    assert x.shape == (2, L)
    assert torch.equal(x[:, given], x_init[:, given])  # every given token, exactly
    assert not (x == mask_id).any() and int(x.max()) < mask_id
    if predictor == "any_order":
        assert stats["steps"] == int((~given).sum()) == stats["nfe_per_sequence"]
    if kind == "template":  # the given text reads back in order around the infilled spans
        text = bible.decode(x[0])
        pieces = [p for p in parse_template(TEMPLATE) if isinstance(p, str)]
        starts = [text.index(p) for p in pieces]
        assert starts == sorted(starts), (text, pieces)


# ----------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sampling.top_p=0"], "sampling.top_p=0 must be a number in (0, 1]"),
        (["sampling.top_p=1.5"], "sampling.top_p=1.5 must be a number in (0, 1]"),
        (["sampling.top_k=-1"], "sampling.top_k=-1 is out of range"),
        (["sampling.top_k=2.5"], "sampling.top_k=2.5 must be an integer"),
        (["sampling.order=rand"], "did you mean sampling.order=random"),
        (["sampling.prefix=123"], "sampling.prefix=123 must be text or null"),
        (["sampling.template='a [MASK]'", "sampling.suffix=b"], "write the prefix and suffix"),
        (
            ["backbone=ar", "parameterization=ar", "sampling.predictor=any_order"],
            "sampling.predictor=any_order is for diffusion models, and parameterization=ar is "
            "not one: set sampling.predictor=ar",
        ),
        (
            ["training.loss_type=mdlm", "sampling.predictor=any_order", "sampling.fixz=True"],
            "sampling.fixz=True applies to a VADD model under a sampler that draws z",
        ),
    ],
)
def test_config_check_rejects_bad_sampling_values_with_one_line(tmp_path, overrides, message):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    cfg = make_cfg(tmp_path, "mode=sample_eval", f"eval.checkpoint_path={ckpt}", *overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_check_accepts_any_order_with_fixz_and_conditioning(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    cfg = make_cfg(
        tmp_path, "mode=sample_eval", f"eval.checkpoint_path={ckpt}",
        "sampling.predictor=any_order", "sampling.fixz=False", "sampling.order=random",
        "sampling.top_p=0.9", "sampling.top_k=50", "sampling.prefix='In the'",
    )  # fmt: skip
    validate_config(cfg)


# ----------------------------------------------------------------- sample_eval end to end


@pytest.mark.parametrize(
    "overrides",
    [
        ["sampling.predictor=vae_cache", "sampling.prefix='In the beginning'",
         "sampling.suffix=' and the earth'", "sampling.top_k=20"],
        ["sampling.predictor=any_order", "sampling.order=random", "sampling.fixz=False",
         "sampling.template='In the beginning[MASK:4] created'", "sampling.top_p=0.9"],
    ],
)  # fmt: skip
def test_sample_eval_records_the_conditioning_and_keeps_the_text(tmp_path, cache_dir, overrides):
    cfg = make_cfg(
        tmp_path, "mode=sample_eval", "model.length=24", "model.hidden_size=32",
        "sampling.steps=4", "sampling.num_sample_batches=1", "loader.eval_batch_size=2",
        *overrides,
    )  # fmt: skip
    _, module, tokenizer = build(cfg)
    results = run_sample_eval(cfg, module, tokenizer, "untrained")
    predictor = cfg.sampling.predictor
    cached = predictor == "vae_cache"
    tag = "vae_cache_T4_fixzTrue_k20" if cached else "any_order_random_fixzFalse_p0.9"
    (path,) = tmp_path.glob(f"samples_{tag}_seed1_cond??????.json")  # + the conditioning's hash
    saved = json.loads(path.read_text())
    # the .txt: no BOS / EOS markers, the given text marked
    text_samples = path.with_suffix(".txt").read_text().split("\n\n==========\n\n")
    assert len(text_samples) == 2 and all(t.startswith("[[In the beginning") for t in text_samples)
    assert tokenizer.bos_token not in path.with_suffix(".txt").read_text()
    assert tokenizer.eos_token not in path.with_suffix(".txt").read_text()
    cond = saved["conditioning"]
    assert {k: cond[k] for k in ("prefix", "suffix", "template")} == {
        k: cfg.sampling[k] for k in ("prefix", "suffix", "template")
    }
    x_init = conditioning_from_text(
        tokenizer, 24, prefix=cfg.sampling.prefix, suffix=cfg.sampling.suffix,
        template=cfg.sampling.template, mask_id=module.vocab.mask_id, eos=True,
    )  # fmt: skip
    given = x_init != module.vocab.mask_id
    n_given = int(given.sum())
    assert cond["given_positions"] == n_given and cond["free_positions"] == 24 - n_given
    tokens = torch.tensor(saved["token_ids"])
    assert tokens.shape == (2, 24) and torch.equal(tokens[:, given], x_init.expand(2, -1)[:, given])
    start = tokenizer.bos_token + "In the beginning"
    assert all(text.startswith(start) for text in saved["samples"]), saved["samples"]
    if predictor == "vae_cache":
        assert all(t.endswith(" and the earth" + tokenizer.eos_token) for t in saved["samples"])
        assert all(t.strip().endswith("[[ and the earth]]") for t in text_samples)
    else:
        assert saved["steps"] is None and saved["order"] == "random"
        assert results["nfe_per_sequence"] == cond["free_positions"]
    assert saved["top_k"] == cfg.sampling.top_k and saved["top_p"] == cfg.sampling.top_p


@pytest.mark.parametrize("frame", ["auto", "none"])
def test_unconditional_samples_get_the_framing_every_training_row_has(tmp_path, cache_dir, frame):
    """sampling.frame=auto: wrapped text rows always open with BOS and close with EOS, so
    the sampler is given both (an all-[MASK] start cannot tell positions apart); none:
    nothing is given."""
    cfg = make_cfg(
        tmp_path, "mode=sample_eval", "model.length=24", "model.hidden_size=32",
        "sampling.predictor=any_order", "sampling.num_sample_batches=1",
        "loader.eval_batch_size=3", f"sampling.frame={frame}",
    )  # fmt: skip
    assert cfg.data.wrap
    _, module, tokenizer = build(cfg)
    results = run_sample_eval(cfg, module, tokenizer, "untrained")
    (path,) = tmp_path.glob("samples_any_order_left_to_right_fixzTrue_seed1.json")  # not "_cond"
    saved = json.loads(path.read_text())
    tokens = torch.tensor(saved["token_ids"])
    given = 2 if frame == "auto" else 0
    assert saved["conditioning"]["given_positions"] == given
    assert results["nfe_per_sequence"] == 24 - given  # any_order: one call per free position
    if frame == "auto":
        assert (tokens[:, 0] == tokenizer.bos_token_id).all()
        assert (tokens[:, -1] == tokenizer.eos_token_id).all()


class _WordTokenizer:
    """decode(ids) = 'w<id>' words; special ids as given (GPT-2: one id for all three)."""

    def __init__(self, bos, eos, pad):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


@pytest.mark.parametrize("specials", [(0, 0, 0), (1, 2, 3)])
def test_readable_text_drops_markers_breaks_at_eos_and_marks_the_given_text(specials):
    from evaluation.jobs import readable_text

    bos, eos, pad = specials
    tok = _WordTokenizer(bos, eos, pad)
    row = [bos, 5, 6, eos, 7, pad, eos]
    given = [True, True, False, False, False, False, True]  # BOS and a prefix token, EOS frame
    assert readable_text(row, given, tok) == "[[w5]]w6\nw7"

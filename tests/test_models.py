"""Networks: AdaLN-zero latent path, MDLM equivalence, out_mask, padding, encoder, AR, EMA."""

import pytest
import torch
from omegaconf import OmegaConf

from algorithms import objectives
from models.autoregressive import AR
from models.dit import DIT, GenDIT, InferDIT
from models.ema import ExponentialMovingAverage
from noise_schedule import LogLinear

B, L = 3, 8


def tokens(vocab, b=B, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab + 1, (b, length), generator=g)  # includes [MASK] = vocab


def zeros(b=B):
    return torch.zeros(b)


# ----------------------------------------------------------------- GenDIT latent path


def test_untrained_gendit_ignores_z_then_uses_it(model_cfg, randomize, vocab):
    torch.manual_seed(0)
    net = GenDIT(model_cfg(), vocab + 1).eval()
    randomize(net, skip="adaLN_modulation")  # output layer is no longer zero
    x = tokens(vocab)
    z1, z2 = torch.randn(B, 4), 3 * torch.randn(B, 4)
    with torch.no_grad():
        a, b = net(x, zeros(), z=z1), net(x, zeros(), z=z2)
    assert a.abs().max() > 0.1  # non-trivial logits
    assert torch.equal(a, b)  # AdaLN-zero makes the latent path inert
    randomize(net, only="adaLN_modulation")
    with torch.no_grad():
        a, b = net(x, zeros(), z=z1), net(x, zeros(), z=z2)
    assert (a - b).abs().max() > 1e-3


def test_untrained_gendit_equals_untrained_mdlm(model_cfg, randomize, vocab):
    torch.manual_seed(1)
    cfg = model_cfg()
    mdlm = DIT(cfg, vocab + 1).eval()
    randomize(mdlm, skip="adaLN_modulation")
    gen = GenDIT(cfg, vocab + 1).eval()
    result = gen.load_state_dict(mdlm.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("latent_map.") for k in result.missing_keys)
    x = tokens(vocab, seed=1)
    with torch.no_grad():
        ref = mdlm(x, zeros())
        assert ref.abs().max() > 0.1  # non-trivial logits
        for _ in range(3):
            torch.testing.assert_close(gen(x, zeros(), z=torch.randn(B, 4)), ref, rtol=0, atol=0)
        torch.testing.assert_close(gen(x, zeros()), ref, rtol=0, atol=0)


def test_gendit_per_position_latents(model_cfg, randomize, vocab):
    torch.manual_seed(2)
    net = GenDIT(model_cfg(latent1d=False), vocab + 1).eval()
    randomize(net)
    x = tokens(vocab)
    z = torch.randn(B, L, 4)
    with torch.no_grad():
        out = net(x, zeros(), z=z)
        assert out.shape == (B, L, vocab + 1)
        # A per-position latent equal at every position is the same as a per-sequence one.
        zs = torch.randn(B, 4)
        torch.testing.assert_close(
            net(x, zeros(), z=zs[:, None].expand(B, L, 4)), net(x, zeros(), z=zs)
        )
        z2 = z.clone()
        z2[:, 3] += 1.0
        assert not torch.allclose(net(x, zeros(), z=z2), out)


def test_out_mask_rows_match_full_forward(model_cfg, randomize, vocab):
    torch.manual_seed(3)
    net = GenDIT(model_cfg(), vocab + 1).eval()
    randomize(net)
    x = tokens(vocab)
    z = torch.randn(B, 4)
    m = torch.rand(B, L) < 0.5
    m[0, 0] = True
    with torch.no_grad():
        full = net(x, zeros(), z=z)
        part = net(x, zeros(), z=z, out_mask=m)
    assert part.shape == (int(m.sum()), vocab + 1)
    torch.testing.assert_close(part, full[m], rtol=1e-5, atol=1e-5)  # row-major order


def test_samplers_get_float32_logits_under_bf16_autocast(model_cfg, randomize, vocab):
    """The revealed rows' logits: float32 for the draw, while training keeps bf16."""
    from sampling import predictors

    torch.manual_seed(4)
    gen, ar = GenDIT(model_cfg(), vocab + 1).eval(), AR(ar_cfg(), vocab + 1).eval()
    randomize(gen)
    randomize(ar)
    x, z, m = tokens(vocab), torch.randn(B, 4), torch.rand(B, L) < 0.5
    with torch.no_grad():
        exact = gen(x, zeros(), z=z, out_mask=m)  # float32 weights, no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = gen(x, zeros(), z=z, out_mask=m)
            high = gen(x, zeros(), z=z, out_mask=m, fp32_logits=True)
            assert ar(x, out_mask=m).dtype == torch.bfloat16
            assert ar(x, out_mask=m, fp32_logits=True).dtype == torch.float32

            class Module:  # what generation reads off a Diffusion module
                backbone = gen

            drawn = predictors.denoiser(Module)(x, zeros(), z, m)
    assert low.dtype == torch.bfloat16 and high.dtype == drawn.dtype == torch.float32
    # the trunk still ran in bf16; only the head's rounding of its output is gone
    assert (high - exact).abs().max() <= (low.float() - exact).abs().max()
    torch.testing.assert_close(drawn, high)


# ------------------------------------------------------------------------ padding mask


def test_padding_keys_are_ignored(model_cfg, encoder_cfg, randomize, vocab):
    torch.manual_seed(4)
    net = GenDIT(model_cfg(), vocab + 1).eval()
    randomize(net)
    n_real = 5
    short = tokens(vocab, b=2, length=n_real, seed=4)
    padded = torch.cat([short, torch.randint(0, vocab, (2, L - n_real))], dim=1)
    key_mask = torch.zeros(2, L, dtype=torch.bool)
    key_mask[:, :n_real] = True
    z = torch.randn(2, 4)
    with torch.no_grad():
        ref = net(short, zeros(2), z=z)
        got = net(padded, zeros(2), z=z, key_mask=key_mask)[:, :n_real]
        unmasked = net(padded, zeros(2), z=z)[:, :n_real]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (unmasked - ref).abs().max() > 1e-3  # the padding would matter without the mask

    enc = InferDIT(encoder_cfg(), 4, True, vocab + 1, "auto").eval()
    randomize(enc)
    vis = torch.rand(2, L) < 0.5
    with torch.no_grad():
        mu_s, ls_s = enc(short, vis[:, :n_real], zeros(2))
        mu_p, ls_p = enc(padded, vis, zeros(2), key_mask)
    torch.testing.assert_close(mu_p, mu_s, rtol=1e-5, atol=1e-5)  # pooling skips padding
    torch.testing.assert_close(ls_p, ls_s, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ InferDIT


@pytest.mark.parametrize("latent1d", [True, False])
@pytest.mark.parametrize("mask_struc", ["adaln", "none"])
def test_inferdit_shapes_and_zero_init_head(encoder_cfg, latent1d, mask_struc, vocab):
    torch.manual_seed(5)
    enc = InferDIT(encoder_cfg(mask_struc), 4, latent1d, vocab + 1, "auto")
    x0 = tokens(vocab - 1)
    vis = torch.rand(B, L) < 0.5
    mu, log_sigma = enc(x0, vis, zeros())
    shape = (B, 4) if latent1d else (B, L, 4)
    assert mu.shape == shape and log_sigma.shape == shape
    assert torch.equal(mu, torch.zeros(shape))  # r = prior at construction
    assert torch.equal(log_sigma, torch.zeros(shape))


def test_inferdit_pools_per_position_outputs(encoder_cfg, randomize, vocab):
    torch.manual_seed(6)
    per_pos = InferDIT(encoder_cfg(), 4, False, vocab + 1, "auto").eval()
    randomize(per_pos)
    pooled = InferDIT(encoder_cfg(), 4, True, vocab + 1, "auto").eval()
    pooled.load_state_dict(per_pos.state_dict())
    x0, vis = tokens(vocab - 1), torch.rand(B, L) < 0.5
    with torch.no_grad():
        mu_l, ls_l = per_pos(x0, vis, zeros())
        mu, ls = pooled(x0, vis, zeros())
    torch.testing.assert_close(mu, mu_l.mean(1))
    torch.testing.assert_close(ls, ls_l.mean(1))


@pytest.mark.parametrize("mask_struc", ["adaln", "none"])
def test_inferdit_visibility_dependence(encoder_cfg, randomize, mask_struc, vocab):
    torch.manual_seed(7)
    enc = InferDIT(encoder_cfg(mask_struc), 4, True, vocab + 1, "auto").eval()
    randomize(enc)
    x0 = tokens(vocab - 1)
    vis1 = torch.rand(B, L) < 0.5
    vis2 = ~vis1
    with torch.no_grad():
        mu1, ls1 = enc(x0, vis1, zeros())
        mu2, ls2 = enc(x0, vis2, zeros())
    if mask_struc == "adaln":
        assert (mu1 - mu2).abs().max() > 1e-3 and (ls1 - ls2).abs().max() > 1e-3
    else:
        assert torch.equal(mu1, mu2) and torch.equal(ls1, ls2)


def test_inferdit_and_gendit_share_no_parameters(model_cfg, encoder_cfg, vocab):
    gen = GenDIT(model_cfg(), vocab + 1)
    enc = InferDIT(encoder_cfg(), 4, True, vocab + 1, "auto")
    gen_ids = {id(p) for p in gen.parameters()}
    assert not any(id(p) in gen_ids for p in enc.parameters())


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("randomized", [True, False])
def test_vae_loss_gradients_reach_both_networks(
    model_cfg, encoder_cfg, randomize, vocab, randomized
):
    """After a backward of the VAE loss every parameter that should learn has a gradient.

    randomized=False: from the zero-initialised state, take a few SGD steps first
    (AdaLN-zero blocks paths through zero layers until those layers have moved: the encoder's
    visibility vector needs two steps), then check the next backward.
    """
    torch.manual_seed(8)
    dec = GenDIT(model_cfg(), vocab + 1)
    enc = InferDIT(encoder_cfg(), 4, True, vocab + 1, "auto")
    if randomized:
        randomize(dec)
        randomize(enc)
    spec = objectives.DiffusionSpec(noise=LogLinear(), mask_id=vocab, vocab_size=vocab)
    x0 = torch.randint(0, vocab, (4, L))
    t = torch.full((4,), 0.6)
    params = list(dec.parameters()) + list(enc.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(0 if randomized else 3):
        opt.zero_grad()
        objectives.vae_loss(dec, enc, x0, None, t, spec, num_particles=2).loss.backward()
        opt.step()
    opt.zero_grad()
    out = objectives.vae_loss(dec, enc, x0, None, t, spec, num_particles=2)
    assert out.per_seq.shape == (4,)
    assert torch.isfinite(out.loss)
    out.loss.backward()

    def nonzero(p):
        return p.grad is not None and p.grad.abs().sum() > 0

    for name, p in enc.named_parameters():
        assert nonzero(p), f"encoder.{name}"
    for name, p in dec.named_parameters():
        assert nonzero(p), f"decoder.{name}"


# ---------------------------------------------------------------------------------- AR


def ar_cfg():
    return OmegaConf.create(
        dict(
            hidden_size=16,
            n_heads=2,
            n_blocks=2,
            dropout=0.0,
            length=L,
            vocab_multiple=1,
            gelu="auto",
        )
    )


def test_ar_is_causal(randomize, vocab):
    torch.manual_seed(9)
    net = AR(ar_cfg(), vocab + 1).eval()
    randomize(net)
    x = tokens(vocab - 1)
    with torch.no_grad():
        ref = net(x)
        assert ref.shape == (B, L, vocab + 1)
        for j in range(L):
            y = x.clone()
            y[:, j] = (y[:, j] + 1) % vocab
            out = net(y)
            torch.testing.assert_close(out[:, :j], ref[:, :j], rtol=1e-6, atol=1e-6)
            assert (out[:, j:] - ref[:, j:]).abs().max() > 1e-4
        m = torch.rand(B, L) < 0.5
        torch.testing.assert_close(net(x, out_mask=m), ref[m], rtol=1e-5, atol=1e-5)


def test_ar_zero_init_is_uniform(vocab):
    net = AR(ar_cfg(), vocab + 1)
    x = tokens(vocab - 1)
    assert torch.equal(net(x), torch.zeros(B, L, vocab + 1))
    spec = objectives.DiffusionSpec(noise=LogLinear(), mask_id=vocab, vocab_size=vocab)
    out = objectives.ar_loss(net, x, None, spec)
    # Uniform over the real vocabulary: log V per predicted token.
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(float(vocab))).item())


# --------------------------------------------------------------------------------- EMA


def test_ema_update_uses_warmup_decay():
    torch.manual_seed(10)
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(2, 2))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    params = [a, frozen, b]
    ema = ExponentialMovingAverage(params, decay=0.9)
    assert len(ema.shadow) == 2  # frozen parameters are not averaged
    shadow = [a.detach().clone(), b.detach().clone()]
    for n in range(1, 30):
        with torch.no_grad():
            a.add_(torch.randn(3))
            b.add_(torch.randn(2, 2))
        ema.update(params)
        d = min(0.9, (1 + n) / (10 + n))
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, [a, b], strict=True)]
        for got, exp in zip(ema.shadow, shadow, strict=True):
            torch.testing.assert_close(got, exp)
    assert ema.num_updates == 29


def test_ema_swapped_in_restores_live_weights_exactly():
    torch.manual_seed(11)
    net = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(net.parameters(), decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    ema.update(net.parameters())
    live = [p.detach().clone() for p in net.parameters()]
    with ema.swapped_in(net.parameters()):
        for p, s in zip(net.parameters(), ema.shadow, strict=True):
            assert torch.equal(p, s)
        assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), live, strict=True))
    for p, q in zip(net.parameters(), live, strict=True):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError), ema.swapped_in(net.parameters()):
        raise RuntimeError("boom")
    for p, q in zip(net.parameters(), live, strict=True):
        assert torch.equal(p, q)


def test_ema_state_dict_round_trip():
    net = torch.nn.Linear(2, 2)
    ema = ExponentialMovingAverage(net.parameters(), decay=0.99)
    ema.update(net.parameters())
    other = ExponentialMovingAverage(torch.nn.Linear(2, 2).parameters(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.num_updates == 1
    for s, t in zip(other.shadow, ema.shadow, strict=True):
        assert torch.equal(s, t)
    with pytest.raises(ValueError):
        ExponentialMovingAverage(
            torch.nn.Linear(2, 2, bias=False).parameters(), 0.9
        ).load_state_dict(ema.state_dict())


def test_vae_loss_untrained_decoder_costs_log_v_per_masked_token(
    model_cfg, encoder_cfg, randomize, vocab
):
    """t = 1 with alpha_1 = 0 masks every position; the untrained decoder is uniform over V.

    So recon = L log V per sequence, and per_seq = w(1) * L log V + kl with w(1) = 1.
    """
    torch.manual_seed(12)
    dec = GenDIT(model_cfg(), vocab + 1)
    enc = InferDIT(encoder_cfg(), 4, True, vocab + 1, "auto")
    randomize(enc)
    spec = objectives.DiffusionSpec(noise=LogLinear(eps=0.0), mask_id=vocab, vocab_size=vocab)
    x0 = torch.randint(0, vocab, (2, L))
    draws = objectives.Draws(mask_u=torch.rand(2, L), z_eps=torch.randn(2, 1, 4))
    out = objectives.vae_loss(dec, enc, x0, None, torch.ones(2), spec, draws=draws)
    assert set(out.stats) >= {"recon", "kl", "kl_closed", "mu_std"}
    log_v = torch.log(torch.tensor(float(vocab)))
    torch.testing.assert_close(out.stats["recon"], torch.full((2,), L * log_v.item()))
    with torch.no_grad():  # every position is masked at t = 1: the encoder sees none
        mu, log_sigma = enc(x0, torch.zeros_like(x0, dtype=torch.bool), torch.zeros(2))
    kl = one_sample_kl64(mu, log_sigma, draws.z_eps[:, 0])
    expected = L * log_v.double() + kl  # w(1) = 1
    torch.testing.assert_close(out.per_seq.detach().double(), expected, rtol=1e-5, atol=1e-5)
    assert (kl.abs() > 1e-2).all()  # randomised encoder: the KL term is not a zero
    assert (out.stats["kl_closed"] > 0).all()  # randomised encoder: r differs from the prior
    assert out.num_tokens.item() == x0.numel()


def one_sample_kl64(mu, log_sigma, eps):
    """log N(z; mu, sigma^2) - log N(z; 0, I) at z = mu + sigma eps, summed over d (float64)."""
    mu, sigma, eps = mu.double(), log_sigma.double().exp(), eps.double()
    z = mu + sigma * eps
    r = torch.distributions.Normal(mu, sigma)
    prior = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    return (r.log_prob(z) - prior.log_prob(z)).sum(-1)


def test_vae_loss_k1_wiring_is_the_delbo(model_cfg, encoder_cfg, randomize, vocab):
    """K = 1, kl_weighting=time, loglinear at t = 0.5: per_seq = w (-recon + kl), w = 1/t = 2,
    with recon and kl recomputed here from the networks (the encoder sees the visible
    positions, the decoder xt and z) instead of read off the loss's own stats."""
    torch.manual_seed(13)
    dec = GenDIT(model_cfg(), vocab + 1).eval()
    enc = InferDIT(encoder_cfg(), 4, True, vocab + 1, "auto").eval()
    randomize(dec)
    randomize(enc)
    spec = objectives.DiffusionSpec(noise=LogLinear(), mask_id=vocab, vocab_size=vocab)
    x0 = torch.randint(0, vocab, (3, L))
    draws = objectives.Draws(mask_u=torch.rand(3, L), z_eps=torch.randn(3, 1, 4))
    t = torch.full((3,), 0.5)
    out = objectives.vae_loss(dec, enc, x0, None, t, spec, beta=1.0, draws=draws)
    masked = draws.mask_u < (1 - 1e-3) * 0.5  # 1 - alpha_t of loglinear (eps = 1e-3)
    assert masked.any(1).all() and (~masked).any(1).all()
    xt = torch.where(masked, vocab, x0)
    with torch.no_grad():
        mu, log_sigma = enc(x0, ~masked, torch.zeros(3))
        z = mu + log_sigma.exp() * draws.z_eps[:, 0]
        logp = torch.log_softmax(dec(xt, torch.zeros(3), z=z)[..., :vocab].double(), -1)
    nll = -(logp.gather(-1, x0[..., None])[..., 0] * masked).sum(-1)
    kl = one_sample_kl64(mu, log_sigma, draws.z_eps[:, 0])
    assert (kl.abs() > 1e-2).all()
    expected = 2.0 * (nll + kl)
    torch.testing.assert_close(out.per_seq.detach().double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["recon"].double(), nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["kl"].double(), kl, rtol=1e-5, atol=1e-5)
    assert (out.stats["mu_std"] > 0).all()  # a randomised encoder spreads mu over the batch


def test_vae_loss_stats_are_finite_for_a_single_sequence(model_cfg, encoder_cfg, vocab):
    """A batch of one sequence (e.g. the remainder of an eval set) must not log NaN.

    The posterior-collapse signal is the spread of mu over the batch; with one sequence
    there is no spread (0), not an undefined value that poisons the summed eval stats.
    """
    torch.manual_seed(14)
    dec = GenDIT(model_cfg(), vocab + 1)
    enc = InferDIT(encoder_cfg(), 4, True, vocab + 1, "auto")
    spec = objectives.DiffusionSpec(noise=LogLinear(), mask_id=vocab, vocab_size=vocab)
    x0 = torch.randint(0, vocab, (1, L))
    out = objectives.vae_loss(dec, enc, x0, None, torch.full((1,), 0.5), spec)
    for name, value in out.stats.items():
        assert torch.isfinite(value).all(), name
    assert torch.isfinite(out.loss)


def test_the_networks_provide_what_the_protocols_name(model_cfg, encoder_cfg, vocab):
    """models/protocols.py: blocks for compile, the forward signatures, latent_map."""
    import inspect

    from models.protocols import CausalLM, Denoiser, Encoder

    dit, gen = DIT(model_cfg(), vocab + 1), GenDIT(model_cfg(), vocab + 1)
    enc, ar = InferDIT(encoder_cfg(), 4, True, vocab + 1, "auto"), AR(ar_cfg(), vocab + 1)
    assert isinstance(dit, Denoiser) and isinstance(gen, Denoiser) and hasattr(gen, "latent_map")
    assert isinstance(enc, Encoder) and isinstance(ar, CausalLM)
    for net in (dit, gen):
        params = inspect.signature(net.forward).parameters
        assert {"xt", "sigma", "key_mask", "out_mask", "fp32_logits"} <= set(params)
    assert list(inspect.signature(enc.forward).parameters)[:3] == ["x0", "visible", "sigma"]
    assert {"out_mask", "fp32_logits"} <= set(inspect.signature(ar.forward).parameters)
    assert {"vocab_embed", "sigma_map", "blocks", "output_layer"} <= {
        n for n, _ in dit.named_children()
    }

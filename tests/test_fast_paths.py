"""Every speed path against its plain counterpart: same losses, same samples (issue 6).

Tolerances: float32 paths agree to float32 round-off (assert_close defaults, ~1e-5
relative); bfloat16 inputs to ~1e-2 (bf16 keeps 8 bits of mantissa).
"""

import hydra_jobs
import pytest
import torch
import torch.nn.functional as F

from algorithms import losses, objectives
from config_check import ConfigError, validate_config
from models import attention
from models.dit import DIT, GELU, GenDIT, modulate, round_up
from noise_schedule import LogLinear
from sampling import samplers


def reference_logp(logits, targets, vocab_size):
    """The plain SUBS log-likelihood: a float32 log_softmax over the real ids."""
    return torch.log_softmax(logits[:, :vocab_size].float(), -1).gather(1, targets[:, None])[:, 0]


# 20 rows of 16 logits: 20 chunks of one row, 10 of two, 2 of eleven, one chunk
@pytest.mark.parametrize("chunk_rows", [1, 3, 16, 1000])
def test_chunked_cross_entropy_matches_log_softmax(monkeypatch, chunk_rows):
    V, extra, N = 11, 5, 20  # 5 excluded ids: [MASK] + padding; more rows than logits
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", chunk_rows * V)
    torch.manual_seed(0)
    logits = (3 * torch.randn(N, V + extra)).requires_grad_()
    logits_ref = logits.detach().clone().requires_grad_()
    targets = torch.randint(0, V, (N,))
    weights = torch.randn(N)
    got = losses.masked_token_logp(logits, targets, V)
    want = reference_logp(logits_ref, targets, V)
    torch.testing.assert_close(got, want)
    assert torch.equal(logits.detach(), logits_ref.detach())  # the input is left untouched
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(logits.grad, logits_ref.grad)
    assert torch.equal(logits.grad[:, V:], torch.zeros(N, extra))  # excluded ids: no gradient


def test_row_chunks_cover_the_rows_once_in_bounded_pieces(monkeypatch):
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 30)
    for n, width in [(20, 16), (7, 4), (5, 100), (1, 1)]:
        chunks = losses._row_chunks(n, width)
        rows = [i for c in chunks for i in range(n)[c]]
        assert rows == list(range(n))  # each row once, in order
        assert all(c.stop - c.start <= max(1, 30 // width) for c in chunks)


def test_chunked_cross_entropy_in_bfloat16_keeps_float32_output(monkeypatch):
    V, N = 50, 9
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 2 * V)
    torch.manual_seed(1)
    logits = (2 * torch.randn(N, V + 14)).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,))
    got = losses.masked_token_logp(logits, targets, V)
    assert got.dtype == torch.float32
    # exact softmax of the bf16 values: only the float32 arithmetic differs
    torch.testing.assert_close(got, reference_logp(logits.detach(), targets, V))
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    expected = F.one_hot(targets, V) - torch.softmax(logits.detach()[:, :V].float(), -1)
    torch.testing.assert_close(logits.grad[:, :V].float(), expected, rtol=1e-2, atol=1e-2)


def test_modulate_is_the_adaln_formula():
    torch.manual_seed(2)
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)


def test_cpu_attention_under_bf16_autocast_runs_in_float32():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention.attend(q, k, v.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    key_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    masked = attention.attend(q, k, v, key_mask)
    manual = torch.softmax(
        (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~key_mask[:, None, None], -torch.inf), -1
    )
    torch.testing.assert_close(masked, manual @ v)


def _padded_and_plain(model_cfg, randomize, vocab, cls=DIT):
    """The same network twice: vocabulary padded to a multiple of 16, and unpadded."""
    torch.manual_seed(4)
    padded = cls(model_cfg(vocab_multiple=16), vocab + 1).eval()
    randomize(padded)
    plain = cls(model_cfg(vocab_multiple=1), vocab + 1).eval()
    state = dict(padded.state_dict())
    rows = vocab + 1
    for key in ("vocab_embed.embedding", "output_layer.linear.weight", "output_layer.linear.bias"):
        state[key] = state[key][:rows]
    plain.load_state_dict(state)
    assert padded.vocab_embed.embedding.shape[0] == round_up(rows, 16) > rows
    return padded, plain


def test_padded_vocabulary_gives_the_same_loss(model_cfg, randomize, vocab):
    padded, plain = _padded_and_plain(model_cfg, randomize, vocab)
    spec = objectives.DiffusionSpec(LogLinear(), mask_id=vocab, vocab_size=vocab)
    x0 = torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.5, 0.8, 1.0])
    u = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
    out = [
        objectives.mdlm_loss(net, x0, None, t, spec, objectives.Draws(mask_u=u))
        for net in (padded, plain)
    ]
    torch.testing.assert_close(out[0].per_seq, out[1].per_seq)
    assert out[0].loss > 0


def test_padded_vocabulary_gives_the_same_samples(model_cfg, randomize, vocab):
    padded, plain = _padded_and_plain(model_cfg, randomize, vocab, cls=GenDIT)
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    x_init = torch.full((5, 8), vocab)
    runs = []
    for net in (padded, plain):
        runs.append(
            samplers.sample_masked(
                lambda xt, sigma, zz, m, net=net: net(xt, sigma, z=zz, out_mask=m),
                x_init, mask_id=vocab, vocab_size=vocab, noise=LogLinear(), steps=4,
                latent=lambda n: z[:n], cache=True,
                generator=torch.Generator().manual_seed(3),
            )[0]
        )  # fmt: skip
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] < vocab).all()  # every position revealed, never a padding id


def test_gelu_auto_is_tanh_except_for_bfloat16_on_cpu():
    torch.manual_seed(4)
    x = 3 * torch.randn(20_000)
    tanh = F.gelu(x, approximate="tanh")
    assert torch.equal(GELU("auto")(x), tanh)  # float32: MDLM's formula, bit for bit
    assert torch.equal(GELU("tanh")(x.bfloat16()), F.gelu(x.bfloat16(), approximate="tanh"))
    assert torch.equal(GELU("erf")(x), F.gelu(x))
    xb = x.bfloat16()
    got = GELU("auto")(xb)
    assert torch.equal(got, F.gelu(xb))  # the fast (erf) kernel on CPU bf16
    # ... which is the tanh formula up to bf16 rounding plus the curves' gap (< 4.8e-4)
    exact = F.gelu(xb.double(), approximate="tanh")
    rounding = torch.finfo(torch.bfloat16).eps * exact.abs()
    assert ((got.double() - exact).abs() <= rounding + 4.8e-4).all()
    z = torch.randn(20_000).bfloat16()  # N(0, 1) inputs: mostly bit-identical (~91%)
    assert (GELU("auto")(z) == F.gelu(z, approximate="tanh")).float().mean() > 0.85
    # the two curves never differ by more than 4.8e-4 (max at x = -2.7)
    grid = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    assert (F.gelu(grid) - F.gelu(grid, approximate="tanh")).abs().max() < 4.8e-4


def test_gelu_choice_is_validated(tmp_path):
    with pytest.raises(ValueError, match="model.gelu='fast'"):
        GELU("fast")
    with pytest.raises(ConfigError, match="model.gelu='tnah'.*did you mean model.gelu=tanh"):
        validate_config(hydra_jobs.compose_job(tmp_path, "model.gelu=tnah"))


def plain_rotary(x, cos, sin):
    """The textbook rotate-half formula with full-width (L, D) tables."""
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    x1, x2 = x.float().chunk(2, -1)
    return x.float() * cos + torch.cat([-x2, x1], -1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_rotate_half_forward_and_backward(dtype):
    torch.manual_seed(5)
    cos, sin = attention.Rotary(8)(6, torch.device("cpu"))
    x = torch.randn(2, 3, 2, 6, 8).to(dtype).requires_grad_()  # (q|k, B, H, L, D)
    x_ref = x.detach().float().requires_grad_()  # float32 reference, rounded at the end
    got, want = attention.apply_rotary(x, (cos, sin)), plain_rotary(x_ref, cos, sin)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, x_ref.grad.to(dtype))
    assert attention.apply_rotary(x, (cos, sin), torch.bfloat16).dtype == torch.bfloat16


def test_self_attention_matches_separate_q_k_v():
    torch.manual_seed(6)
    B, L, H, D = 2, 5, 2, 4
    rotary = attention.Rotary(D)(L, torch.device("cpu"))
    qkv = torch.randn(B, L, 3 * H * D, requires_grad=True)
    qkv_ref = qkv.detach().clone().requires_grad_()
    key_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    got = attention.self_attention(qkv, H, rotary, key_mask)
    q, k, v = qkv_ref.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
    scores = plain_rotary(q, *rotary) @ plain_rotary(k, *rotary).transpose(-1, -2) / D**0.5
    attn = torch.softmax(scores.masked_fill(~key_mask[:, None, None], -torch.inf), -1)
    want = (attn @ v).transpose(1, 2).reshape(B, L, H * D)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(qkv.grad, qkv_ref.grad)


def test_compiled_blocks_match_eager_loss_and_gradients(model_cfg, randomize, vocab):
    """model.compile=True (per-block torch.compile) gives the eager loss and gradients."""
    import copy

    from models import compile_blocks

    torch.manual_seed(7)
    eager = DIT(model_cfg(), vocab + 1)
    randomize(eager)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    assert type(compiled.blocks[0]).__name__ == "OptimizedModule"
    spec = objectives.DiffusionSpec(LogLinear(), mask_id=vocab, vocab_size=vocab)
    x0 = torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.5, 0.8, 1.0])
    u = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
    loss = {}
    for name, net in (("eager", eager), ("compiled", compiled)):
        out = objectives.mdlm_loss(net, x0, None, t, spec, objectives.Draws(mask_u=u))
        out.loss.backward()
        loss[name] = out.loss.detach()
    torch.testing.assert_close(loss["compiled"], loss["eager"])
    pairs = zip(eager.named_parameters(), compiled.named_parameters(), strict=True)
    for (name, p_eager), (_, p_compiled) in pairs:
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, msg=name)

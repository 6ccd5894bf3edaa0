"""Every speed path against its plain counterpart: same losses, same samples (issue 6).

Tolerances: float32 paths agree to float32 round-off (assert_close defaults, ~1e-5
relative); bfloat16 inputs to ~1e-2 (bf16 keeps 8 bits of mantissa).
"""

import pytest
import torch
import torch.nn.functional as F

import losses
import objectives
import samplers
from models import attention
from models.dit import DIT, GenDIT, modulate, round_up
from noise_schedule import LogLinear


def reference_logp(logits, targets, vocab_size):
    """The plain SUBS log-likelihood: a float32 log_softmax over the real ids."""
    return torch.log_softmax(logits[:, :vocab_size].float(), -1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])  # one row per chunk, a few, one chunk
def test_chunked_cross_entropy_matches_log_softmax(monkeypatch, chunk_rows):
    V, extra, N = 11, 5, 7  # 5 excluded ids: [MASK] + padding
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", chunk_rows * V)
    torch.manual_seed(0)
    logits = (3 * torch.randn(N, V + extra)).requires_grad_()
    logits_ref = logits.detach().clone().requires_grad_()
    targets = torch.randint(0, V, (N,))
    weights = torch.randn(N)
    got = losses.masked_token_logp(logits, targets, V)
    want = reference_logp(logits_ref, targets, V)
    torch.testing.assert_close(got, want)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(logits.grad, logits_ref.grad)
    assert torch.equal(logits.grad[:, V:], torch.zeros(N, extra))  # excluded ids: no gradient


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

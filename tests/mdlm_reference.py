"""An independent reference of MDLM's DiT, written from its parameter layout only.

It does not import models/: the interchange tests build MDLM-format checkpoints with it
and check that GenDIT, warm-started from them, computes the same log-probabilities.

Layout (names as in MDLM's state_dict, under `backbone.`):
  vocab_embed.embedding (V, d); sigma_map.mlp.{0,2}.{weight,bias} (256 -> c -> c);
  rotary_emb.inv_freq (a persistent buffer, like MDLM's);
  blocks.{i}: norm1.weight, attn_qkv.weight (3d, d; rows q|k|v, then heads), attn_out.weight,
    norm2.weight, mlp.{0,2}.{weight,bias} (d -> 4d -> d, tanh GELU),
    adaLN_modulation.{weight,bias} (6d: shift, scale, gate of attention, then of the MLP);
  output_layer: norm_final.weight, linear.{weight,bias} (V, d), adaLN_modulation (2d).
LayerNorms have a weight and no bias; rotary is rotate-half with base 10000 on q and k.
"""

import math

import torch
from torch import nn


class RefNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight


class RefEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(vocab, dim))

    def forward(self, ids):
        return self.embedding[ids]


class RefSigmaMap(nn.Module):
    def __init__(self, cond: int, freq: int = 256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, cond), nn.SiLU(), nn.Linear(cond, cond))

    def forward(self, sigma):
        k = torch.arange(self.freq // 2, dtype=torch.float32)
        angles = sigma[:, None] * torch.exp(-math.log(10000.0) * k / (self.freq // 2))[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class RefRotary(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / 10000.0**exponents)  # persistent, as MDLM

    def rotate(self, x):  # x: (B, H, L, hd)
        angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * self.inv_freq[None]
        cos, sin = angles.cos(), angles.sin()  # (L, hd/2)
        first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, cond: int):
        super().__init__()
        self.heads = heads
        self.norm1 = RefNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = RefNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.adaLN_modulation = nn.Linear(cond, 6 * dim)

    def forward(self, x, c, rotary: RefRotary):
        b, length, dim = x.shape
        mods = self.adaLN_modulation(c)[:, None, :]  # (B, 1, 6d)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.split(dim, dim=-1)
        h = self.norm1(x) * (1 + scale_a) + shift_a
        hd = dim // self.heads
        q, k, v = (
            part.reshape(b, length, self.heads, hd).transpose(1, 2)
            for part in self.attn_qkv(h).split(dim, dim=-1)
        )
        q, k = rotary.rotate(q), rotary.rotate(k)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        h = (weights @ v).transpose(1, 2).reshape(b, length, dim)
        x = x + gate_a * self.attn_out(h)
        return x + gate_m * self.mlp(self.norm2(x) * (1 + scale_m) + shift_m)


class RefFinal(nn.Module):
    def __init__(self, dim: int, vocab: int, cond: int):
        super().__init__()
        self.norm_final = RefNorm(dim)
        self.linear = nn.Linear(dim, vocab)
        self.adaLN_modulation = nn.Linear(cond, 2 * dim)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None, :].split(x.shape[-1], dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class MDLMReferenceDiT(nn.Module):
    """vocab = real tokens + 1 [MASK] (the last id)."""

    def __init__(self, vocab: int, dim: int, heads: int, cond: int, blocks: int):
        super().__init__()
        self.vocab_embed = RefEmbedding(vocab, dim)
        self.sigma_map = RefSigmaMap(cond)
        self.rotary_emb = RefRotary(dim // heads)
        self.blocks = nn.ModuleList(RefBlock(dim, heads, cond) for _ in range(blocks))
        self.output_layer = RefFinal(dim, vocab, cond)

    def forward(self, ids, sigma):
        """ids (B, L), sigma (B,) -> logits (B, L, V)."""
        c = torch.nn.functional.silu(self.sigma_map(sigma))
        x = self.vocab_embed(ids)
        for block in self.blocks:
            x = block(x, c, self.rotary_emb)
        return self.output_layer(x, c)

    def subs_log_probs(self, xt, sigma):
        """MDLM's SUBS: the [MASK] logit is -inf; visible positions copy their token."""
        logits = self.forward(xt, sigma)
        mask_id = logits.shape[-1] - 1
        logits[..., mask_id] = -torch.inf
        logp = torch.log_softmax(logits, dim=-1)
        visible = xt != mask_id
        copy = torch.full_like(logp, -torch.inf).scatter(-1, xt[..., None], 0.0)
        return torch.where(visible[..., None], copy, logp)


def randomize(net: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Gaussian weights everywhere (adaLN and output layer included); norms around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if "norm" in name else noise)
    return net


def mdlm_checkpoint(net: MDLMReferenceDiT, ema_seed: int = 123) -> dict:
    """An MDLM-style Lightning checkpoint: `backbone.` weights and an EMA that differs."""
    gen = torch.Generator().manual_seed(ema_seed)
    shadow = [p.detach() + 0.02 * torch.randn(p.shape, generator=gen) for p in net.parameters()]
    return {
        "state_dict": {f"backbone.{k}": v.clone() for k, v in net.state_dict().items()},
        "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": shadow},
        "global_step": 1000,
        "epoch": 0,
    }

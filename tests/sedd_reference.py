"""An independent reference of SEDD's score network (Lou et al. 2024), from its layout.

It imports nothing from vadd: the foreign-checkpoint tests write SEDD-format folders with
it and check that vadd's DIT, loading them, computes the same numbers.

Layout (SEDD's state_dict names, no prefix):
  vocab_embed.embedding (tokens + 1, d) for the absorbing graph; sigma_map.mlp.{0,2}
  (256 sinusoidal features of sigma -> c -> c); rotary_emb.inv_freq (a buffer);
  blocks.{i}: norm1.weight, attn_qkv.weight, attn_out.weight, norm2.weight,
    mlp.{0,2}.{weight,bias}, adaLN_modulation.{weight,bias} (6d: shift, scale, gate of
    attention, then of the MLP);
  output_layer: norm_final.weight, linear.{weight,bias}, adaLN_modulation (2d).
LayerNorms: float32, a weight and no bias. c = SiLU(sigma_map(sigma)). With
`scale_by_sigma` the output is shifted by -log(e^sigma - 1) - log(tokens), and the
column of each position's input token is set to 0: the output is the log-score.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn


class RefNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
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
        half = self.freq // 2
        k = torch.arange(half, dtype=torch.float32)
        angles = sigma.float()[:, None] * torch.exp(-math.log(10000.0) * k / half)[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class RefRotary(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / 10000.0**exponents)

    def rotate(self, x):  # x: (B, H, L, hd)
        angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * self.inv_freq[None]
        cos, sin = angles.cos(), angles.sin()
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


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
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        hd = dim // self.heads
        q, k, v = (
            part.reshape(b, length, self.heads, hd).transpose(1, 2)
            for part in self.attn_qkv(modulate(self.norm1(x), shift1, scale1)).split(dim, -1)
        )
        h = F.scaled_dot_product_attention(rotary.rotate(q), rotary.rotate(k), v)
        x = x + gate1[:, None] * self.attn_out(h.transpose(1, 2).reshape(b, length, dim))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class RefFinal(nn.Module):
    def __init__(self, dim: int, vocab: int, cond: int):
        super().__init__()
        self.norm_final = RefNorm(dim)
        self.linear = nn.Linear(dim, vocab)
        self.adaLN_modulation = nn.Linear(cond, 2 * dim)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SEDDReference(nn.Module):
    """The absorbing-graph SEDD: tokens real ids, the [MASK] id `tokens` (the last row)."""

    def __init__(self, tokens: int, dim: int, heads: int, cond: int, blocks: int):
        super().__init__()
        self.vocab_embed = RefEmbedding(tokens + 1, dim)
        self.sigma_map = RefSigmaMap(cond)
        self.rotary_emb = RefRotary(dim // heads)
        self.blocks = nn.ModuleList(RefBlock(dim, heads, cond) for _ in range(blocks))
        self.output_layer = RefFinal(dim, tokens + 1, cond)

    def forward(self, ids, sigma):
        """ids (B, L), sigma (B,) -> log-scores (B, L, tokens + 1) (scale_by_sigma=True)."""
        c = F.silu(self.sigma_map(sigma))
        x = self.vocab_embed(ids)
        for block in self.blocks:
            x = block(x, c, self.rotary_emb)
        x = self.output_layer(x, c)
        esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
        x = x - esigm1.log()[:, None, None] - math.log(x.shape[-1] - 1)
        return torch.scatter(x, -1, ids[..., None], torch.zeros_like(x[..., :1]))


def randomize(net: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Gaussian weights everywhere (adaLN and output layer included); norms around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if "norm" in name else noise)
    return net


def sedd_config(
    tokens: int, dim: int, heads: int, cond: int, blocks: int, length: int,
    graph: str = "absorb", noise: dict | None = None,
) -> dict:  # fmt: skip
    """SEDD's Hydra config (configs/config.yaml + model/small.yaml), resized."""
    return {
        "ngpus": 1,
        "tokens": tokens,
        "training": {"batch_size": 8, "ema": 0.9999, "accum": 1, "n_iters": 10},
        "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
        "graph": {"type": graph, "file": "data", "report_all": False},
        "noise": noise or {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
        "model": {
            "name": "tiny", "type": "ddit", "hidden_size": dim, "cond_dim": cond,
            "length": length, "n_blocks": blocks, "n_heads": heads, "scale_by_sigma": True,
            "dropout": 0.1,
        },
    }  # fmt: skip


def reference(config: dict, seed: int = 0) -> SEDDReference:
    m = config["model"]
    net = SEDDReference(
        config["tokens"], m["hidden_size"], m["n_heads"], m["cond_dim"], m["n_blocks"]
    )
    return randomize(net, seed).eval()


def write_hub_folder(net: nn.Module, folder: Path, config: dict) -> Path:
    """save_pretrained's folder: config.json (the config dict) + model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    return folder


def write_run_dir(net: nn.Module, folder: Path, config: dict) -> Path:
    """A local SEDD run: .hydra/config.yaml + checkpoints-meta/checkpoint.pth (EMA = raw)."""
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "checkpoints-meta").mkdir(exist_ok=True)
    shadow = [p.detach().clone() for p in net.parameters()]
    state = {
        "optimizer": {"state": {}, "param_groups": []},
        "model": net.state_dict(),
        "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow},
        "step": 10,
    }
    torch.save(state, folder / "checkpoints-meta" / "checkpoint.pth")
    return folder

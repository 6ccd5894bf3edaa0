"""An independent reference of RADD's time-free network (Ou et al. 2024), from its layout.

It imports nothing from vadd: the foreign-checkpoint tests write RADD-format folders with
it and check that vadd, loading them, computes the same log-probabilities.

Layout (RADD's state_dict names, no prefix):
  vocab_embed.embedding (tokens + 1, d); rotary_emb.inv_freq (a persistent buffer);
  blocks.{i}: norm1.{weight,bias}, attn_qkv.weight (3d, d; q|k|v, then heads),
    attn_out.weight, norm2.{weight,bias}, mlp.{0,2}.{weight,bias} (d -> 4d -> d, tanh GELU);
  output_layer: norm_final.{weight,bias}, linear.{weight,bias} (tokens + 1, d).
The LayerNorms normalise in float32 without affine, then x * weight + bias, the bias
starting at ones (RADD's LayerNormWot). No time input. The output is log_softmax over
the real tokens (columns :-1); the [MASK] column is left raw.

Folders as RADD's load_model reads them: a PyTorchModelHubMixin folder (config.json +
model.safetensors / pytorch_model.bin) and a local run dir (.hydra/config.yaml +
checkpoints-meta/checkpoint.pth with 'model' and 'ema').
"""

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn


class RefNormWot(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.ones(dim))  # RADD starts the bias at ones

    def forward(self, x):
        x = x.float()
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class RefEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(vocab, dim))

    def forward(self, ids):
        return self.embedding[ids]


class RefRotary(nn.Module):
    """cos / sin of (L, head_dim), both halves alike; rotate-half applied to q and k."""

    def __init__(self, head_dim: int):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / 10000.0**exponents)

    def tables(self, length: int):
        angles = torch.arange(length, dtype=torch.float32)[:, None] * self.inv_freq[None]
        both = torch.cat([angles, angles], dim=-1)
        return both.cos(), both.sin()

    @staticmethod
    def rotate(x, cos, sin):  # x: (B, H, L, hd)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = RefNormWot(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = RefNormWot(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )

    def forward(self, x, cos, sin):
        b, length, dim = x.shape
        hd = dim // self.heads
        q, k, v = (
            part.reshape(b, length, self.heads, hd).transpose(1, 2)
            for part in self.attn_qkv(self.norm1(x)).split(dim, dim=-1)
        )
        q, k = RefRotary.rotate(q, cos, sin), RefRotary.rotate(k, cos, sin)
        h = F.scaled_dot_product_attention(q, k, v)
        x = x + self.attn_out(h.transpose(1, 2).reshape(b, length, dim))
        return x + self.mlp(self.norm2(x))


class RefFinal(nn.Module):
    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.norm_final = RefNormWot(dim)
        self.linear = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.linear(self.norm_final(x))


class RADDReference(nn.Module):
    """tokens real ids; the [MASK] id is `tokens` (the last row)."""

    def __init__(self, tokens: int, dim: int, heads: int, blocks: int):
        super().__init__()
        self.vocab_embed = RefEmbedding(tokens + 1, dim)
        self.rotary_emb = RefRotary(dim // heads)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(blocks))
        self.output_layer = RefFinal(dim, tokens + 1)

    def forward(self, ids):
        """ids (B, L) -> (B, L, tokens + 1): log-probabilities over [:-1], raw [MASK] column."""
        x = self.vocab_embed(ids)
        cos, sin = self.rotary_emb.tables(ids.shape[1])
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.output_layer(x)
        return torch.cat([x[..., :-1].log_softmax(-1), x[..., -1:]], dim=-1)


def randomize(net: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Gaussian weights everywhere; norm weights and biases around 1 (RADD's start)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if "norm" in name else noise)
    return net


def radd_config(
    tokens: int, dim: int, heads: int, blocks: int, length: int, loss_type: str = "t_DCE"
) -> dict:
    """RADD's Hydra config (configs/config.yaml + model/small_radd.yaml), resized."""
    return {
        "ngpus": 1,
        "tokens": tokens,
        "training": {"batch_size": 8, "ema": 0.9999, "loss_type": loss_type, "accum": 1},
        "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "sampling": {"predictor": "euler", "steps": 1024},
        "model": {
            "name": "tiny_radd", "type": "ddit_wot", "hidden_size": dim, "cond_dim": 16,
            "length": length, "n_blocks": blocks, "n_heads": heads, "dropout": 0.02,
            "use_checkpoint": False, "dtype": "float32",
        },
    }  # fmt: skip


def reference(config: dict, seed: int = 0) -> RADDReference:
    m = config["model"]
    net = RADDReference(config["tokens"], m["hidden_size"], m["n_heads"], m["n_blocks"])
    return randomize(net, seed).eval()


def write_hub_folder(
    net: nn.Module, folder: Path, config: dict, weights: str = "model.safetensors",
    nested: bool = False,
) -> Path:  # fmt: skip
    """What PyTorchModelHubMixin.save_pretrained writes: config.json (the config dict;
    nested: {"config": dict}) and the whole state_dict, rotary buffer included."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"config": config} if nested else config))
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if weights == "model.safetensors":
        from safetensors.torch import save_file

        save_file(state, folder / weights)
    else:
        torch.save(state, folder / weights)
    return folder


def write_run_dir(net: nn.Module, folder: Path, config: dict, ema_seed: int = 99) -> nn.Module:
    """A local RADD run: .hydra/config.yaml and checkpoints-meta/checkpoint.pth whose EMA
    differs from the raw weights. Returns a copy of the net holding the EMA weights."""
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    gen = torch.Generator().manual_seed(ema_seed)
    shadow = [p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for p in net.parameters()]
    (folder / "checkpoints-meta").mkdir(exist_ok=True)
    state = {
        "optimizer": {"state": {}, "param_groups": []},
        "model": net.state_dict(),
        "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": shadow},
        "step": 1000,
    }
    torch.save(state, folder / "checkpoints-meta" / "checkpoint.pth")
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p, s in zip(ema.parameters(), shadow, strict=True):
            p.copy_(s)
    return ema

"""RADD's time-independent denoiser (Ou et al. 2024), and VADD's decoder without time.

RADD's observation: under absorbing diffusion p(x0 | xt) does not depend on t given xt,
so the network needs no time input. `RADD` is its architecture: the token table, rotary
attention in plain pre-LN blocks (LayerNorm with weight and bias, no AdaLN), a final
LayerNorm and a zero-initialised projection. Parameter names follow RADD's
(`vocab_embed.embedding`, `blocks.{i}.norm1.{weight,bias}`, `attn_qkv`, `attn_out`,
`mlp.{0,2}`, `output_layer.norm_final`, `output_layer.linear`), so its checkpoints map
one to one (checkpointing/foreign.py).

`forward` takes the DiT's arguments and ignores sigma, so every objective and sampler
runs it unchanged. `TimeFreeGenDIT` is VADD's decoder for backbone=radd: GenDIT whose
AdaLN reads g(z) alone (no time embedding): z is the only conditioning.
"""

import torch
from torch import nn

from .attention import Rotary
from .dit import DIT, EmbeddingLayer, GenDIT, LayerNorm, PreLNBlock, round_up

try:
    from omegaconf import DictConfig
except ImportError:  # pragma: no cover
    DictConfig = object


class FinalLayer(nn.Module):
    """LayerNorm (weight and bias) + zero-initialised projection: uniform logits at start."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim, bias=True)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class RADD(nn.Module):
    """tokens (B, L) -> logits (B, L, rows), or (N, rows) for the positions of out_mask.

    The table and head have round_up(vocab_size, model.vocab_multiple) rows, as the DiT's
    (ids past the real vocabulary never compete in a softmax)."""

    def __init__(self, cfg: DictConfig, vocab_size: int, out_dim: int | None = None):
        super().__init__()
        rows = round_up(vocab_size, cfg.vocab_multiple)
        self.vocab_size = vocab_size
        self.vocab_embed = EmbeddingLayer(cfg.hidden_size, rows)
        self.rotary = Rotary(cfg.hidden_size // cfg.n_heads)
        self.blocks = nn.ModuleList(
            PreLNBlock(
                cfg.hidden_size, cfg.n_heads, gelu=cfg.gelu, norm_bias=True, dropout=cfg.dropout
            )
            for _ in range(cfg.n_blocks)
        )
        self.output_layer = FinalLayer(cfg.hidden_size, out_dim or rows)

    def forward(self, xt, sigma=None, key_mask=None, out_mask=None, fp32_logits=False):
        """sigma is accepted and ignored: the network has no time input."""
        x = self.vocab_embed(xt)
        rotary = self.rotary(xt.shape[1], x.device)
        for block in self.blocks:
            x = block(x, rotary, key_mask)
        if out_mask is not None:  # project only the requested positions
            x = x[out_mask]
        if fp32_logits:  # samplers: no bf16 rounding of the probabilities
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.output_layer(x.float())
        return self.output_layer(x)


class TimeFreeGenDIT(GenDIT):
    """VADD's decoder p(x0 | xt, z) for backbone=radd: AdaLN conditioning c = g(z) only.

    GenDIT adds g(z) to SiLU(emb(sigma)), and with time_conditioning=False sigma is
    always 0, so the time embedding is a learned constant; here it is gone."""

    def __init__(self, cfg: DictConfig, vocab_size: int, out_dim: int | None = None):
        super().__init__(cfg, vocab_size, out_dim)
        del self.sigma_map

    def forward(self, xt, sigma=None, z=None, key_mask=None, out_mask=None, fp32_logits=False):
        if z is None:
            raise ValueError("TimeFreeGenDIT needs z: it has no other conditioning")
        g = self.latent_map(z)  # (B, cond) or (B, L, cond)
        c = g[:, None, :] if g.dim() == 2 else g
        return self.run(xt, c, key_mask, out_mask, fp32_logits)


# backbone name -> (denoiser without a latent, VADD decoder reading z)
BACKBONES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "dit": (DIT, GenDIT),
    "radd": (RADD, TimeFreeGenDIT),
}

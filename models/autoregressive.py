"""Autoregressive baseline: the DiT trunk with causal attention and no AdaLN.

Same embedding, rotary and attention code as the diffusion backbones, plain pre-LN
residual blocks, a zero-initialised output projection (uniform start) and next-token
prediction; the mask id exists in the vocabulary but is never predicted.
"""

import torch
from omegaconf import DictConfig
from torch import nn

from models import attention
from models.dit import EmbeddingLayer, LayerNorm, PreLNBlock, round_up


class AR(nn.Module):
    """Causal transformer: ids (B, L) -> next-token logits (B, L, V) or (N, V) under out_mask."""

    def __init__(self, cfg: DictConfig, vocab_size: int, out_dim: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        rows = round_up(vocab_size, cfg.vocab_multiple)  # padding ids: see models.dit
        self.vocab_embed = EmbeddingLayer(cfg.hidden_size, rows)
        self.rotary = attention.Rotary(cfg.hidden_size // cfg.n_heads)
        self.blocks = nn.ModuleList(
            PreLNBlock(
                cfg.hidden_size, cfg.n_heads, gelu=cfg.gelu, causal=True, dropout=cfg.dropout
            )
            for _ in range(cfg.n_blocks)
        )
        self.norm_final = LayerNorm(cfg.hidden_size)
        self.linear = nn.Linear(cfg.hidden_size, out_dim or rows)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(
        self, ids: torch.Tensor, out_mask: torch.Tensor | None = None, fp32_logits: bool = False
    ) -> torch.Tensor:
        x = self.vocab_embed(ids)
        rotary = self.rotary(ids.shape[1], x.device)
        for block in self.blocks:
            x = block(x, rotary)
        x = self.norm_final(x)
        x = x if out_mask is None else x[out_mask]
        if fp32_logits:  # the sampler's draw: no bf16 rounding of the logits
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.linear(x.float())
        return self.linear(x)

"""Rotary position embedding and attention, shared by every backbone.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, which picks
its flash / memory-efficient kernel on GPUs and a math kernel on CPU. flash-attn is used
only when it is installed, the tensors are on CUDA in half precision and no padding mask
is needed; nothing imports it at module level.
"""

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HALF_TYPES = (torch.bfloat16, torch.float16)


class Rotary(nn.Module):
    """Non-interleaved (rotate-half) rotary embedding with base 10000, cached per length."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            self._cache = self._build(seq_len, device)
        return self._cache[2], self._cache[3]

    @torch.inference_mode(False)  # a cache built during evaluation must serve training too
    def _build(self, seq_len: int, device: torch.device):
        with torch.no_grad():
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)  # (L, head_dim)
            return (seq_len, device, emb.cos(), emb.sin())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: (B, H, L, D) -> rotated, in float32 (`attend` casts to the attention dtype)."""
    cos, sin = rotary
    xf = x.float()
    return xf * cos + rotate_half(xf) * sin


def attend(q, k, v, key_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """q, k, v: (B, H, L, D); key_mask: (B, L) bool, True for real tokens -> (B, H, L, D).

    Runs in v's dtype on GPUs, and in float32 on CPU, where SDPA's bfloat16 backward is
    about 3x slower than its float32 one; the output comes back in v's dtype.
    """
    dtype = torch.float32 if q.device.type == "cpu" else v.dtype
    q, k = q.to(dtype), k.to(dtype)
    if key_mask is None and _HAS_FLASH_ATTN and q.is_cuda and dtype in HALF_TYPES:
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        )
        return out.transpose(1, 2)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    with torch.autocast(q.device.type, enabled=False):  # autocast would undo the fp32 choice
        out = F.scaled_dot_product_attention(
            q, k, v.to(dtype), attn_mask=attn_mask, is_causal=causal
        )
    return out.to(v.dtype)

"""Rotary position embedding and attention, shared by every backbone.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, which picks
its flash / memory-efficient kernel on GPUs and a math kernel on CPU. flash-attn is used
only when it is installed, the tensors are on CUDA in half precision and no padding mask
is needed; nothing imports it at module level.
"""

import importlib.util

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HALF_TYPES = (torch.bfloat16, torch.float16)


class Rotary(nn.Module):
    """Non-interleaved (rotate-half) rotary embedding with base 10000, cached per length.

    Returns (cos, sin), each (L, head_dim / 2) in float32: both halves of a head share them.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        # No buffer: the frequencies are computed where the cache is built, so a model
        # that transformers creates on the meta device (an export) gets them right too.
        self.head_dim, self.base = head_dim, base
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            self._cache = self._build(seq_len, device)
        return self._cache[2], self._cache[3]

    @torch.inference_mode(False)  # a cache built during evaluation must serve training too
    def _build(self, seq_len: int, device: torch.device):
        with torch.no_grad():
            steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
            inv_freq = 1.0 / (self.base**steps)  # on the CPU, then moved: the same numbers
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq.to(device))  # (L, head_dim / 2)
            return (seq_len, device, freqs.cos(), freqs.sin())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: x's on GPUs; float32 on CPU, where SDPA's bfloat16
    backward is about 3x slower than its float32 one."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def apply_rotary(
    x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rotate x (..., L, D) by position: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].

    Computed in float32 and returned in `dtype` (default float32). Any leading dims, so q
    and k can go through together as one (2, B, H, L, D) view of the qkv projection.
    """
    return _Rotate.apply(x, rotary[0], rotary[1], dtype or torch.float32)


class _Rotate(torch.autograd.Function):
    """The rotation as four half-width kernels; its backward is the inverse rotation
    (sin -> -sin), so nothing but the (L, D / 2) tables is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin, dtype):
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = x.dtype
        return _rotate(x, cos, sin).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin).to(ctx.in_dtype), None, None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # one cast first: mixed-dtype kernels are slower
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


def attend(q, k, v, key_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """q, k, v: (B, H, L, D); key_mask: (B, L) bool, True for real tokens -> (B, H, L, D).

    Runs in `compute_dtype(v)`; the output comes back in v's dtype.
    """
    dtype = compute_dtype(v)
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


def self_attention(
    qkv: torch.Tensor,
    n_heads: int,
    rotary: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """qkv (B, L, 3 * H * D) from one projection -> rotary attention output (B, L, H * D)."""
    qkv = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=n_heads)
    qk, v = qkv.split([2, 1])  # split (not indexing): its backward is one cat, no zero-fill
    q, k = apply_rotary(qk, rotary, compute_dtype(qkv))  # q and k in one pass
    out = attend(q, k, v.squeeze(0), key_mask, causal)
    return rearrange(out, "b h l d -> b l (h d)")

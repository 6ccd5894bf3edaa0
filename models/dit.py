"""DiT backbones: shared blocks, the MDLM-style `DIT`, VADD's `GenDIT` and `InferDIT`.

Parameter names follow MDLM's DiT exactly (`vocab_embed.embedding`, `sigma_map.mlp.*`,
`blocks.{i}.attn_qkv`, `adaLN_modulation`, `output_layer.*`, ...) so MDLM checkpoints map
onto GenDIT one to one.

Conditioning vectors `c` are always 3-D: (B, 1, cond) when shared by every position, or
(B, L, cond) when they vary per position (InferDIT's visibility, per-position latents).
AdaLN layers and the output projection are zero-initialised: an untrained network predicts
uniform logits and ignores its conditioning, so an untrained GenDIT is an untrained MDLM.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# Relative, so that scripts/export.py can copy this file and attention.py beside
# modeling_vadd.py into a folder that transformers loads (trust_remote_code).
from .attention import Rotary, self_attention

try:  # a type name only: the exported model does not need omegaconf
    from omegaconf import DictConfig
except ImportError:  # pragma: no cover
    DictConfig = object


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in one fused kernel (addcmul)."""
    return torch.addcmul(shift, x, 1.0 + scale)


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple: GEMM-friendly table sizes (GPT-2's 50258 -> 50304)."""
    return -(-n // multiple) * multiple


GELU_CHOICES = ("auto", "tanh", "erf")


class GELU(nn.Module):
    """MDLM's tanh-approximate GELU, and when to evaluate it with the erf kernel.

    `tanh`: always the tanh formula. `erf`: always the exact (erf) GELU. `auto`: tanh,
    except on CPU bfloat16 activations, where PyTorch's tanh-GELU kernels (forward and
    backward) are ~4x slower than the erf ones. The two curves differ by at most 4.7e-4
    (at x = -2.7): less than half of bf16's rounding step for any output of magnitude
    >= 0.25. For N(0, 1) inputs 91% of the bf16 outputs are bit-identical to the tanh
    kernel's. float32 activations and GPUs always get the tanh formula.
    """

    def __init__(self, mode: str = "auto"):
        super().__init__()
        if mode not in GELU_CHOICES:
            raise ValueError(f"model.gelu={mode!r}: choose one of {GELU_CHOICES}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="none" if self.uses_erf(x) else "tanh")

    def uses_erf(self, x: torch.Tensor) -> bool:
        if self.mode == "auto":
            return x.device.type == "cpu" and x.dtype == torch.bfloat16
        return self.mode == "erf"


class LayerNorm(nn.Module):
    """LayerNorm computed in float32: a weight and no bias (MDLM's convention), or a
    weight and a bias (bias=True: RADD's blocks; RADD starts its bias at ones, we at 0)."""

    def __init__(self, dim: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), bias)
        return y.to(x.dtype)


class EmbeddingLayer(nn.Module):
    """A (vocab, dim) table; `F.embedding` keeps the backward a fast scatter-add."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level sigma -> MLP -> (B, cond)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half
        )
        args = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DDiTBlock(nn.Module):
    """Pre-LN transformer block with AdaLN-zero shift/scale/gate for attention and MLP."""

    def __init__(
        self, dim: int, n_heads: int, cond_dim: int, *, gelu: str, mlp_ratio=4, dropout=0.0
    ):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim),
            GELU(gelu),
            nn.Linear(mlp_ratio * dim, dim),
        )
        self.dropout = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x, rotary, c, key_mask=None, causal=False):
        # x: (B, L, D); c: (B, 1 | L, cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        h = self_attention(self.attn_qkv(h), self.n_heads, rotary, key_mask, causal)
        x = torch.addcmul(x, gate1, self.dropout(self.attn_out(h)))  # x + gate * h, fused
        h = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return torch.addcmul(x, gate2, self.dropout(h))


class PreLNBlock(nn.Module):
    """A plain pre-LN transformer block, no conditioning: the AR baseline's (causal,
    LayerNorm without bias) and RADD's (bidirectional, LayerNorm with bias)."""

    def __init__(
        self, dim: int, n_heads: int, *, gelu: str, causal=False, norm_bias=False, dropout=0.0
    ):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.norm1 = LayerNorm(dim, bias=norm_bias)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim, bias=norm_bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), GELU(gelu), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, rotary, key_mask=None):
        # causal attention needs no padding mask: padding sits after the real tokens
        key_mask = None if self.causal else key_mask
        qkv = self.attn_qkv(self.norm1(x))
        h = self_attention(qkv, self.n_heads, rotary, key_mask, self.causal)
        x = x + self.dropout(self.attn_out(h))
        return x + self.dropout(self.mlp(self.norm2(x)))


class DDitFinalLayer(nn.Module):
    """AdaLN-modulated LayerNorm + zero-initialised projection to `out_dim`."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DIT(nn.Module):
    """MDLM's diffusion transformer: tokens (B, L) + noise level (B,) -> logits.

    `forward(..., out_mask=m)` projects only the positions where m (B, L) is True and
    returns (N, out_dim) rows in row-major order: the loss needs only masked positions,
    so the (B, L, V) logits tensor is never built during training.

    The embedding table and the token head have `round_up(vocab_size, vocab_multiple)`
    rows (`model.vocab_multiple`, 1 = none): ids past `vocab_size` are padding, never
    embedded, and their logits are cut off before any softmax (they get no gradient).
    """

    def __init__(
        self,
        cfg: DictConfig,
        vocab_size: int,
        out_dim: int | None = None,
        vocab_multiple: int | None = None,
        gelu: str | None = None,
    ):
        super().__init__()
        gelu = cfg.gelu if gelu is None else gelu  # defaults: configs/model/*.yaml
        multiple = cfg.vocab_multiple if vocab_multiple is None else vocab_multiple
        rows = round_up(vocab_size, multiple)
        self.vocab_size = vocab_size
        self.cond_dim = cfg.cond_dim
        self.vocab_embed = EmbeddingLayer(cfg.hidden_size, rows)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary = Rotary(cfg.hidden_size // cfg.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(cfg.hidden_size, cfg.n_heads, cfg.cond_dim, dropout=cfg.dropout, gelu=gelu)
            for _ in range(cfg.n_blocks)
        )
        self.output_layer = DDitFinalLayer(cfg.hidden_size, out_dim or rows, cfg.cond_dim)

    def condition(self, sigma: torch.Tensor) -> torch.Tensor:
        """c = SiLU(time embedding), shape (B, 1, cond)."""
        return F.silu(self.sigma_map(sigma))[:, None, :]

    def run(self, ids, c, key_mask=None, out_mask=None, fp32_logits=False):
        x = self.vocab_embed(ids)
        rotary = self.rotary(ids.shape[1], x.device)
        for block in self.blocks:
            x = block(x, rotary, c, key_mask)
        if out_mask is not None:  # project only the requested positions
            c = c.expand(-1, ids.shape[1], -1)[out_mask]
            x = x[out_mask]
        if fp32_logits:  # samplers: bf16 logits would round each probability by up to 0.4%
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.output_layer(x.float(), c.float())
        return self.output_layer(x, c)

    def forward(self, xt, sigma, key_mask=None, out_mask=None, fp32_logits=False):
        return self.run(xt, self.condition(sigma), key_mask, out_mask, fp32_logits)


class LatentMLP(nn.Module):
    """g(z): Linear(d, d) - SiLU - Linear(d, d) - SiLU - Linear(d, cond)."""

    def __init__(self, latent_dim: int, cond_dim: int):
        super().__init__()
        d = latent_dim
        self.net = nn.Sequential(
            nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, cond_dim)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class GenDIT(DIT):
    """Decoder p(x0 | xt, z): the DIT whose AdaLN conditioning is c = SiLU(emb(sigma)) + g(z).

    z is (B, latent_dim) when `latent1d` (one latent per sequence) or (B, L, latent_dim).
    `latentMLP=False` adds z directly (needs latent_dim == cond_dim, checked at start-up).
    """

    def __init__(self, cfg: DictConfig, vocab_size: int, out_dim: int | None = None):
        super().__init__(cfg, vocab_size, out_dim)
        self.latent_dim = cfg.latent_dim
        self.latent_map = (
            LatentMLP(cfg.latent_dim, cfg.cond_dim) if cfg.latentMLP else nn.Identity()
        )

    def forward(self, xt, sigma, z=None, key_mask=None, out_mask=None, fp32_logits=False):
        c = self.condition(sigma)
        if z is not None:
            g = self.latent_map(z)  # (B, cond) or (B, L, cond)
            c = c + (g[:, None, :] if g.dim() == 2 else g)
        return self.run(xt, c, key_mask, out_mask, fp32_logits)


def init_head(head: nn.Linear, latent_dim: int, mu_std: float, log_sigma: float) -> None:
    """Initial r(z | x): the mu rows of the head ~ N(0, mu_std^2) (0: zeros, so mu = 0 and
    an untrained r is the prior when log_sigma = 0), the log-sigma bias = log_sigma.

    Why not zeros: the decoder's AdaLN weights start at zero too, so with mu = 0 for every
    input neither network has a gradient that makes z informative (a saddle the run escapes
    only slowly, if at all: the latent collapses). An encoder whose mean already differs
    between inputs, with sigma < 1 so the difference is not drowned in noise, gives the
    decoder something to learn to read (README "Posterior collapse")."""
    with torch.no_grad():
        if mu_std > 0:
            head.weight[:latent_dim].normal_(0.0, mu_std)
        head.bias[latent_dim:].fill_(log_sigma)


class InferDIT(DIT):
    """Recognition model r(z | x0, xt) = N(mu, diag(sigma^2)).

    Reads the clean tokens x0. With `mask_struc=adaln` the positions visible in xt get a
    learned vector added to their AdaLN conditioning; `none` ignores xt (r(z | x0)).
    The head emits 2 * latent_dim numbers per position, mean-pooled over (non-padding)
    positions when `latent1d`. The head starts as `init_head` says (decoder.mu_init_std,
    decoder.init_log_sigma; both 0: an untrained r equals the prior).
    """

    def __init__(
        self, enc_cfg: DictConfig, latent_dim: int, latent1d: bool, vocab_size: int, gelu: str
    ):
        super().__init__(enc_cfg, vocab_size, out_dim=2 * latent_dim, vocab_multiple=1, gelu=gelu)
        self.mask_struc = enc_cfg.mask_struc
        self.latent1d = latent1d
        init_head(self.output_layer.linear, latent_dim, enc_cfg.mu_init_std, enc_cfg.init_log_sigma)
        if self.mask_struc == "adaln":
            self.visible_embed = nn.Parameter(torch.zeros(enc_cfg.cond_dim))
            nn.init.normal_(self.visible_embed, std=0.02)

    def forward(self, x0, visible, sigma, key_mask=None):
        """x0, visible: (B, L) -> mu, log_sigma each (B, d) if latent1d else (B, L, d)."""
        c = self.condition(sigma)
        if self.mask_struc == "adaln":
            c = c + visible[..., None].to(c.dtype) * self.visible_embed
        h = self.run(x0, c, key_mask).float()  # (B, L, 2d)
        if self.latent1d:
            w = torch.ones_like(x0, dtype=h.dtype) if key_mask is None else key_mask.to(h.dtype)
            h = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        mu, log_sigma = h.chunk(2, dim=-1)
        return mu, log_sigma

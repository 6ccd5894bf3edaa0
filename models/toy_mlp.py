"""MLP networks for short toy sequences (the 2-D checkerboard): a denoiser and an encoder.

`ToyMLP` has GenDIT's call signature, `forward(xt, sigma, z=None, key_mask=None,
out_mask=None)`, so objectives.mdlm_loss / vae_loss and samplers.sample_masked drive it
unchanged. With L = 2 positions attention buys nothing: the token embeddings of all
positions ([MASK] included) are concatenated and pushed through residual MLP blocks, and
one head emits the logits of every position at once.

Conditioning follows GenDIT: c = time embedding (zeros when time_conditioning is off,
MDLM's default) + g(z), and c enters every block and the head through AdaLN shift/scale.
The AdaLN layers and the output head are zero-initialised, so an untrained ToyMLP predicts
uniform logits and ignores z: an untrained VADD decoder is an untrained MDM.

`ToyEncoder` is the recognition model r(z | x0, xt) = N(mu, diag(sigma^2)): it reads the
clean tokens plus the visibility mask of xt as a feature (the MLP analogue of InferDIT's
mask_struc=adaln; `none` zeroes that feature), and its zero-initialised head makes an
untrained r equal the prior.

`toy_networks` builds both from the Hydra config (model=toy_mlp, models.build_networks).
"""

import torch
from omegaconf import DictConfig
from torch import nn

from models.dit import TimestepEmbedder, modulate


class Block(nn.Module):
    """Pre-LN residual MLP block; AdaLN shift/scale from c when cond_dim > 0."""

    def __init__(self, dim: int, cond_dim: int = 0, mlp_ratio: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=cond_dim == 0)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.SiLU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.ada = nn.Linear(cond_dim, 2 * dim) if cond_dim > 0 else None
        if self.ada is not None:  # zero: the block starts unmodulated, ignoring c
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(h)
        if self.ada is not None:
            shift, scale = self.ada(c).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return h + self.mlp(x)


class TokenEmbedding(nn.Module):
    """One table per position (position p, token v -> row p * vocab + v), concatenated.

    Separate tables double as position embeddings; concatenation keeps the positions apart
    so the first layer can mix them freely. (B, L) -> (B, L * dim).
    """

    def __init__(self, length: int, vocab: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(length * vocab, dim)
        self.register_buffer("offsets", torch.arange(length) * vocab, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids + self.offsets).flatten(1)


class ToyMLP(nn.Module):
    """Denoiser p(x0 | xt, z) for length-`length` sequences over `vocab_size` ids ([MASK] incl.).

    latent_dim=0 builds the MDM denoiser (no g). z: (B, latent_dim), one latent per sequence.
    """

    def __init__(
        self,
        vocab_size: int,
        length: int = 2,
        *,
        hidden: int = 256,
        n_blocks: int = 3,
        emb_dim: int = 64,
        cond_dim: int = 64,
        latent_dim: int = 0,
        latent_mlp: bool = True,
        time_conditioning: bool = False,
    ):
        super().__init__()
        self.vocab_size, self.length, self.cond_dim = vocab_size, length, cond_dim
        self.latent_dim = latent_dim
        self.embed = TokenEmbedding(length, vocab_size, emb_dim)
        self.proj_in = nn.Linear(length * emb_dim, hidden)
        self.sigma_map = TimestepEmbedder(cond_dim) if time_conditioning else None
        self.latent_map = None  # g(z): an MLP, or z itself (latent_mlp=False, d == cond_dim)
        if latent_dim > 0:
            self.latent_map = (
                nn.Sequential(
                    nn.Linear(latent_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
                )
                if latent_mlp
                else nn.Identity()
            )
        self.blocks = nn.ModuleList(Block(hidden, cond_dim) for _ in range(n_blocks))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False)
        self.ada_out = nn.Linear(cond_dim, 2 * hidden)
        self.head = nn.Linear(hidden, length * vocab_size)
        for layer in (self.ada_out, self.head):  # uniform logits, z ignored, until trained
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, sigma: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """c = time embedding (or zeros) + g(z): (B, cond_dim)."""
        if self.sigma_map is not None:
            c = nn.functional.silu(self.sigma_map(sigma))
        else:
            c = torch.zeros(sigma.shape[0], self.cond_dim, device=sigma.device)
        if z is not None:
            if self.latent_map is None:
                raise ValueError("this ToyMLP was built with latent_dim=0 and takes no z")
            c = c + self.latent_map(z)
        return c

    def forward(
        self, xt, sigma, z=None, key_mask=None, out_mask=None, fp32_logits=False
    ) -> torch.Tensor:
        """xt (B, L), sigma (B,) -> logits (B, L, V), or (N, V) rows where out_mask (B, L).

        key_mask is accepted for GenDIT compatibility and ignored: toy sequences never pad.
        """
        c = self.condition(sigma, z)
        h = self.proj_in(self.embed(xt))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        h = modulate(self.norm_out(h), shift, scale)
        if fp32_logits:  # the sampler's draw: no bf16 rounding of the logits
            with torch.autocast(device_type=h.device.type, enabled=False):
                logits = self.head(h.float())
        else:
            logits = self.head(h)
        logits = logits.view(xt.shape[0], self.length, self.vocab_size)
        return logits if out_mask is None else logits[out_mask]


class ToyEncoder(nn.Module):
    """Recognition model r(z | x0, xt): (x0, visible (B, L), sigma) -> (mu, log_sigma), (B, d).

    Seeing which positions are visible lets r spend KL only where z helps the decoder
    (here: when both coordinates are masked) and fall back to the prior elsewhere.
    """

    def __init__(
        self,
        vocab_size: int,
        latent_dim: int,
        length: int = 2,
        *,
        hidden: int = 256,
        n_blocks: int = 2,
        emb_dim: int = 64,
        time_conditioning: bool = False,
        reads_xt: bool = True,
    ):
        super().__init__()
        self.reads_xt = reads_xt  # False: r(z | x0), the visibility feature is all zeros
        self.embed = TokenEmbedding(length, vocab_size, emb_dim)
        self.sigma_map = TimestepEmbedder(hidden) if time_conditioning else None
        self.proj_in = nn.Linear(length * emb_dim + length, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(n_blocks))
        self.norm_out = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 2 * latent_dim)
        nn.init.zeros_(self.head.weight)  # mu = 0, log_sigma = 0: r starts at the prior
        nn.init.zeros_(self.head.bias)

    def forward(self, x0, visible, sigma, key_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        visible = visible.to(torch.float32) * float(self.reads_xt)  # (B, L)
        features = torch.cat([self.embed(x0), visible], dim=-1)
        h = self.proj_in(features)
        if self.sigma_map is not None:
            h = h + self.sigma_map(sigma)
        for block in self.blocks:
            h = block(h)
        mu, log_sigma = self.head(self.norm_out(h)).chunk(2, dim=-1)
        return mu, log_sigma


def toy_networks(
    cfg: DictConfig, vocab_size: int, with_encoder: bool
) -> tuple[ToyMLP, ToyEncoder | None]:
    """(decoder, encoder) for model.type=toy_mlp; the encoder (and z) only with_encoder.

    Sizes come from the model group (decoder) and the decoder group (encoder, the group's
    MDLM-era name); vocab_size counts the [MASK] id.
    """
    m, e, vae = cfg.model, cfg.decoder, with_encoder
    backbone = ToyMLP(
        vocab_size, m.length, hidden=m.hidden_size, n_blocks=m.n_blocks, emb_dim=m.emb_dim,
        cond_dim=m.cond_dim, latent_dim=m.latent_dim if vae else 0, latent_mlp=m.latentMLP,
        time_conditioning=cfg.time_conditioning,
    )  # fmt: skip
    if not vae:
        return backbone, None
    encoder = ToyEncoder(
        vocab_size, m.latent_dim, m.length, hidden=e.hidden_size, n_blocks=e.n_blocks,
        emb_dim=e.emb_dim, time_conditioning=cfg.time_conditioning,
        reads_xt=e.mask_struc != "none",
    )  # fmt: skip
    return backbone, encoder

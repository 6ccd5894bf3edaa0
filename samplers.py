"""Samplers: ancestral masked-diffusion sampling (MDLM `ddpm`, VADD `vae`) and AR decoding.

One reverse step t -> s of absorbing diffusion reveals each still-masked position with
probability (alpha_s - alpha_t) / (1 - alpha_t) and, if revealed, draws its token from
p(x0 | xt, z). Whether a position is revealed does not depend on the network, so we
draw that first and run the output projection on the revealed positions only. The
`cache` variants (`vae_cache`, `ddpm_cache`) also skip the network for every row with
nothing to reveal; the random draws are identical either way, so both variants give the
same samples for the same seed (z drawn for every row at every step in both).

Probabilities and Gumbel noise are float64 (float32 Gumbel-max truncates the tail and
lowers generative perplexity). Positions that are not [MASK] in `x_init` are never
changed, which is all conditional sampling (prefix, suffix, infilling) needs.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from noise_schedule import NoiseSchedule

# denoise(xt (b, L), sigma (b,), z (b, ...) | None, out_mask (b, L)) -> logits (N, V_out)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
LatentFn = Callable[[int], torch.Tensor]  # n -> z of shape (n, ...)


@dataclass
class SampleStats:
    steps: int
    network_calls: int = 0  # batched calls of the decoder
    row_evals: int = 0  # sequences pushed through the decoder, summed over calls

    def as_dict(self, batch_size: int) -> dict:
        return {
            "steps": self.steps,
            "network_calls": self.network_calls,
            "nfe_per_sequence": self.row_evals / max(batch_size, 1),
        }


def gumbel_argmax(logits: torch.Tensor, generator=None, chunk: int = 1024) -> torch.Tensor:
    """Sample from softmax(logits) (N, V) by Gumbel-max in float64, chunked over rows."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i in range(0, logits.shape[0], chunk):
        block = logits[i : i + chunk].double()
        u = torch.rand(block.shape, generator=generator, device=block.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        out[i : i + chunk] = (block + gumbel).argmax(-1)
    return out


@torch.no_grad()
def sample_masked(
    denoise: DenoiseFn,
    x_init: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    noise: NoiseSchedule,
    steps: int,
    eps: float = 1e-5,
    latent: LatentFn | None = None,
    fixz: bool = True,
    cache: bool = False,
    time_conditioning: bool = False,
    noise_removal: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Run `steps` reverse steps on the grid 1 -> eps from x_init (B, L); return tokens, stats.

    latent: draws z for n sequences (None for MDLM). fixz=True draws z once per sequence
    for the whole chain (consistency sampler); fixz=False redraws it at every step.
    """
    x, stats = x_init.clone(), SampleStats(steps)
    B, device = x.shape[0], x.device
    z_fixed = latent(B) if (latent is not None and fixz) else None
    grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64, device=device)
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        masked = x == mask_id
        u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
        reveal = masked & (u < noise.unmask_prob(t, s))
        z = z_fixed if (fixz or latent is None) else latent(B)
        _predict_into(
            x,
            reveal,
            denoise,
            z,
            _sigma(noise, t, B, time_conditioning),
            cache,
            stats,
            lambda logits: gumbel_argmax(logits[:, :vocab_size], generator),
        )
    if noise_removal and (x == mask_id).any():  # final greedy step at t = eps
        z = z_fixed if (fixz or latent is None) else latent(B)
        _predict_into(
            x,
            x == mask_id,
            denoise,
            z,
            _sigma(noise, grid[-1], B, time_conditioning),
            True,
            stats,
            lambda logits: logits[:, :vocab_size].argmax(-1),
        )
    return x, stats


def _sigma(noise: NoiseSchedule, t: torch.Tensor, n: int, time_conditioning: bool):
    sigma = noise.sigma(t.float()) if time_conditioning else torch.zeros((), device=t.device)
    return sigma.expand(n).float()


def _predict_into(x, positions, denoise, z, sigma, cache, stats, pick):
    """Write pick(logits) into x at `positions` (B, L); cache: only rows with such positions."""
    rows = positions.any(1) if cache else torch.ones_like(positions[:, 0])
    if not rows.any():
        return
    idx = rows.nonzero().squeeze(1)
    logits = denoise(x[idx], sigma[idx], None if z is None else z[idx], positions[idx])
    stats.network_calls += 1
    stats.row_evals += idx.numel()
    x[positions] = pick(logits)  # row-major order matches out_mask selection


@torch.no_grad()
def sample_autoregressive(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    length: int,
    *,
    bos_id: int,
    vocab_size: int,
    device="cpu",
    generator=None,
) -> torch.Tensor:
    """Left-to-right ancestral sampling; logits_fn(prefix (B, i)) -> (B, i, V_out)."""
    x = torch.full((batch_size, length), bos_id, dtype=torch.long, device=device)
    for i in range(1, length):
        logits = logits_fn(x[:, :i])[:, -1, :vocab_size]
        x[:, i] = gumbel_argmax(logits, generator)
    return x

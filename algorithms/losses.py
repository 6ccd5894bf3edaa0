"""The maths of the objectives, as pure functions of tensors (spec sections 2-3).

Notation: B sequences, K latent particles, L positions, d latent dims.
- `recon` (B, K): sum over masked positions of log p(x0^l | xt, z_k)   (<= 0)
- `kl` (B, K):    one-sample log r(z_k | x0, xt) - log N(z_k; 0, I)
- DELBO per sequence (K = 1):  lam_rec(t) * (-recon) + lam_kl(t) * beta * kl
- IWAE (K >= 1): ell_k = (lam_rec / lam_kl) * recon_k - beta * kl_k and
  loss = -lam_kl * log mean_k exp(ell_k), which is the DELBO for K = 1.
kl_weighting='time':  lam_rec = lam_kl = w(t) = -alpha'_t / (1 - alpha_t)
kl_weighting='steps': lam_rec = T (alpha_s - alpha_t) / (1 - alpha_t), lam_kl = T
  (a bound on -log p for a T-step sampler that redraws z each step; T = 1 is a VAE ELBO).
kl_weighting='once':  lam_rec as MDLM's NELBO (continuous, or T steps when T > 0),
  lam_kl = 1: -log p(x0) <= E_{z~r(z|x0)}[MDLM NELBO of x0 given z] + KL(r(z|x0) || p(z)),
  the bound of a sampler that keeps one z for the whole chain (fixz=True). It needs an r
  that reads x0 only (decoder.mask_struc=none, no time conditioning, no fade_to_prior).
"""

import math

import torch

from noise_schedule import NoiseSchedule

LOG_2PI = math.log(2.0 * math.pi)


def sample_t(
    n: int,
    *,
    eps: float,
    antithetic: bool,
    generator: torch.Generator | None = None,
    offset: int = 0,
    global_n: int | None = None,
    device: torch.device | str = "cpu",
    decoupled: bool = False,
) -> torch.Tensor:
    """n diffusion times in [eps, 1].

    Antithetic (stratified) sampling spreads one shared uniform draw u over the *global*
    batch: sample i of the global batch gets ((u + i / N) mod 1). `offset` is the index of
    this micro-batch's first sample in the global batch (rank, accumulation step), so the
    strata are disjoint across devices when every rank uses the same generator state.
    decoupled (RADD's "decoupled" sampler): sample i gets (u_i + i) / N, one uniform per
    stratum instead of a shared one.
    """
    if antithetic:
        global_n = global_n or n
        idx = torch.arange(offset, offset + n, device=device, dtype=torch.float64)
        if decoupled:
            u = torch.rand(global_n, generator=generator, device=device, dtype=torch.float64)
            t = (u[offset : offset + n] + idx) / global_n
        else:
            u = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
            t = torch.remainder(u + idx / global_n, 1.0)
    else:  # i.i.d. over the global batch: this micro-batch's slice, not the same n draws
        global_n = global_n or n
        t = torch.rand(global_n, generator=generator, device=device, dtype=torch.float64)
        t = t[offset : offset + n]
    return (eps + (1.0 - eps) * t).float()


def discretize_t(t: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Map t in (0, 1] onto the grid {1/T, ..., 1} (step i covers ((i-1)/T, i/T])."""
    return torch.ceil(t * num_steps).clamp(min=1) / num_steps


def mask_tokens(
    x0: torch.Tensor, t: torch.Tensor, noise: NoiseSchedule, mask_id: int, u=None
) -> torch.Tensor:
    """Forward process q(xt | x0): each position independently masked w.p. 1 - alpha_t.

    u (B, L): the uniforms to use (drawn here when None)."""
    p_mask = noise.mask_prob(t)[:, None]  # (B, 1)
    if u is None:
        u = torch.rand(x0.shape, device=x0.device)
    return torch.where(u < p_mask, torch.full_like(x0, mask_id), x0)


def mask_exactly_k(u: torch.Tensor, k: torch.Tensor, key_mask=None) -> torch.Tensor:
    """k-DCE's forward process: mask exactly k (B,) of each row's real positions, a
    uniformly random subset: the k real positions with the smallest uniforms u (B, L)."""
    if key_mask is not None:
        u = u.masked_fill(~key_mask, 2.0)  # padding sorts last: never chosen
    rank = u.argsort(dim=1).argsort(dim=1)  # ranks, not values: a tie masks no k+1-th
    return rank < k[:, None]


def score_entropy(
    log_score: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Denoising score entropy (Lou et al. 2024) at masked positions, absorbing process:
    log_score (N, V) = log p_t(y) / p_t([MASK]) for the real tokens y, target (N,) the
    clean tokens, alpha (N,) alpha_t of each position's row -> (N,), >= 0 and 0 exactly
    when the score is the true one, alpha / (1 - alpha) at the target.

    With r = alpha / (1 - alpha): sum_y exp(s_y) - r s_target + r (log r - 1). A
    normalised conditional, s = log c + log r, makes it r (-log c_target): t-DCE."""
    ratio = (alpha / (1.0 - alpha)).to(log_score.dtype)
    picked = log_score.gather(1, target[:, None]).squeeze(1)
    return log_score.exp().sum(-1) - ratio * picked + ratio * (torch.log(ratio) - 1.0)


CE_CHUNK_ELEMENTS = 1 << 24  # float32 elements of one chunk of the cross-entropy (64 MiB)


def masked_token_logp(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """SUBS log p(x0 | xt) on masked rows only: logits (N, V_out) -> (N,) in float32.

    Only the first `vocab_size` logits compete (the [MASK] logit and any padding ids are
    excluded, i.e. set to -inf). The log-softmax runs in float32 over row chunks of at most
    CE_CHUNK_ELEMENTS. When all rows fit in one chunk its float32 output is kept for the
    backward; otherwise no float32 copy of the logits is ever built whole, and the backward
    recomputes each chunk's log-softmax from the saved (bf16) logits.
    """
    return _ChunkedLogSoftmaxPick.apply(logits, targets, vocab_size)


class _ChunkedLogSoftmaxPick(torch.autograd.Function):
    """log_softmax(logits[:, :V])[target] in float32, chunked over rows (see above)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_size):
        chunks = _row_chunks(logits.shape[0], logits.shape[1])
        logp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for rows in chunks:
            lsm = _log_softmax_real(logits[rows], vocab_size)  # (n, V_out) float32
            logp[rows] = lsm.gather(1, targets[rows, None]).squeeze(1)
        ctx.kept = lsm if len(chunks) == 1 else None  # one chunk: reuse it, no recompute
        ctx.save_for_backward(logits, targets)
        ctx.vocab_size = vocab_size
        return logp

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _row_chunks(logits.shape[0], logits.shape[1]):
            lsm = (
                ctx.kept
                if ctx.kept is not None
                else _log_softmax_real(logits[rows], ctx.vocab_size)
            )
            picked = torch.zeros_like(lsm).scatter_(1, targets[rows, None], grad_out[rows, None])
            # g (onehot - softmax) in one kernel; excluded ids have softmax 0, so no gradient
            grad[rows] = torch.ops.aten._log_softmax_backward_data(picked, lsm, 1, logits.dtype)
        ctx.kept = None
        return grad, None, None


def _log_softmax_real(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 log-softmax of (n, V_out) logits where ids >= vocab_size get -inf (log p = -inf)."""
    x = logits.to(torch.float32, copy=True)  # a copy even for float32 logits: edited below
    x[:, vocab_size:] = -torch.inf
    return torch.log_softmax(x, dim=-1)


def _row_chunks(n: int, width: int) -> list[slice]:
    step = max(1, CE_CHUNK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put per-position values (N,) back at the True positions of mask (B, L), 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def reparameterize(mu, log_sigma, num_particles: int, eps=None):
    """z = mu + sigma * eps for K particles: (B, ...) -> (B, K, ...), with eps (drawn if None)."""
    if eps is None:
        shape = (mu.shape[0], num_particles, *mu.shape[1:])
        eps = torch.randn(shape, device=mu.device, dtype=mu.dtype)
    eps = eps.to(mu.dtype)
    return mu[:, None] + log_sigma.exp()[:, None] * eps, eps


def fade_posterior(
    mu: torch.Tensor, log_sigma: torch.Tensor, p_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t: the encoder's N(mu, sigma^2) faded towards the prior N(0, 1) by the mask
    probability p_t = 1 - alpha_t of each row (B,): mean sqrt(p_t) mu, variance
    1 - p_t (1 - sigma^2).

    Why: the KL of r_t is p_t times the mean part of KL(r) plus at most p_t times its
    variance part (the KL is convex along that line), so with kl_weighting=time the
    weighted KL integrates to at most KL(r) itself: w(t) p_t = -alpha'_t. Without the
    fade an encoder that does not know t pays its KL at every t, about log(1 / eps) ~ 7
    times over under the 1/t weight, where the decoder gains from z mostly at large t.
    Any r keeps the DELBO a valid objective; the encoder is not used for sampling."""
    p = p_mask.view(-1, *([1] * (mu.dim() - 1))).to(mu.dtype)
    var = (1.0 - p) + p * torch.exp(2.0 * log_sigma)
    return mu * p.sqrt(), 0.5 * torch.log(var)


def kl_one_sample(z, eps, log_sigma, position_mask=None) -> torch.Tensor:
    """log r(z) - log N(z; 0, I) summed over all non-batch, non-particle dims: (B, K).

    position_mask (B, L): for per-position latents (B, K, L, d), padding positions' latents
    (which the decoder never reads) are left out."""
    log_r = -(log_sigma[:, None] + 0.5 * eps**2 + 0.5 * LOG_2PI)
    log_p = -(0.5 * z**2 + 0.5 * LOG_2PI)
    diff = log_r - log_p
    if position_mask is not None and z.dim() == 4:
        diff = diff * position_mask[:, None, :, None].to(diff.dtype)
    return diff.flatten(2).sum(-1)


def kl_closed_per_dim(mu: torch.Tensor, log_sigma: torch.Tensor, position_mask=None):
    """KL(N(mu, sigma^2) || N(0, 1)) per sequence and latent dimension: (B, d).

    mu, log_sigma (B, d), or (B, L, d) per-position latents, summed over the positions
    where position_mask (B, L) is True (padding positions' latents are never read)."""
    kl = 0.5 * (mu**2 + torch.exp(2 * log_sigma) - 1.0 - 2.0 * log_sigma)
    if kl.dim() == 3:
        if position_mask is not None:
            kl = kl * position_mask[..., None].to(kl.dtype)
        kl = kl.sum(1)
    return kl


def kl_closed_form(mu: torch.Tensor, log_sigma: torch.Tensor, position_mask=None) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sequence (B,), for logging."""
    return kl_closed_per_dim(mu, log_sigma, position_mask).sum(-1)


def loss_weights(
    t: torch.Tensor, noise: NoiseSchedule, kl_weighting: str, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam_rec, lam_kl), each (B,), for the chosen kl_weighting (see module docstring)."""
    if kl_weighting == "steps" or num_steps > 0:
        s = t - 1.0 / num_steps
        lam_rec = num_steps * noise.unmask_prob(t, s.clamp_min(0.0))
        # alpha_0 must be exactly 1 at the last step so that T=1 is recon + KL exactly.
        lam_rec = torch.where(s <= 0, torch.full_like(t, float(num_steps)), lam_rec)
        if kl_weighting == "steps":
            return lam_rec, torch.full_like(t, float(num_steps))
    else:
        lam_rec = noise.loss_weight(t)
    if kl_weighting == "once":  # the KL of the one z, once per sequence
        return lam_rec, torch.ones_like(t)
    return lam_rec, lam_rec


def free_bits_penalty(
    kl_dims: torch.Tensor, lam_kl: torch.Tensor, free_bits: float, group: int = 1
) -> torch.Tensor:
    """The free-bits term (B,) added to the training loss (Kingma et al. 2016), >= 0.

    kl_dims (B, d): closed-form KL per latent dimension; lam_kl (B,): the KL's weight in
    the loss. Each group of `group` dimensions (0: all d) gets free_bits * group nats for
    free, measured as the batch's lam_kl-weighted mean KL of the group, A_g. The term is
    lam_kl * relu(free_bits * group - A_g) summed over groups: while A_g is below its floor
    its gradient cancels the KL gradient of every row of the batch (in expectation;
    exactly for K = 1), so the encoder feels only the reconstruction; above the floor the
    loss is unchanged. The floor is on the batch mean, not per row, because with the time
    weights (w(t) = 1/t) a few rows just above a per-row floor at small t would pull the
    KL of all rows below it. So the term depends on the micro-batch's rows (the bound
    does not). Training only: never part of a reported bound.
    """
    b, d = kl_dims.shape
    group = d if group <= 0 else group  # 0: one floor for all of z
    if d % group:
        raise ValueError(f"free_bits_group={group} does not divide latent_dim={d}")
    per_group = kl_dims.view(b, d // group, group).sum(-1)  # (B, groups)
    weighted_mean = (lam_kl[:, None] * per_group).sum(0) / lam_kl.sum().clamp_min(1e-12)
    return lam_kl * torch.relu(free_bits * group - weighted_mean).sum()


def kl_beta(
    step: int,
    strategy: str,
    init_kl_weight: float,
    interval: int,
    cycles: int = 1,
    ramp: float = 1.0,
    hold: int = 0,
) -> float:
    """The KL weight beta at optimiser step `step` (training only; bounds use beta = 1).

    hold: beta stays at init_kl_weight for the first `hold` steps (z becomes useful before
    the KL pulls r to the prior); the schedule below starts after them.

    klweight: rises linearly from init_kl_weight to 1 over `interval` steps, then stays 1.
    cyclical (Fu et al. 2019): `cycles` cycles of `interval` steps; in each, beta rises
    from init_kl_weight to 1 over the first `ramp` fraction and stays 1 for the rest;
    after the last cycle beta is 1. none: beta = 1.
    """
    if strategy == "none" or interval <= 0:
        return 1.0
    step = max(0, step - hold)
    if strategy == "cyclical":
        if step >= cycles * interval:
            return 1.0
        step = step % interval
        interval = max(1.0, ramp * interval)
    return min(1.0, init_kl_weight + (1.0 - init_kl_weight) * step / interval)


def iwae_delbo(recon, kl, lam_rec, lam_kl, beta: float = 1.0) -> torch.Tensor:
    """Per-sequence loss (B,) from recon, kl (B, K) and weights (B,). K = 1 gives the DELBO."""
    ell = (lam_rec / lam_kl)[:, None] * recon - beta * kl  # (B, K)
    log_mean = torch.logsumexp(ell, dim=1) - math.log(ell.shape[1])
    return -lam_kl * log_mean


def nelbo_mdlm(recon: torch.Tensor, lam_rec: torch.Tensor) -> torch.Tensor:
    """MDLM's per-sequence NELBO (B,) = lam_rec(t) * sum over masked positions of -log p."""
    return -lam_rec * recon

"""Training / evaluation objectives: MDLM NELBO, VADD (IWAE-)DELBO and the AR NLL.

Each objective maps a batch of clean tokens to per-sequence losses; the maths lives in
losses.py, this module only wires networks to it. Losses are normalised per real token
(padding excluded), matching MDLM's reported NLL.
"""

from dataclasses import dataclass, field

import torch

from algorithms import losses
from noise_schedule import NoiseSchedule


@dataclass(frozen=True)
class DiffusionSpec:
    """Everything about the diffusion process an objective or sampler needs."""

    noise: NoiseSchedule
    mask_id: int
    vocab_size: int  # real tokens; ids >= vocab_size never compete in the softmax
    num_steps: int = 0  # MDLM's `T`: 0 = continuous time
    kl_weighting: str = "time"
    time_conditioning: bool = False
    fade_to_prior: bool = False  # decoder.fade_to_prior: r_t fades to the prior as t -> 0

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.noise.sigma(t) if self.time_conditioning else torch.zeros_like(t)


@dataclass
class Draws:
    """Pre-drawn noise for one micro-batch (None: draw from the global RNG).

    Training draws these for the whole global batch from the step's seed and slices this
    micro-batch's rows, so the losses do not depend on how the global batch is split over
    devices and accumulation steps.
    """

    mask_u: torch.Tensor | None = None  # (B, L) uniforms of the forward masking
    z_eps: torch.Tensor | None = None  # (B, K, ...) standard normals of the latent


@dataclass(frozen=True)
class FreeBits:
    """Training-only KL floor (losses.free_bits_penalty): nats per latent dimension of the
    weighted KL, applied per group of `group` dimensions. nats = 0: off."""

    nats: float = 0.0
    group: int = 1


@dataclass
class Latent:
    """The encoder's output for a batch, kept for the collapse diagnostics (detached)."""

    mu: torch.Tensor  # (B, d) or (B, L, d)
    log_sigma: torch.Tensor
    t: torch.Tensor  # (B,) the diffusion time of each row
    position_mask: torch.Tensor | None  # (B, L) real positions, None = all


@dataclass
class LossOutput:
    per_seq: torch.Tensor  # (B,) loss per sequence (float32, differentiable)
    num_tokens: torch.Tensor  # () number of real tokens in the batch
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    latent: Latent | None = None

    @property
    def loss(self) -> torch.Tensor:
        return self.per_seq.sum() / self.num_tokens


def _noisy_batch(x0, key_mask, t, spec: DiffusionSpec, draws: Draws | None = None):
    """Discretise t if needed, mask x0 (never padding); return t, xt, masked (B, L)."""
    if spec.num_steps > 0:
        t = losses.discretize_t(t, spec.num_steps)
    xt = losses.mask_tokens(x0, t, spec.noise, spec.mask_id, u=draws and draws.mask_u)
    if key_mask is not None:
        xt = torch.where(key_mask, xt, x0)
    return t, xt, xt == spec.mask_id


def _recon(backbone, x0, xt, masked, sigma, spec, z=None, key_mask=None) -> torch.Tensor:
    """Sum over masked positions of log p(x0^l | xt, z): (B,)."""
    kwargs = {} if z is None else {"z": z}
    logits = backbone(xt, sigma, key_mask=key_mask, out_mask=masked, **kwargs)  # (N, V_out)
    logp = losses.masked_token_logp(logits, x0[masked], spec.vocab_size)
    return losses.scatter_rows(logp, masked).sum(-1)


def mdlm_loss(backbone, x0, key_mask, t, spec: DiffusionSpec, draws=None) -> LossOutput:
    t, xt, masked = _noisy_batch(x0, key_mask, t, spec, draws)
    recon = _recon(backbone, x0, xt, masked, spec.sigma(t), spec, key_mask=key_mask)
    lam_rec, _ = losses.loss_weights(t, spec.noise, spec.kl_weighting, spec.num_steps)
    per_seq = losses.nelbo_mdlm(recon, lam_rec)
    return LossOutput(per_seq, _num_tokens(x0, key_mask), {"recon": -recon.detach()})


def vae_loss(
    backbone,
    encoder,
    x0,
    key_mask,
    t,
    spec: DiffusionSpec,
    *,
    beta=1.0,
    num_particles=1,
    draws=None,
    free_bits: FreeBits | None = None,
) -> LossOutput:
    """(IWAE-)DELBO: one encoder pass, K decoder passes on the same xt.

    `free_bits` adds the training-only KL floor; evaluation never passes it, so a
    reported bound is always the plain (IWAE-)DELBO at beta = 1."""
    t, xt, masked = _noisy_batch(x0, key_mask, t, spec, draws)
    sigma = spec.sigma(t)
    mu, log_sigma = encoder(x0, ~masked, sigma, key_mask)  # (B, d) or (B, L, d)
    if spec.fade_to_prior:  # r at time t: between the prior and the encoder's r (losses.py)
        mu, log_sigma = losses.fade_posterior(mu, log_sigma, spec.noise.mask_prob(t))
    z, eps = losses.reparameterize(mu, log_sigma, num_particles, draws and draws.z_eps)
    K, rep = num_particles, lambda a: a.repeat_interleave(num_particles, 0)
    km = None if key_mask is None else rep(key_mask)
    recon = _recon(backbone, rep(x0), rep(xt), rep(masked), rep(sigma), spec, z.flatten(0, 1), km)
    recon = recon.view(-1, K)  # (B, K)
    kl = losses.kl_one_sample(z, eps, log_sigma, key_mask)  # (B, K)
    lam_rec, lam_kl = losses.loss_weights(t, spec.noise, spec.kl_weighting, spec.num_steps)
    per_seq = losses.iwae_delbo(recon, kl, lam_rec, lam_kl, beta)
    stats = {
        "recon": -recon.detach().mean(1),
        "kl": kl.detach().mean(1),
        "kl_closed": losses.kl_closed_form(mu.detach(), log_sigma.detach(), key_mask),
        "mu_std": mu.detach().flatten(1).std(0, correction=0).mean().expand(x0.shape[0]),
    }
    if free_bits is not None and free_bits.nats > 0:
        kl_dims = losses.kl_closed_per_dim(mu, log_sigma, key_mask)  # (B, d), differentiable
        extra = beta * losses.free_bits_penalty(kl_dims, lam_kl, free_bits.nats, free_bits.group)
        per_seq = per_seq + extra
        stats["free_bits"] = extra.detach()
    latent = Latent(mu.detach(), log_sigma.detach(), t.detach(), key_mask)
    return LossOutput(per_seq, _num_tokens(x0, key_mask), stats, latent)


def vae_prior_nelbo(backbone, x0, key_mask, t, spec: DiffusionSpec, latent_shape) -> LossOutput:
    """MDLM NELBO of a VADD decoder with z drawn from the prior (for comparison)."""
    t, xt, masked = _noisy_batch(x0, key_mask, t, spec)
    z = torch.randn((x0.shape[0], *latent_shape), device=x0.device)
    recon = _recon(backbone, x0, xt, masked, spec.sigma(t), spec, z, key_mask)
    lam_rec, _ = losses.loss_weights(t, spec.noise, spec.kl_weighting, spec.num_steps)
    return LossOutput(losses.nelbo_mdlm(recon, lam_rec), _num_tokens(x0, key_mask))


def ar_loss(net, x0, key_mask, spec: DiffusionSpec) -> LossOutput:
    """Next-token NLL: predict x0[:, 1:] from x0[:, :-1] (the first token is given)."""
    inputs, targets = x0[:, :-1], x0[:, 1:]
    valid = torch.ones_like(targets, dtype=torch.bool) if key_mask is None else key_mask[:, 1:]
    logits = net(inputs, out_mask=valid)  # (N, V_out)
    logp = losses.masked_token_logp(logits, targets[valid], spec.vocab_size)
    per_seq = -losses.scatter_rows(logp, valid).sum(-1)
    return LossOutput(per_seq, valid.sum())


def _num_tokens(x0, key_mask) -> torch.Tensor:
    if key_mask is None:
        return torch.tensor(x0.numel(), device=x0.device)
    return key_mask.sum()

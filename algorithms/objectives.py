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
    frame: tuple[int, ...] = ()  # keep_frame=True: positions never masked and not counted

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


def _diffused(x0, key_mask, spec: DiffusionSpec) -> torch.Tensor | None:
    """(B, L) positions the forward process may mask and the bound counts: the real
    tokens outside the frame (spec.frame, given like a prompt). None: every position."""
    if not spec.frame:
        return key_mask
    keep = torch.ones_like(x0, dtype=torch.bool) if key_mask is None else key_mask.clone()
    keep[:, list(spec.frame)] = False
    return keep


def _noisy_batch(x0, key_mask, t, spec: DiffusionSpec, draws: Draws | None = None):
    """Discretise t if needed, mask x0 (never padding or the frame); return t, xt, masked
    (B, L)."""
    if spec.num_steps > 0:
        t = losses.discretize_t(t, spec.num_steps)
    xt = losses.mask_tokens(x0, t, spec.noise, spec.mask_id, u=draws and draws.mask_u)
    diffused = _diffused(x0, key_mask, spec)
    if diffused is not None:
        xt = torch.where(diffused, xt, x0)
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
    return LossOutput(per_seq, _num_tokens(x0, key_mask, spec), {"recon": -recon.detach()})


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
    return LossOutput(per_seq, _num_tokens(x0, key_mask, spec), stats, latent)


def vae_prior_nelbo(backbone, x0, key_mask, t, spec: DiffusionSpec, latent_shape) -> LossOutput:
    """MDLM NELBO of a VADD decoder with z drawn from the prior (for comparison)."""
    t, xt, masked = _noisy_batch(x0, key_mask, t, spec)
    z = torch.randn((x0.shape[0], *latent_shape), device=x0.device)
    recon = _recon(backbone, x0, xt, masked, spec.sigma(t), spec, z, key_mask)
    lam_rec, _ = losses.loss_weights(t, spec.noise, spec.kl_weighting, spec.num_steps)
    return LossOutput(losses.nelbo_mdlm(recon, lam_rec), _num_tokens(x0, key_mask, spec))


# ---------------------------------------------------------------- RADD's and SEDD's losses
def lambda_dce_loss(backbone, x0, key_mask, lam, spec: DiffusionSpec, draws=None) -> LossOutput:
    """RADD's lambda-DCE: each real position masked with probability lam (B,), the
    masking ratio drawn directly (no schedule); loss (1 / lam) sum_masked -log p(x0 | xt).
    Its expectation over lam ~ U(0, 1] is the continuous-time NELBO, as t-DCE's."""
    masked = _uniforms(x0, draws) < lam[:, None]
    return _dce(backbone, x0, key_mask, masked, lam.reciprocal(), spec)


def k_dce_loss(backbone, x0, key_mask, u_k, spec: DiffusionSpec, draws=None) -> LossOutput:
    """RADD's k-DCE (the any-order autoregressive objective): k ~ U{1..n} of the n real
    positions masked, a uniformly random subset; loss (n / k) sum_masked -log p. Its
    expectation is the NLL of an any-order AR model averaged over random orders.
    u_k (B,) in [0, 1) picks k = floor(u_k n) + 1 (stratified like t)."""
    diffused = _diffused(x0, key_mask, spec)
    n = x0.new_full((x0.shape[0],), x0.shape[1]) if diffused is None else diffused.sum(1)
    k = torch.minimum((u_k * n).floor().long() + 1, n).clamp_min(1)  # n = 0: weight 0
    masked = losses.mask_exactly_k(_uniforms(x0, draws), k, diffused)
    return _dce(backbone, x0, key_mask, masked, n / k, spec)


def _uniforms(x0, draws) -> torch.Tensor:
    """The (B, L) uniforms of the forward masking: pre-drawn for the global batch, or new."""
    if draws is not None and draws.mask_u is not None:
        return draws.mask_u
    return torch.rand(x0.shape, device=x0.device)


def _dce(backbone, x0, key_mask, masked, weight, spec) -> LossOutput:
    diffused = _diffused(x0, key_mask, spec)
    if diffused is not None:
        masked = masked & diffused
    xt = torch.where(masked, spec.mask_id, x0)
    sigma = torch.zeros(x0.shape[0], device=x0.device)  # time-free: checked at start-up
    recon = _recon(backbone, x0, xt, masked, sigma, spec, key_mask=key_mask)
    per_seq = -weight.to(recon.dtype) * recon
    return LossOutput(per_seq, _num_tokens(x0, key_mask, spec), {"recon": -recon.detach()})


def score_entropy_loss(
    backbone, x0, key_mask, t, spec: DiffusionSpec, log_score, draws=None
) -> LossOutput:
    """Diffusion-weighted denoising score entropy (SEDD's loss; RADD's t-DSE): per masked
    position sigma'(t) x score_entropy, sigma = -log alpha_t. log_score(logits (N, V)
    float32, alpha (N,)) turns the network's output into log-scores (the algorithm's)."""
    t, xt, masked = _noisy_batch(x0, key_mask, t, spec, draws)
    logits = backbone(xt, spec.sigma(t), key_mask=key_mask, out_mask=masked)  # (N, V_out)
    alpha = spec.noise.alpha(t).double()  # (B,)
    rows = alpha[:, None].expand_as(masked)[masked]  # (N,)
    score = log_score(logits[:, : spec.vocab_size].float(), rows)
    entropy = losses.score_entropy(score, x0[masked], rows.to(score.dtype))
    dsigma = (-spec.noise.dalpha(t) / spec.noise.alpha(t)).double()  # (B,)
    per_pos = losses.scatter_rows(entropy, masked)  # (B, L)
    per_seq = (dsigma * per_pos.sum(-1)).float()
    return LossOutput(per_seq, _num_tokens(x0, key_mask, spec))


@torch.no_grad()
def any_order_nll(backbone, x0, key_mask, rank, spec: DiffusionSpec, rows_per_call=64):
    """Exact NLL (B,) of x0 under the any-order AR model the denoiser defines, in the
    order `rank` (B, L) gives (position with rank i is predicted i-th, from the tokens of
    smaller rank): sum_i -log p(x^{pi_i} | x^{pi_<i}), i.e. n network calls for n real
    positions, batched `rows_per_call` sequences at a time."""
    B, L = x0.shape
    diffused = _diffused(x0, key_mask, spec)  # the frame is given, as padding is, not scored
    n = torch.full((B,), L, device=x0.device) if diffused is None else diffused.sum(1)
    real = torch.ones_like(x0, dtype=torch.bool) if diffused is None else diffused
    if diffused is not None:  # scored positions first, in the given order
        rank = rank.double().masked_fill(~diffused, float("inf"))
    rank = rank.argsort(1).argsort(1)  # 0..L-1 per row, padding last
    total = torch.zeros(B, dtype=torch.float64, device=x0.device)
    steps = torch.arange(int(n.max()), device=x0.device)
    per_call = max(1, rows_per_call // B)
    for chunk in steps.split(per_call):  # (g,) steps at once: g * B rows per call
        i = chunk[:, None, None]  # (g, 1, 1)
        masked = ((rank[None] >= i) & real[None]).flatten(0, 1)  # (g B, L)
        target = ((rank[None] == i) & real[None]).flatten(0, 1)
        x = x0.repeat(len(chunk), 1)
        xt = torch.where(masked, spec.mask_id, x)
        km = None if key_mask is None else key_mask.repeat(len(chunk), 1)
        sigma = _visible_sigma(masked, n.repeat(len(chunk)), spec)
        logits = backbone(xt, sigma, key_mask=km, out_mask=target)
        logp = losses.masked_token_logp(logits, x[target], spec.vocab_size)
        total -= losses.scatter_rows(logp.double(), target).sum(-1).view(len(chunk), B).sum(0)
    return total


def _visible_sigma(masked, real, spec: DiffusionSpec) -> torch.Tensor:
    """sigma of rows with no time (B,): 0, or for a time-conditioned net -log of the
    visible fraction of the `real` (B,) positions (at least alpha(1), the noisiest level
    it was trained on)."""
    if not spec.time_conditioning:
        return torch.zeros(masked.shape[0], device=masked.device)
    floor = spec.noise.alpha(torch.tensor(1.0, dtype=torch.float64)).item()
    visible = 1.0 - masked.sum(1).double() / real.double()
    return (-torch.log(visible.clamp_min(floor))).float()


def ar_loss(net, x0, key_mask, spec: DiffusionSpec) -> LossOutput:
    """Next-token NLL: predict x0[:, 1:] from x0[:, :-1] (the first token is given)."""
    inputs, targets = x0[:, :-1], x0[:, 1:]
    valid = torch.ones_like(targets, dtype=torch.bool) if key_mask is None else key_mask[:, 1:]
    logits = net(inputs, out_mask=valid)  # (N, V_out)
    logp = losses.masked_token_logp(logits, targets[valid], spec.vocab_size)
    per_seq = -losses.scatter_rows(logp, valid).sum(-1)
    return LossOutput(per_seq, valid.sum())


def _num_tokens(x0, key_mask, spec: DiffusionSpec) -> torch.Tensor:
    diffused = _diffused(x0, key_mask, spec)
    if diffused is None:
        return torch.tensor(x0.numel(), device=x0.device)
    return diffused.sum()

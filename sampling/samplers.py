"""Samplers: ancestral masked diffusion (MDLM `ddpm`, VADD `vae`, RADD `tweedie` /
`euler`, SEDD `analytic`), RADD's any-order autoregressive sampler (`any_order`), MDLM's
semi-autoregressive windows (`sample_semi_ar`) and left-to-right AR decoding.

One reverse step t -> s of absorbing diffusion reveals each still-masked position with
probability (alpha_s - alpha_t) / (1 - alpha_t) and, if revealed, draws its token from
p(x0 | xt, z). Whether a position is revealed does not depend on the network, so we
draw that first and run the output projection on the revealed positions only. The
`cache` variants (`vae_cache`, `ddpm_cache`; `tweedie`, `euler`, `analytic` always) also
skip the network for every row with nothing to reveal; the random draws are identical
either way, so both variants give the same samples for the same seed (z drawn for every
row at every step in both). For a time-independent network that is RADD's per-row cache
(its logits would only be recomputed for rows that changed); a time-conditioned one is
still called at each step it is needed, with that step's sigma.

Probabilities and Gumbel noise are float64 (float32 Gumbel-max truncates the tail and
lowers generative perplexity). Revealed tokens may be restricted to the top-k / nucleus
(top-p) set first (`filter_logits`); the filter uses no random numbers, so it leaves the
random stream, and hence cache == no cache, intact. Positions that are not [MASK] in
`x_init` are never changed, which is all conditional sampling (prefix, suffix,
infilling) needs.

sample_masked's `update` picks the reveal rule: `tweedie` is the exact reveal probability
above (ddpm, vae and RADD's tweedie), `euler` RADD's first-order rate
dt * (-alpha'_t) / (1 - alpha_t) (clamped to [0, 1]), and `analytic` SEDD's Tweedie
tau-leaping through the concrete score, which draws "reveal or stay masked" and the token
as ONE categorical, so it needs the network at every masked position. Its `final` picks
the end of the chain: `argmax` adds the greedy noise-removal step at t = eps (MDLM, SEDD),
`sample` makes the last of the `steps` steps reveal every remaining position by sampling
(RADD). For `analytic` that last step at t = eps is SEDD's denoiser: a draw from the
score, not an argmax.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from noise_schedule import NoiseSchedule

# denoise(xt (b, L), sigma (b,), z (b, ...) | None, out_mask (b, L)) -> logits (N, V_out)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
LatentFn = Callable[[int], torch.Tensor]  # n -> z of shape (n, ...)
ORDERS = ("left_to_right", "random")


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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits (N, V) outside the kept set to -inf; top_k=0 and top_p=1.0 keep everything.

    top_k keeps exactly the k largest logits of each row (ties broken arbitrarily). top_p
    then keeps the smallest set of most probable tokens whose probability, renormalised
    over what top_k kept, reaches top_p (the most probable token is always kept).
    """
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.double().softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more probable tokens
        drop = mass_before >= top_p  # the set already reached top_p without this token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


def gumbel_argmax(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    chunk: int = 1024,
    top_k: int = 0,
    top_p: float = 1.0,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample from softmax(filter_logits(logits)) (N, V) by float64 Gumbel-max, chunked
    over rows so the float64 copy (and the top-p sort) never covers all N rows at once.

    transform: maps each filtered float64 chunk (n, V) to the log-weights (n, V') that are
    drawn from instead (the analytic step: V real tokens + "stay masked")."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i in range(0, logits.shape[0], chunk):
        block = filter_logits(logits[i : i + chunk].double(), top_k, top_p)
        if transform is not None:
            block = transform(block)
        u = torch.rand(block.shape, generator=generator, device=block.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        out[i : i + chunk] = (block + gumbel).argmax(-1)
    return out


UPDATES = ("tweedie", "euler", "analytic")
FINALS = ("argmax", "sample")
# log_score(logits (N, V) of masked positions, alpha_t) -> (N, V) log concrete score
LogScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    update: str = "tweedie",
    final: str = "argmax",
    log_score: LogScoreFn | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Run `steps` reverse steps on the grid 1 -> eps from x_init (B, L); return tokens, stats.

    latent: draws z for n sequences (None for MDLM). fixz=True draws z once per sequence
    for the whole chain (consistency sampler); fixz=False redraws it at every step.
    top_k / top_p restrict the revealed tokens (filter_logits; the greedy noise removal
    keeps both). update / final: the reveal rule and the chain's end (module docstring);
    final="sample" leaves nothing for noise_removal. log_score (update="analytic" only):
    Algorithm.log_score; the filter applies to the logits it is formed from."""
    _check_rule(update, final, log_score)
    x, stats = x_init.clone(), SampleStats(steps)
    B, device = x.shape[0], x.device
    z_fixed = latent(B) if (latent is not None and fixz) else None
    grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64, device=device)
    dt = (1.0 - eps) / steps
    draw = lambda logits: gumbel_argmax(logits[:, :vocab_size], generator, top_k=top_k, top_p=top_p)
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        masked = x == mask_id
        if update == "analytic":  # reveal and token in one draw: every masked position
            positions = masked
            pick = _analytic_pick(noise, t, s, vocab_size, mask_id, log_score, generator,
                                  top_k, top_p)  # fmt: skip
        else:  # drawn even at a last reveal-all step: the stream stays that of `tweedie`
            u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
            last = final == "sample" and i == steps - 1
            positions = masked if last else masked & (u < reveal_prob(noise, update, t, s, dt))
            pick = draw
        z = z_fixed if (fixz or latent is None) else latent(B)
        sigma = _sigma(noise, t, B, time_conditioning)
        _predict_into(x, positions, denoise, z, sigma, cache, stats, pick)
    if final == "argmax" and noise_removal and (x == mask_id).any():  # last step at t = eps
        z = z_fixed if (fixz or latent is None) else latent(B)
        last = _final_pick(update, vocab_size, log_score, noise.alpha(grid[-1]), generator,
                           top_k, top_p)  # fmt: skip
        sigma = _sigma(noise, grid[-1], B, time_conditioning)
        _predict_into(x, x == mask_id, denoise, z, sigma, True, stats, last)
    return x, stats


def _check_rule(update: str, final: str, log_score) -> None:
    if update not in UPDATES or final not in FINALS:
        raise ValueError(f"update={update!r}, final={final!r}: use one of {UPDATES}, {FINALS}")
    if update == "analytic" and final == "sample":
        raise ValueError("update='analytic' ends with final='argmax' (SEDD's denoiser step)")
    if update == "analytic" and log_score is None:
        raise ValueError("update='analytic' needs log_score (Algorithm.log_score)")


def _final_pick(update, vocab_size, log_score, a_eps, generator, top_k, top_p):
    """The pick of the last step at t = eps: MDLM's greedy noise removal, or for
    `analytic` SEDD's denoiser, a draw from the score (for SUBS: from p(x0 | xt))."""
    if update != "analytic":
        return lambda logits: logits[:, :vocab_size].argmax(-1)
    score = lambda block: log_score(block, a_eps)
    return lambda logits: gumbel_argmax(
        logits[:, :vocab_size], generator, top_k=top_k, top_p=top_p, transform=score
    )


def reveal_prob(noise: NoiseSchedule, update: str, t, s, dt: float) -> torch.Tensor:
    """P(a position masked at t is revealed at s = t - dt): tweedie (alpha_s - alpha_t) /
    (1 - alpha_t), exact; euler dt * (-alpha'_t) / (1 - alpha_t), clamped to [0, 1]."""
    if update == "euler":
        return (dt * noise.loss_weight(t)).clamp(0.0, 1.0)
    return noise.unmask_prob(t, s)


def analytic_step_probs(log_score: torch.Tensor, alpha_t, alpha_s) -> torch.Tensor:
    """SEDD's Tweedie tau-leaping step t -> s at masked positions: (N, V) log score ->
    (N, V + 1) probabilities of each real token and (last column) of staying masked.

    weight_y = exp(score_y) (alpha_s / alpha_t - 1); weight_mask = max(0, 1 - (alpha_s /
    alpha_t - 1) sum_y exp(score_y)) (Absorbing staggered score x transposed transition
    with dsigma = sigma_t - sigma_s); normalised in float64. For the SUBS score these are
    p(y | xt) (alpha_s - alpha_t) / (1 - alpha_t) and (1 - alpha_s) / (1 - alpha_t).
    """
    f64 = dict(dtype=torch.float64, device=log_score.device)
    ratio = torch.as_tensor(alpha_s, **f64) / torch.as_tensor(alpha_t, **f64) - 1.0
    weights = log_score.double().exp() * ratio.reshape(-1, 1)  # alpha: a scalar or (N,)
    stay = (1.0 - weights.sum(-1, keepdim=True)).clamp_min(0.0)
    probs = torch.cat([weights, stay], -1)
    return probs / probs.sum(-1, keepdim=True)


def _analytic_pick(noise, t, s, vocab_size, mask_id, log_score, generator, top_k, top_p):
    """logits (N, V_out) of masked positions -> a token, or mask_id to stay masked.

    top-k / top-p filter the logits before the score is formed (filtered tokens get
    weight 0). For the SUBS score, log_softmax renormalises over the kept tokens: the
    reveal probability is unchanged and a revealed token follows the filtered p(x0 | xt),
    as in ddpm. For an unnormalised score (SEDD's parameterisation) the filtered tokens'
    weight goes to "stay masked" instead."""
    a_t, a_s = noise.alpha(t), noise.alpha(s)

    def pick(logits):
        def log_probs(block):  # float64 logits (exact copies): a float64 score, so the
            # stay-masked weight 1 - (a_s / a_t - 1) sum exp(score) keeps its digits late
            return analytic_step_probs(log_score(block, a_t), a_t, a_s).log()

        idx = gumbel_argmax(logits[:, :vocab_size], generator, top_k=top_k, top_p=top_p,
                            transform=log_probs)  # fmt: skip
        return idx.masked_fill(idx == vocab_size, mask_id)

    return pick


@torch.no_grad()
def sample_any_order(
    denoise: DenoiseFn,
    x_init: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    order: str = "left_to_right",
    latent: LatentFn | None = None,
    fixz: bool = True,
    noise: NoiseSchedule | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """RADD's any-order autoregressive sampler: reveal ONE masked position per row per call.

    order: `left_to_right` reveals the first still-masked position; `random` follows a
    uniformly random permutation per row (drawn from `generator`). Given (non-mask)
    positions are skipped, so a row with n free positions takes n network calls (rows
    already complete are left out of a call). There is no time grid: `steps` does not
    apply. latent/fixz as in sample_masked: one z per sequence, or a new z per call.
    noise: pass it for time-conditioned models; sigma then follows the fraction of
    visible tokens (sigma = -log alpha with alpha = that fraction); None feeds sigma = 0.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: use one of {ORDERS}")
    x, stats = x_init.clone(), SampleStats(steps=0)
    B, device = x.shape[0], x.device
    rank = _order_rank(x.shape, order, generator, device)  # smaller rank = revealed earlier
    z_fixed = latent(B) if (latent is not None and fixz) else None
    draw = lambda logits: gumbel_argmax(logits[:, :vocab_size], generator, top_k=top_k, top_p=top_p)
    stats.steps = int((x == mask_id).sum(1).max()) if x.numel() else 0
    for _ in range(stats.steps):
        masked = x == mask_id
        nxt = rank.masked_fill(~masked, math.inf).argmin(1, keepdim=True)
        reveal = torch.zeros_like(masked).scatter_(1, nxt, True) & masked  # complete rows: none
        z = z_fixed if (fixz or latent is None) else latent(B)
        _predict_into(x, reveal, denoise, z, _visible_sigma(x, mask_id, noise), True, stats, draw)
    return x, stats


def _order_rank(shape, order: str, generator, device) -> torch.Tensor:
    """(B, L) float64 ranks: the position index, or iid uniforms (argsort = a random
    permutation, uniform over permutations)."""
    if order == "random":
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return torch.arange(shape[1], device=device, dtype=torch.float64).expand(shape)


def _visible_sigma(x: torch.Tensor, mask_id: int, noise: NoiseSchedule | None) -> torch.Tensor:
    if noise is None:
        return torch.zeros(x.shape[0], device=x.device)
    # The noisiest level seen in training is alpha(1); all-[MASK] rows get that one.
    alpha_min = noise.alpha(torch.tensor(1.0, dtype=torch.float64)).item()
    visible = (x != mask_id).double().mean(1).clamp_min(alpha_min)
    return (-torch.log(visible)).float()


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


# window (B, L) with mask_id at free positions -> (tokens (B, L), stats dict)
WindowFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


@torch.no_grad()
def sample_semi_ar(
    sample_window: WindowFn,
    x_init: torch.Tensor,
    *,
    stride_length: int,
    num_strides: int,
    mask_id: int,
) -> tuple[torch.Tensor, dict]:
    """MDLM's semi-autoregressive sampler: num_strides windows of L = x_init.shape[1] tokens.

    The first window is x_init (its given tokens, e.g. BOS and a prefix, are kept). After
    each window its first stride_length tokens are final; the window shifts left by
    stride_length, the freed tail is [MASK] again, and the L - stride_length kept tokens
    are the next window's given tokens, so no sampler changes them. Returns (B, L +
    (num_strides - 1) * stride_length) tokens and the windows' stats summed (steps,
    network calls and NFE per sequence over all windows) plus `windows`. (MDLM's own loop
    runs num_strides + 1 windows.)
    """
    B, L = x_init.shape
    if not 1 <= stride_length <= L or num_strides < 1:
        raise ValueError(f"stride_length={stride_length} must be in [1, {L}], "
                         f"num_strides={num_strides} >= 1")  # fmt: skip
    window, pieces, totals = x_init, [], {"windows": num_strides}
    for k in range(num_strides):
        x, stats = sample_window(window)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0) + value
        if k == num_strides - 1:
            pieces.append(x)
            break
        pieces.append(x[:, :stride_length])
        tail = torch.full((B, stride_length), mask_id, dtype=x.dtype, device=x.device)
        window = torch.cat([x[:, stride_length:], tail], 1)
    return torch.cat(pieces, 1), totals


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
    top_k: int = 0,
    top_p: float = 1.0,
    x_init: torch.Tensor | None = None,
    mask_id: int | None = None,
) -> torch.Tensor:
    """Left-to-right ancestral sampling; logits_fn(prefix (B, i)) -> (B, i, V_out).

    x_init (B, L) with mask_id at free positions keeps every other token (teacher-forced
    into the prefix as it grows); position 0 is BOS unless x_init gives it.
    """
    x = torch.full((batch_size, length), bos_id, dtype=torch.long, device=device)
    given = torch.zeros_like(x, dtype=torch.bool)
    if x_init is not None:
        x_init = x_init.to(device)
        given = x_init != mask_id
        x = torch.where(given, x_init, x)
    for i in range(1, length):
        logits = logits_fn(x[:, :i])[:, -1, :vocab_size]
        drawn = gumbel_argmax(logits, generator, top_k=top_k, top_p=top_p)
        x[:, i] = torch.where(given[:, i], x[:, i], drawn)
    return x

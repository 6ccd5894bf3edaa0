"""Posterior-collapse diagnostics of VADD's latent z, as pure functions plus one accumulator.

A collapsed latent is one the encoder no longer fills: r(z | x0, xt) equals the prior
N(0, I) for every input, so the KL is ~0 and the decoder ignores z. Four views of it:

- KL per sequence (the one-sample estimate the bound uses, and the closed form) and its
  split per latent dimension: which dimensions carry anything at all.
- Active units (Burda et al. 2016): dimension j is active when the encoder mean varies
  across inputs, Var_x(E[z_j | x]) > 0.01. A dimension can have a KL above zero and still
  be inactive (sigma < 1 with the same mu for every input carries no information).
- Mutual information I(z; x) under the aggregate posterior q(z) = mean_n r(z | x_n)
  (Hoffman & Johnson 2016): I = E_n E_{z ~ r(.|x_n)} [log r(z | x_n) - log q(z)], estimated
  on the first evaluated rows (at most MI_ROWS). The estimate cannot exceed log N.
- KL as a function of t, in T_BINS equal bins of t: where along the diffusion z is used.

"x" is the encoder's input (x0 and, with decoder.mask_struc=adaln, the positions visible
in xt) for the (t, xt) draws the evaluation makes. For per-position latents
(model.latent1d=False) the units are the latent dimensions with positions pooled, and the
MI treats the (L, d) latent of a sequence as one vector (padding positions are the prior
for every row, so they add nothing).
"""

import math

import torch

from algorithms import losses

ACTIVE_THRESHOLD = 0.01  # Burda et al.'s threshold on Var_x E[z_j | x]
MI_ROWS = 2048  # rows kept for the O(N^2 d) MI estimate (in all)
T_BINS = 10
# The quickstart's warning: the latent counts as collapsed below either of these.
COLLAPSE_KL = 0.5  # nats per sequence (closed form)
COLLAPSE_MI = 0.1  # nats


def kl_per_dim(mu: torch.Tensor, log_sigma: torch.Tensor, position_mask=None) -> torch.Tensor:
    """Closed-form KL per sequence and latent dimension in float64: (B, d) (see losses)."""
    return losses.kl_closed_per_dim(mu.double(), log_sigma.double(), position_mask)


def active_units(
    mean_sum: torch.Tensor, sq_sum: torch.Tensor, count: float, threshold: float = ACTIVE_THRESHOLD
) -> tuple[int, torch.Tensor]:
    """Active units from running sums over inputs of mu (d,) and mu^2 (d,).

    Returns (number of dimensions whose variance exceeds `threshold`, the variances (d,))."""
    if count < 2:
        return 0, torch.zeros_like(mean_sum)
    mean = mean_sum / count
    var = (sq_sum / count - mean**2).clamp_min(0.0) * count / (count - 1)
    return int((var > threshold).sum()), var


def mutual_information(
    mu: torch.Tensor, log_sigma: torch.Tensor, generator: torch.Generator | None = None
) -> float:
    """I(z; x) under the aggregate posterior of N rows of diagonal Gaussians (N, D), in nats.

    One z_n ~ r(. | x_n) per row; log q(z_n) = logsumexp_m log r(z_n | x_m) - log N. The
    difference of the two is averaged over rows. Computed in float64, O(N^2 D)."""
    mu, log_sigma = mu.double().flatten(1), log_sigma.double().flatten(1)
    n = mu.shape[0]
    if n < 2:
        return 0.0
    sigma = log_sigma.exp()
    eps = torch.randn(mu.shape, generator=generator, dtype=torch.float64, device=mu.device)
    z = mu + sigma * eps  # (N, D)
    # log r(z_n | x_m) for all pairs, summed over dimensions: (N, N)
    diff = (z[:, None, :] - mu[None, :, :]) / sigma[None, :, :]
    log_r = -(0.5 * diff**2 + log_sigma[None] + 0.5 * math.log(2 * math.pi)).sum(-1)
    log_q = torch.logsumexp(log_r, dim=1) - math.log(n)
    return float((log_r.diagonal() - log_q).mean())


def t_bin(t: torch.Tensor, bins: int = T_BINS) -> torch.Tensor:
    """Index of t's bin among `bins` equal bins of [0, 1]: (B,) long."""
    return (t.double() * bins).long().clamp(0, bins - 1)


class LatentStats:
    """Accumulates the diagnostics over evaluation batches (and draws) of one process.

    `add` takes the encoder's outputs of a batch; `sums()` returns tensors to all-reduce
    (sum) across processes; `rows()` the kept (mu, log_sigma) rows to gather for the MI;
    `summary(sums, rows)` turns the reduced values into the reported numbers.
    """

    def __init__(self, max_rows: int = MI_ROWS):
        self.max_rows = max_rows
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._kept = 0

    def add(self, mu, log_sigma, t, position_mask=None) -> None:
        mu, log_sigma = mu.detach(), log_sigma.detach()
        kl = kl_per_dim(mu, log_sigma, position_mask)  # (B, d)
        units = mu.double()
        if units.dim() == 3:  # per-position latents: positions are more samples of a unit
            keep = (
                torch.ones(units.shape[:2], dtype=torch.bool, device=units.device)
                if position_mask is None
                else position_mask.bool()
            )
            units = units[keep]
        bins = t_bin(t)
        one_hot = torch.nn.functional.one_hot(bins, T_BINS).double()  # (B, bins)
        self._add("kl_dim", kl.sum(0))
        self._add("unit_n", torch.tensor(float(units.shape[0]), device=mu.device))
        self._add("unit_sum", units.sum(0))
        self._add("unit_sq", (units**2).sum(0))
        self._add("t_kl", one_hot.T @ kl.sum(1))
        self._add("t_n", one_hot.sum(0))
        room = self.max_rows - self._kept
        if room > 0:
            if position_mask is not None and mu.dim() == 3:  # padding = the prior
                keep = position_mask[..., None].bool()
                mu = torch.where(keep, mu, 0.0)
                log_sigma = torch.where(keep, log_sigma, 0.0)
            self._rows.append((mu[:room].float().cpu(), log_sigma[:room].float().cpu()))
            self._kept += min(room, mu.shape[0])

    def _add(self, key, value):
        self._sums[key] = self._sums.get(key, 0.0) + value

    def sums(self) -> dict[str, torch.Tensor]:
        return dict(self._sums)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._rows:
            return None
        return torch.cat([m for m, _ in self._rows]), torch.cat([s for _, s in self._rows])

    @staticmethod
    def summary(sums: dict[str, torch.Tensor], rows, num_sequences: float, seed: int = 0) -> dict:
        """The reported diagnostics; `num_sequences` counts sequences x draws."""
        kl_dim = (sums["kl_dim"] / max(num_sequences, 1.0)).cpu()
        n_active, var = active_units(
            sums["unit_sum"].cpu(), sums["unit_sq"].cpu(), float(sums["unit_n"])
        )
        t_n, t_kl = sums["t_n"].cpu(), sums["t_kl"].cpu()
        out = {
            "kl_per_dim": [round(float(v), 6) for v in kl_dim],
            "active_units": n_active,
            "latent_dims": len(kl_dim),
            "active_unit_threshold": ACTIVE_THRESHOLD,
            "mu_var_per_dim": [round(float(v), 6) for v in var],
            "kl_by_t": {
                f"{i / T_BINS:.1f}-{(i + 1) / T_BINS:.1f}": (
                    round(float(t_kl[i] / t_n[i]), 6) if t_n[i] > 0 else None
                )
                for i in range(T_BINS)
            },
        }
        if rows is not None:
            rows = (rows[0][:MI_ROWS], rows[1][:MI_ROWS])  # gathered over processes: cap again
            gen = torch.Generator().manual_seed(seed)
            out["mutual_information"] = mutual_information(*rows, generator=gen)
            out["mi_rows"] = int(rows[0].shape[0])
            out["mi_max"] = math.log(max(int(rows[0].shape[0]), 1))  # the estimate's ceiling
        return out


def reduce_and_summarise(stats: LatentStats, strategy, num_sequences: float, seed: int) -> dict:
    """The summary over all processes: sums all-reduced, MI rows gathered (Lightning's
    strategy; a single process reduces to itself)."""
    sums = {k: strategy.reduce(v, reduce_op="sum") for k, v in stats.sums().items()}
    if not sums:
        return {}
    rows = stats.rows()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, rows)
        kept = [r for r in everyone if r is not None]
        rows = tuple(torch.cat(parts) for parts in zip(*kept, strict=True)) if kept else None
    return LatentStats.summary(sums, rows, num_sequences, seed)


def collapse_warning(results: dict) -> str | None:
    """One line when the reported diagnostics say the latent has collapsed, else None."""
    if "active_units" not in results:
        return None
    kl = results.get("kl_closed", 0.0)
    mi = results.get("mutual_information")
    collapsed = results["active_units"] == 0 or kl < COLLAPSE_KL
    collapsed = collapsed or (mi is not None and mi < COLLAPSE_MI)
    if not collapsed:
        return None
    mi_text = f", MI {mi:.3f} nats" if mi is not None else ""
    return (
        f"[vadd] warning: the latent z has collapsed (KL {kl:.3f} nats/sequence, "
        f"{results['active_units']}/{results['latent_dims']} active units{mi_text}): the "
        "decoder ignores z. Try decoder.fade_to_prior=True optim.encoder_lr_scale=0.15 "
        "training.kl_hold_steps=200 (recipe=cpu's remedies), or training.free_bits "
        "(README 'Posterior collapse')"
    )

"""The 2-D checkerboard toy: a density on [-4, 4]^2, discretised into a 2-token sequence.

The density is uniform on the 8 "black" squares of a 4 x 4 board of 2 x 2 squares (the
common toy of FFJORD / flow matching): square (i, j), counted from the lower-left corner,
is filled when i + j is even. Each coordinate is cut into `bins` equal bins, so a sample
is a length-2 token sequence over a vocabulary of `bins` real tokens (the [MASK] id is
`bins`), and the data distribution is a (bins, bins) grid of cell probabilities.

Why this toy: both marginals are uniform, so a sampler that draws the two coordinates
independently from their marginals (masked diffusion with one step) fills the whole
square and misses the board entirely. Only the joint carries the structure.

Divergences are in nats (natural log): JS lies in [0, log 2 = 0.693].
"""

import math

import torch

LOW, HIGH = -4.0, 4.0  # the support [-4, 4]^2
SQUARES = 4  # squares per side
SIDE = (HIGH - LOW) / SQUARES  # side length of one square (2.0)


def board() -> torch.Tensor:
    """(4, 4) float: 1 on the filled squares (i + j even), 0 on the empty ones."""
    i = torch.arange(SQUARES)
    return ((i[:, None] + i[None, :]) % 2 == 0).double()


def _bin_square_overlap(bins: int) -> torch.Tensor:
    """(bins, 4): length of the overlap of each bin with each column of squares."""
    edges = torch.linspace(LOW, HIGH, bins + 1, dtype=torch.float64)
    sq = LOW + SIDE * torch.arange(SQUARES + 1, dtype=torch.float64)
    lo = torch.maximum(edges[:-1, None], sq[None, :-1])
    hi = torch.minimum(edges[1:, None], sq[None, 1:])
    return (hi - lo).clamp_min(0.0)


def exact_distribution(bins: int) -> torch.Tensor:
    """(bins, bins) float64 grid P[a, b] = mass of the density in bin a of x times bin b of y.

    The density is 1 / (total filled area) on filled squares, so a cell's mass is the sum
    over squares of (x-overlap * y-overlap * filled) / area; exact for any `bins`.
    """
    overlap = _bin_square_overlap(bins)
    area = board().sum() * SIDE**2
    return overlap @ board() @ overlap.T / area


def sample_points(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) float64 points from the continuous checkerboard density."""
    filled = board().nonzero()  # (8, 2) square indices (i for x, j for y)
    which = torch.randint(len(filled), (n,), generator=generator)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    return LOW + SIDE * (filled[which].double() + u)


def discretize(points: torch.Tensor, bins: int) -> torch.Tensor:
    """Points in [-4, 4]^2 (n, 2) -> bin ids (n, 2) long in [0, bins)."""
    ids = torch.floor((points - LOW) / (HIGH - LOW) * bins).long()
    return ids.clamp(0, bins - 1)  # the closed upper edge HIGH belongs to the last bin


def sample_tokens(n: int, bins: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) token sequences drawn from exact_distribution(bins)."""
    return discretize(sample_points(n, generator), bins)


def histogram(samples: torch.Tensor, bins: int) -> torch.Tensor:
    """Token pairs (n, 2) -> (bins, bins) float64 empirical distribution (sums to 1)."""
    flat = samples[:, 0].long() * bins + samples[:, 1].long()
    counts = torch.bincount(flat, minlength=bins * bins).double()
    return (counts / counts.sum().clamp_min(1.0)).view(bins, bins)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats; 0 log 0 = 0 (q must cover p's support for a finite value)."""
    p, q = p.double().flatten(), q.double().flatten()
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum()


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in nats between two distributions on the same grid.

    JS = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2: symmetric, always finite,
    0 iff p == q, at most log 2 (disjoint supports). Inputs are normalised first.
    """
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = 0.5 * (p + q)
    js = 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)
    return float(js.clamp(0.0, math.log(2.0)))  # clamp only rounding error


def product_of_marginals(p: torch.Tensor) -> torch.Tensor:
    """The independent-coordinates distribution with p's marginals: p(x) p(y)."""
    p = p.double() / p.sum()
    return p.sum(1)[:, None] * p.sum(0)[None, :]

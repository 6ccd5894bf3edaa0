"""One validation batch: the Monte-Carlo bound over `eval.ppl_times` draws, batched, and
the exact any-order likelihood when `eval.any_order` asks for it.

On an accelerator, draws are stacked along the batch dimension, so ppl_times=1024
(RADD's evaluation) costs 1024 / g network calls for g draws a call instead of 1024, with
g chosen so that one call holds about EVAL_TOKENS_PER_CALL tokens. On CPU one draw a call
is fastest (measured: 16 draws a call took 1.8x as long, the large tensors' page faults).
Each draw keeps its own t seed and masks, and its sums are kept apart (nll_<draw>), so
the numbers are those of one draw a call and the spread over draws is still reported.
"""

import torch

from algorithms import key_mask, objectives

EVAL_TOKENS_PER_CALL = {"cpu": 0, "default": 1 << 16}  # by device type; 0: one draw a call


def draws_per_call(tokens_per_draw: int, device: torch.device) -> int:
    cap = EVAL_TOKENS_PER_CALL.get(device.type, EVAL_TOKENS_PER_CALL["default"])
    return max(1, cap // max(tokens_per_draw, 1))


ANY_ORDERS = ("forward", "backward", "random")


def draw_seed(seed: int, batch_idx: int, draw: int) -> int:
    return (seed + 1) * 7919 + batch_idx * 131 + draw


def evaluate_batch(module, batch: dict, batch_idx: int) -> None:
    """Add this batch's sums to module._val_sums (through module._accumulate)."""
    x0 = batch["input_ids"]
    n = len(x0)
    per_call = draws_per_call(x0.numel() * module.eval_particles, x0.device)  # K particles
    for first in range(0, module.eval_draws, per_call):
        draws = list(range(first, min(first + per_call, module.eval_draws)))
        out = _draws_at_once(module, batch, batch_idx, draws)
    module._accumulate("tokens", out.num_tokens / len(draws))
    module._accumulate("sequences", torch.tensor(n, device=x0.device))
    order = getattr(module, "eval_any_order", None)
    if order:
        rank = order_rank(x0.shape, order, module.cfg.seed, batch_idx, x0.device)
        nll = objectives.any_order_nll(module.backbone, x0, key_mask(batch), rank, module.spec)
        module._accumulate("any_order_nll", nll.sum())


def _draws_at_once(module, batch: dict, batch_idx: int, draws: list[int]):
    """len(draws) draws of (t, masks, z) for the batch in one loss call; sums per draw."""
    x0 = batch["input_ids"]
    g, n = len(draws), len(x0)
    big = {k: _repeat(v, g) for k, v in batch.items()}
    seeds = [draw_seed(module.cfg.seed, batch_idx, d) for d in draws]
    t = torch.cat([module.draw_t(n, s, accumulate=1) for s in seeds])
    # each draw's masks drawn on their own, in draw order: the numbers of one draw a call
    # on every device (one (g n, L) draw would split a CUDA Philox stream differently)
    mask_u = torch.cat([torch.rand(x0.shape, device=x0.device) for _ in draws])
    out = module.compute_loss(
        big, t, beta=1.0, num_particles=module.eval_particles, draws=objectives.Draws(mask_u)
    )
    per_draw = lambda value: value.reshape(g, n, *value.shape[1:]).flatten(1).sum(1)  # (g,)
    sums = {"nll": per_draw(out.per_seq)}
    sums.update({name: per_draw(value) for name, value in out.stats.items()})
    if "mu_std" in sums:  # the spread of mu over the rows of each draw, not over all g n
        mu = out.latent.mu.reshape(g, n, -1)
        sums["mu_std"] = mu.std(1, correction=0).mean(-1) * n  # summed like a per-row stat
    extras = module.algorithm.validation_extras(module, big, t)  # name -> (g n,)
    sums.update({name: per_draw(value) for name, value in extras.items()})
    for name, values in sums.items():
        for d, value in zip(draws, values, strict=True):
            module._accumulate(f"{name}_{d}", value)
    if out.latent is not None:
        lat = out.latent
        module._latent_stats.add(lat.mu, lat.log_sigma, lat.t, lat.position_mask)
    return out


def _repeat(value, g: int):
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or g == 1:
        return value
    return value.repeat(g, *([1] * (value.dim() - 1)))


def order_rank(shape, order: str, seed: int, batch_idx: int, device) -> torch.Tensor:
    """(B, L) ranks of the positions: the i-th smallest is predicted i-th."""
    B, L = shape
    if order == "forward":
        return torch.arange(L, device=device, dtype=torch.float64).expand(B, L)
    if order == "backward":
        return torch.arange(L, 0, -1, device=device, dtype=torch.float64).expand(B, L)
    gen = torch.Generator().manual_seed(draw_seed(seed, batch_idx, -1))
    return torch.rand((B, L), generator=gen, dtype=torch.float64).to(device)

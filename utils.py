"""Small helpers: LR schedules, RNG state, evaluation summaries, rank-zero printing, fsspec I/O."""

import json
import math
import random
import statistics

import fsspec
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig


# ---------------------------------------------------------------- learning-rate schedules
def build_lr_scheduler(opt: torch.optim.Optimizer, cfg: DictConfig, max_steps: int):
    """`constant_warmup`: linear warm-up then constant (MDLM's default);
    `cosine_decay_warmup`: linear warm-up then cosine decay to `min_lr_ratio` x lr."""
    warmup = int(cfg.warmup_steps)

    def constant(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        floor = cfg.get("min_lr_ratio", 0.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedules = {"constant_warmup": constant, "cosine_decay_warmup": cosine}
    return torch.optim.lr_scheduler.LambdaLR(opt, schedules[cfg.name])


# ---------------------------------------------------------------- RNG state
def get_rng_state() -> dict:
    """Every RNG a training step draws from, as tensors and plain values (so checkpoints
    load with torch.load(weights_only=True), Lightning's default)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached)
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- evaluation summaries
def summarise_eval(sums: dict[str, torch.Tensor], draws: int) -> dict:
    """Turn summed per-draw statistics into per-token NLL / PPL / BPD with their spread."""
    tokens = float(sums["tokens"])
    seqs = float(sums["sequences"])
    nll_draws = [float(sums[f"nll_{d}"]) / tokens for d in range(draws)]
    nll = statistics.fmean(nll_draws)
    out = {
        "nll": nll,
        "ppl": math.exp(min(nll, 700.0)),
        "bpd": nll / math.log(2.0),
        "tokens": int(tokens),
        "sequences": int(seqs),
        "draws": draws,
        "nll_per_draw": nll_draws,
        "ppl_per_draw": [math.exp(min(v, 700.0)) for v in nll_draws],
    }
    if draws > 1:
        out["ppl_std"] = statistics.stdev(out["ppl_per_draw"])
        out["nll_std"] = statistics.stdev(nll_draws)
    per_token = {"recon", "prior_nelbo"}
    for key in ("recon", "kl", "kl_closed", "mu_std", "prior_nelbo"):
        if f"{key}_0" in sums:
            denom = tokens if key in per_token else seqs
            out[key] = statistics.fmean(float(sums[f"{key}_{d}"]) / denom for d in range(draws))
    if "prior_nelbo" in out:
        out["prior_ppl"] = math.exp(min(out["prior_nelbo"], 700.0))
    return out


# ---------------------------------------------------------------- I/O
@rank_zero_only
def print0(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


def write_json(path: str, obj: dict) -> None:
    """Write JSON through fsspec (local, s3://, gs://...) via a temp file then rename."""
    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    fs.makedirs(fs._parent(p), exist_ok=True)
    tmp = p + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    fs.mv(tmp, p)


def write_text(path: str, text: str) -> None:
    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    fs.makedirs(fs._parent(p), exist_ok=True)
    with fs.open(p, "w") as f:
        f.write(text)

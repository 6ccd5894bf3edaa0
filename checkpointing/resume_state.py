"""The exact-resume state a training checkpoint carries beside Lightning's own: every RNG
state (one per rank) and the data position of the resumable sampler (data/order.py).

Training saves land between optimiser steps: periodic saves, and a stop signal, which
waits for the end of its accumulation window (checkpointing/callbacks.py). Only a
validation between two micro-batches of a window (trainer.val_check_interval not a
multiple of the window, or an epoch end inside one) saves mid-window, e.g. best.ckpt:
Lightning's loop counters and the data are then inside the window, which no checkpoint
holds. Such a file records `partial_window` instead of a data position; its weights are
those of the last whole step (fine to evaluate or warm-start from), but a resume from it
is refused.
"""

import torch

import utils
from errors import CheckpointError


def gather_rng() -> list[dict]:
    """Every rank's RNG states (all ranks must call this together under DDP / FSDP)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [utils.get_rng_state()]
    states = [None] * dist.get_world_size()  # every rank has its own streams
    dist.all_gather_object(states, utils.get_rng_state())
    return states


def capture(rng: list, sampler, rows_seen: int, micro: int, accumulate: int) -> dict:
    """The "resume" entry of a checkpoint. rows_seen: rows of this rank's shard read in
    the current epoch by finished micro-batches; micro: micro-batches of the current
    window done (0 between optimiser steps)."""
    state = {"rng": rng}
    if micro:
        state["partial_window"] = [micro, accumulate]
    elif sampler is not None:
        state["data"] = sampler.state_dict(consumed=rows_seen)
    return state


def data_position(state: dict, loops: dict | None) -> dict:
    """The sampler position a resume starts from. A checkpoint written after Lightning
    closed the data's epoch (the end of a max_epochs run) resumes where Lightning does:
    at the start of the next epoch, not `start` rows into it."""
    data = dict(state["data"])
    try:
        closed = int(loops["fit_loop"]["epoch_progress"]["total"]["completed"])
    except (KeyError, TypeError):
        return data
    if closed > data["epoch"]:
        data.update(epoch=closed, start=0)
    return data


def check_resumable(state: dict) -> None:
    """Refuse (one line, with the fix) a training resume from a mid-window checkpoint."""
    if "partial_window" in state:
        micro, accumulate = state["partial_window"]
        raise CheckpointError(
            f"this checkpoint was saved by a validation after micro-batch {micro} of "
            f"{accumulate} of an accumulation window, which cannot be resumed exactly: "
            "resume from last.ckpt or a step=N.ckpt (evaluating it is fine), and set "
            f"trainer.val_check_interval to a multiple of {accumulate}"
        )

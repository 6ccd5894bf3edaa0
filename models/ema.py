"""Exponential moving average of parameters (both networks of VADD share one EMA).

decay_n = min(decay, (1 + n) / (10 + n)) warms the average up over the first updates.
`swapped_in(params)` temporarily loads the averages into the live parameters for
evaluation or sampling and restores the training weights afterwards, even on error.
Under FSDP (strategy=fsdp) the shadows are DTensor shards like the parameters; the state
dict always holds whole tensors, so checkpoints look the same with or without sharding.
"""

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


class ExponentialMovingAverage:
    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"training.ema={decay} must be in [0, 1); use 0 to disable EMA")
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in params if p.requires_grad]
        self._backup: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        live = [p.detach() for p in params if p.requires_grad]
        self._match_device(live)
        torch._foreach_lerp_(self.shadow, live, 1.0 - decay)

    def _match_device(self, live: list[torch.Tensor]) -> None:
        if self.shadow and self.shadow[0].device != live[0].device:
            self.shadow = [s.to(p.device) for s, p in zip(self.shadow, live, strict=True)]

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, [p for p in params if p.requires_grad], strict=True):
            p.copy_(s)

    def store_and_swap(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Keep a copy of the live weights, then load the averages (undo with `restore`)."""
        params = [p for p in params if p.requires_grad]
        self._backup = [p.detach().clone() for p in params]
        self.copy_to(params)

    @torch.no_grad()
    def restore(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self._backup is None:
            return
        params = [p for p in params if p.requires_grad]
        for p, b in zip(params, self._backup, strict=True):
            p.copy_(b)
        self._backup = None

    @contextmanager
    def swapped_in(self, params: Iterable[torch.nn.Parameter]):
        params = list(params)
        self.store_and_swap(params)
        try:
            yield
        finally:
            self.restore(params)

    def shard_like(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Lay the shadows out like the (now sharded) parameters: keep this rank's shards."""
        live = [p for p in params if p.requires_grad]
        self.shadow = [_like(s, p) for s, p in zip(self.shadow, live, strict=True)]

    def state_dict(self) -> dict:
        """Whole tensors; under FSDP a collective (every rank calls it, as Lightning does)."""
        shadow = [s.full_tensor() if isinstance(s, DTensor) else s for s in self.shadow]
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow_params"]) != len(self.shadow):
            raise ValueError(
                f"EMA state has {len(state['shadow_params'])} tensors but the model has "
                f"{len(self.shadow)} trainable parameters: the checkpoint is for another model"
            )
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        loaded = state["shadow_params"]
        self.shadow = [_like(s.detach(), old) for s, old in zip(loaded, self.shadow, strict=True)]


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A copy of `full` laid out as `ref`: this rank's shard (a local slice, no communication)
    when `ref` is a DTensor, else the whole tensor."""
    if isinstance(ref, DTensor) and not isinstance(full, DTensor):
        full = full.to(ref.device)
        full = distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)
    return full.clone()  # own storage, not a view of the whole tensor

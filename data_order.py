"""The order in which rows are read: seeded, sharded across ranks, resumable mid-epoch.

One sampler serves single-process and distributed runs (Lightning's automatic
DistributedSampler is turned off): epoch e reads a permutation drawn from (seed, e),
rank r takes every world-th row of it, and `state_dict()` / `load_state_dict()` carry the
position inside the epoch, so a resumed run reads exactly the rows the interrupted one
would have read next. Evaluation shards are uneven rather than padded with duplicates.
"""

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, num_rows: int, *, seed: int, shuffle: bool, drop_last: bool):
        self.num_rows, self.seed, self.shuffle, self.drop_last = num_rows, seed, shuffle, drop_last
        self.epoch = 0
        self.start = 0  # rows of this rank's shard already consumed in `epoch`

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _shard(self) -> torch.Tensor:
        rank, world = self._rank_world()
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_rows, generator=gen)
        else:
            order = torch.arange(self.num_rows)
        if self.drop_last:  # equal shards: every rank runs the same number of steps
            order = order[: self.num_rows - self.num_rows % world]
        return order[rank::world]

    def __iter__(self):
        shard, start = self._shard(), self.start
        self.start = 0  # the next epoch starts from its beginning
        return iter(shard[start:].tolist())

    def __len__(self) -> int:
        rank, world = self._rank_world()
        if self.drop_last:
            return self.num_rows // world
        return len(range(rank, self.num_rows, world))

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def state_dict(self, consumed: int) -> dict:
        return {"epoch": self.epoch, "start": consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start = int(state["epoch"]), int(state["start"])

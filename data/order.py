"""The order in which rows are read: seeded, sharded across ranks, resumable mid-epoch.

One sampler serves single-process and distributed runs (Lightning's automatic
DistributedSampler is turned off): epoch e reads a permutation drawn from (seed, e).
Training cuts it into blocks of world x batch_size rows and rank r takes the r-th
batch of each block, so global row i always lands at position i of the global batch,
whatever the split over devices and accumulation steps (with the global-batch draws of
t and noise in diffusion.py, the losses do not depend on the split). Evaluation takes
every world-th row: uneven shards rather than padding with duplicates.
`state_dict()` / `load_state_dict()` carry the position inside the epoch, so a resumed
run reads exactly the rows the interrupted one would have read next.
"""

import torch
from torch.utils.data import Sampler

import utils
from errors import CheckpointError


class ResumableSampler(Sampler[int]):
    def __init__(
        self, num_rows: int, *, seed: int, shuffle: bool, drop_last: bool, batch_size: int = 1
    ):
        self.num_rows, self.seed, self.shuffle, self.drop_last = num_rows, seed, shuffle, drop_last
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0  # rows of this rank's shard already consumed in `epoch`

    def _shard(self) -> torch.Tensor:
        rank, world = utils.rank_world()
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_rows, generator=gen)
        else:
            order = torch.arange(self.num_rows)
        if not self.drop_last:
            return order[rank::world]
        block = world * self.batch_size  # equal shards: every rank runs the same steps
        order = order[: self.num_rows - self.num_rows % block]
        return order.view(-1, world, self.batch_size)[:, rank].reshape(-1)

    def __iter__(self):
        shard, start = self._shard(), self.start
        self.start = 0  # the next epoch starts from its beginning
        return iter(shard[start:].tolist())

    def __len__(self) -> int:
        rank, world = utils.rank_world()
        if self.drop_last:
            return self.num_rows // (world * self.batch_size) * self.batch_size
        return len(range(rank, self.num_rows, world))

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def state_dict(self, consumed: int) -> dict:
        """consumed: rows of this rank's shard read in `epoch`. The layout they were read
        in (processes x rows per micro-batch) is saved with them."""
        _, world = utils.rank_world()
        return {"epoch": self.epoch, "start": consumed, "seed": self.seed, "world": world,
                "batch_size": self.batch_size}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped. Another seed is another row order: refused.
        Another layout (processes, rows per micro-batch) reads on from the same global
        row: the ranks had read the first start x world rows of the epoch's order; refused
        when that is not a whole number of the new layout's blocks."""
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            raise CheckpointError(
                f"the checkpoint's rows were drawn in the order of seed={seed}, this run's "
                f"seed is {self.seed}: resume with seed={seed}, or start a new run folder"
            )
        self.epoch, start = int(state["epoch"]), int(state["start"])
        _, world = utils.rank_world()
        then = int(state.get("world", world)), int(state.get("batch_size", self.batch_size))
        if self.drop_last and then != (world, self.batch_size):
            rows, block = start * then[0], world * self.batch_size
            if start % then[1] or rows % block:
                raise CheckpointError(
                    f"the checkpoint read {rows} rows of epoch {self.epoch} as {then[0]} "
                    f"process(es) x {then[1]} rows, not a whole number of this run's steps "
                    f"of {world} x {self.batch_size}: resume with the checkpoint's devices "
                    "and loader.batch_size, or a layout whose rows per micro-step divide it"
                )
            start = rows // world
        self.start = start

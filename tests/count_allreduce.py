"""main.py with a DDP communication hook that counts gradient all-reduces per rank.

Run like main.py (plus `--config-path` to this repository's configs); at exit each rank
prints `allreduce calls: <rank> <n>`. The launcher starts the other ranks with the same
command line, so every rank counts.
"""

import atexit
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402

CALLS = [0]


def counting_allreduce(state, bucket):
    CALLS[0] += 1
    return default_hooks.allreduce_hook(state, bucket)


def configure_ddp(self, _original=DDPStrategy.configure_ddp):
    _original(self)
    self.model.register_comm_hook(None, counting_allreduce)


DDPStrategy.configure_ddp = configure_ddp
atexit.register(  # one write: a line of its own even when the ranks exit together
    lambda: sys.stdout.write(f"allreduce calls: {os.environ.get('LOCAL_RANK', 0)} {CALLS[0]}\n")
)

if __name__ == "__main__":
    import main

    main.main()

"""main.py with a callback that sends a signal to its own process at a chosen micro-batch.

`python tests/signal_at_batch.py USR1 13 --config-path <repo>/configs <overrides>` runs
main.py and sends SIGUSR1 as micro-batch 13 of this run (counted from 0, also in a
resumed run) starts, so a pre-emption lands at a known place, e.g. inside an
accumulation window, without racing the run's speed. Tests wrap runner.build_trainer
with `with_signal` to do the same in-process.
"""

import os
import signal
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class SignalAtBatch(Callback):
    """Send `signum` as training micro-batch `index` starts (phase="train"), or as the
    `index`-th validation batch inside training starts (phase="val")."""

    def __init__(self, signum: int, index: int, phase: str = "train"):
        self.signum, self.index, self.phase, self.seen = signum, index, phase, 0

    def _tick(self, phase: str) -> None:
        if phase != self.phase:
            return
        if self.seen == self.index:
            # the run's own handler, never the default action: that would kill the process
            # (pytest's own when the run is in-process) instead of testing the run
            handler = signal.getsignal(self.signum)
            assert callable(handler), f"no handler for signal {self.signum}: {handler}"
            os.kill(os.getpid(), self.signum)  # Python runs the handler before the step
        self.seen += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._tick("train")

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:
        if not trainer.sanity_checking:
            self._tick("val")


def with_signal(build_trainer, signum: int, index: int, phase: str = "train"):
    """runner.build_trainer, with a SignalAtBatch(signum, index, phase) in every trainer."""

    def build(cfg):
        trainer = build_trainer(cfg)
        trainer.callbacks.append(SignalAtBatch(signum, index, phase))
        return trainer

    return build


if __name__ == "__main__":
    name, index = sys.argv.pop(1), int(sys.argv.pop(1))
    import main
    import runner

    runner.build_trainer = with_signal(runner.build_trainer, getattr(signal, f"SIG{name}"), index)
    main.main()

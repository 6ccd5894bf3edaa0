"""Small Lightning callbacks of our own."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class SafetyCheckpoint(Callback):
    """Write `<dirpath>/last.ckpt` at the end of training (unless the newest save already
    holds the final step) and on pre-emption or a crash, so no finished or interrupted
    run loses its weights.

    Lightning handles SIGTERM itself: it finishes the current step and raises
    SIGTERMException (a clean exit), which reaches `on_exception` here. SIGUSR1 (the usual
    pre-emption warning of clusters) is turned into SIGTERM, unless Lightning's SLURM
    auto-requeue already owns it. (Lightning's OnExceptionCheckpoint deletes its file at
    the end of a successful run, so it cannot share last.ckpt with the periodic saves.)
    """

    def __init__(self, dirpath: str, filename: str = "last"):
        self.path = os.path.join(dirpath, f"{filename}.ckpt")

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._last_is_final(trainer):
            trainer.save_checkpoint(self.path)

    def _last_is_final(self, trainer) -> bool:
        """Did a ModelCheckpoint with save_last already write the final step to our path?

        (Any other save at the final step, e.g. best.ckpt after the last validation, does
        not count: last.ckpt would still hold an older step.)"""
        return any(
            cb.save_last
            and os.path.abspath(cb.last_model_path or "") == os.path.abspath(self.path)
            and cb._last_global_step_saved == trainer.global_step
            for cb in trainer.checkpoint_callbacks
        )

    def on_train_start(self, trainer, pl_module) -> None:
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        trainer.save_checkpoint(self.path)

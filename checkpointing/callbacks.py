"""Small Lightning callbacks of our own, and a CSV logger that keeps a resumed run's history."""

import csv
import os
import signal
import threading

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

import utils


class SafetyCheckpoint(Callback):
    """Write `<dirpath>/last.ckpt` at the end of training (unless the newest save already
    holds the final step) and on pre-emption or a crash, so no finished or interrupted
    run loses its weights, and never write a worse state over a good file:

    - a run that fails before training starts (a refused or failed restore, bad optimiser
      settings) writes nothing;
    - an exception writes last.ckpt only if the run has advanced past the step the file
      already holds, and only finite weights;
    - a NaN / inf loss stop (errors.NonFiniteLossError, raised before the bad step
      reaches the weights) keeps last.ckpt and writes the last finite state under its
      own name, `nonfinite-step=<N>.ckpt`, beside the offending batch.

    Lightning handles SIGTERM itself: it finishes the current step and raises
    SIGTERMException (a clean exit), which reaches `on_exception` here. SIGUSR1 (the usual
    pre-emption warning of clusters) and SIGINT (Ctrl-C) are turned into SIGTERM, so they
    too stop at a step boundary with a consistent checkpoint (Lightning's own Ctrl-C path
    stops wherever the interrupt lands, possibly between the optimiser and EMA updates).
    `interrupted_by` records which signal stopped the run (main.py exits 130 for SIGINT).
    (Lightning's OnExceptionCheckpoint deletes its file at the end of a successful run,
    so it cannot share last.ckpt with the periodic saves.)
    """

    def __init__(self, dirpath: str, filename: str = "last"):
        self.dirpath = dirpath
        self.path = os.path.join(dirpath, f"{filename}.ckpt")
        self.started = False
        self.interrupted_by: int | None = None
        self._deferred = False  # a stop signal waits for the end of an accumulation window
        self._saved: int | None = None  # the step our last save from on_train_batch_end holds
        self._handlers: dict[int, object] = {}  # the signal handlers before training

    def on_train_end(self, trainer, pl_module) -> None:
        if self._saved != trainer.global_step and not self._last_is_final(trainer):
            trainer.save_checkpoint(self.path)
        self._restore_signals()

    def _restore_signals(self) -> None:
        """Outside fit, Ctrl-C is Python's KeyboardInterrupt again."""
        for signum, handler in self._handlers.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)
        self._handlers = {}

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
        self.started, self._deferred = True, False
        # Lightning does not restore when a ModelCheckpoint last saved: after a resume at
        # step S it would save step S again at the first micro-batch of the next window,
        # over the file resumed from, with its loop counters one micro-batch ahead.
        for cb in trainer.checkpoint_callbacks:
            if hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = max(cb._last_global_step_saved, trainer.global_step)
        if trainer.is_global_zero:
            for path in utils.remove_stale_temp_files(self.dirpath):
                utils.print0(f"[vadd] removed {path}: a save interrupted by a killed run")
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGUSR1, signal.SIGINT):
            current = signal.getsignal(signum)
            if signum == signal.SIGUSR1 and current not in (signal.SIG_DFL, signal.SIG_IGN, None):
                continue  # Lightning's SLURM auto-requeue owns SIGUSR1
            self._handlers[signum] = current
            signal.signal(signum, self._to_sigterm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """A stop signal takes effect at the end of an optimiser step. Inside an accumulation
        window Lightning's stop flag is hidden until the window's last micro-batch (a partial
        window is in no checkpoint); then last.ckpt is written here, where the periodic saves
        are, so a resume continues Lightning's loop counters exactly (a save from
        on_exception would come after Lightning has counted the step once more). The
        final step (max_steps) is saved here too: on_train_end comes after Lightning has
        closed the epoch, and a run extended from such a file would skip the epoch's rest."""
        connector, step = trainer._signal_connector, trainer.global_step
        mid_window = getattr(pl_module, "_micro", 0) != 0
        final = 0 < trainer.max_steps <= step and not mid_window
        if final and self._saved != step and not self._periodic_last_saves(trainer):
            self._save_last(trainer)
        if not (connector.received_sigterm or self._deferred):
            return
        connector.received_sigterm, self._deferred = not mid_window, mid_window
        if not mid_window and self._saved != step:
            self._save_last(trainer)

    def _save_last(self, trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved = trainer.global_step
        for cb in trainer.checkpoint_callbacks:  # else its on_train_end writes it once more,
            if getattr(cb, "save_last", False):  # after Lightning has closed the epoch
                cb._last_checkpoint_saved = self.path

    def _periodic_last_saves(self, trainer) -> bool:
        """Will a ModelCheckpoint with save_last write our last.ckpt at this step (after us:
        Lightning runs checkpoint callbacks last)?"""
        return any(
            cb.save_last
            and cb._every_n_train_steps > 0
            and trainer.global_step % cb._every_n_train_steps == 0
            and os.path.abspath(os.path.join(cb.dirpath or "", "last.ckpt"))
            == os.path.abspath(self.path)
            for cb in trainer.checkpoint_callbacks
        )

    def on_validation_batch_end(self, trainer, pl_module, *args) -> None:
        """A stop signal during a validation inside training waits too: the EMA weights
        and the validation's RNG are swapped in until the validation ends."""
        connector = trainer._signal_connector
        if trainer.state.fn == "fit" and connector.received_sigterm:
            if self._saved != trainer.global_step:  # else: saved, stop right here
                connector.received_sigterm, self._deferred = False, True

    def _to_sigterm(self, signum, frame) -> None:
        self.interrupted_by = self.interrupted_by or signum
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_signals()
        if self.interrupted_by == signal.SIGINT and isinstance(exception, SystemExit):
            exception.code = 130  # Ctrl-C's usual exit status (128 + SIGINT)
        if not self.started:
            utils.print0("[vadd] training did not start: no checkpoint written")
            return
        from errors import NonFiniteLossError

        step = trainer.global_step
        if not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()):
            utils.print0(f"[vadd] the weights are not finite at step {step}: nothing written")
            return
        if isinstance(exception, NonFiniteLossError):
            path = os.path.join(self.dirpath, f"nonfinite-step={step}.ckpt")
            trainer.save_checkpoint(path)
            utils.print0(f"[vadd] the last finite state is in {path}; {self.path} is kept")
            return
        held = saved_step(self.path)
        if held == step and isinstance(exception, SystemExit | KeyboardInterrupt):
            return  # a stop signal: on_train_batch_end wrote this step
        micro = getattr(pl_module, "_micro", 0)
        if micro or getattr(trainer, "validating", False):  # mid-window, or the EMA swapped in
            where = (
                f"at micro-batch {micro} of an accumulation window" if micro else "in a validation"
            )
            utils.print0(f"[vadd] the run stopped {where}: {self.path} is kept (step {held})")
            return
        if held is not None and held >= step:
            utils.print0(f"[vadd] kept {self.path} (step {held}): this run is at step {step}")
            return
        trainer.save_checkpoint(self.path)


def saved_step(path: str) -> int | None:
    """The global step a checkpoint file holds (memory-mapped: the tensors are not read),
    or None when there is no readable checkpoint there."""
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return int(ckpt["global_step"])
    except Exception:  # truncated or foreign: not worth keeping over a real state
        return None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class HistoryCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume into the same folder: the resumed
    run's rows are appended (steps logged after the checkpoint by the interrupted run
    appear twice; the later rows are the resumed run's). A fresh run starts a new file."""

    def __init__(self, *args, keep_history: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_history = keep_history

    @property
    @rank_zero_experiment  # other ranks get Lightning's dummy writer, as with CSVLogger
    def experiment(self):
        if self._experiment is None and self.keep_history:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment

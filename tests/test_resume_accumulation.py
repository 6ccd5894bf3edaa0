"""Exact resume with gradient accumulation (4 micro-batches of 1 row per optimiser step):
from a periodic checkpoint, from a pre-emption save inside an accumulation window, the
SIGUSR1 path itself, and what best.ckpt holds.

Jobs run in-process (tests/hydra_jobs.py): every run compared bit for bit lives in this
one process. Only the SIGUSR1 test starts main.py, since its point is the process's exit.
"""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra_jobs import one_thread, run_job
from signal_at_batch import with_signal
from tiny import MICRO_MODEL, QUIET

import runner

ROOT = Path(__file__).resolve().parents[1]
ACCUMULATE = 4  # global batch 4 = 4 micro-batches of 1 row
EPOCH = 10  # micro-batches per epoch: not a multiple of 4, so some windows straddle two epochs
STEPS = 8
RUN = [
    *MICRO_MODEL,
    "loader.global_batch_size=4",
    "loader.batch_size=1",
    "loader.eval_batch_size=8",
    f"trainer.limit_train_batches={EPOCH}",
    "trainer.limit_val_batches=1",
    f"trainer.val_check_interval={ACCUMULATE}",  # counts micro-batches: one per optimiser step
    "trainer.log_every_n_steps=1",
    f"trainer.max_steps={STEPS}",
    "training.kl_weight_interval=20",  # beta is still annealing at every resume point
    # warm-up to lr 0.1 overshoots: val/nll falls for two steps, then rises, so the best
    # validation is neither the first nor the last (test_best_ckpt_...)
    "optim.lr=0.1",
    "lr_scheduler.warmup_steps=4",
    "training.ema=0.5",  # the validated EMA weights follow the raw ones closely
    "checkpointing.keep_last=100",  # keep every periodic checkpoint
    "trainer.precision=32-true",  # auto may pick bf16-mixed (AMX CPUs): the same path everywhere
]
EVERY_STEP = "callbacks.checkpoint_every_n_steps.every_n_train_steps=1"
# no periodic save: the pre-emption's save is the one last.ckpt holds (SafetyCheckpoint
# keeps a last.ckpt that already holds the current step)
NO_PERIODIC = "callbacks.checkpoint_every_n_steps.every_n_train_steps=1000"


def job(out: Path, *extra: str) -> None:
    with one_thread():
        run_job(out, *RUN, *extra)


def resume_from(ckpt: Path) -> str:
    return f"checkpointing.resume_ckpt_path='{ckpt}'"  # quoted: the name holds '='


def metric(run: Path, key: str) -> dict[int, float]:
    """metrics.csv's `key` by row step: micro-batches counted from 0 (log_every_n_steps=1)."""
    rows = csv.DictReader((run / "logs" / "metrics.csv").open())
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    """Bit for bit: step, weights, EMA, AdamW state, lr schedule, data position. (Not the
    RNG states: no training draw uses the global RNGs, so they never tell runs apart.)"""
    exact = {"rtol": 0, "atol": 0}
    assert a["global_step"] == b["global_step"]
    assert a["resume"]["data"] == b["resume"]["data"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], **exact, msg=key)
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(x, y, **exact)
    moments_a, moments_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert moments_a.keys() == moments_b.keys()
    for key, state in moments_a.items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name], moments_b[key][name], **exact)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def assert_continues(resumed: Path, full: Path, first: int) -> None:
    """`resumed` logged the losses `full` logged from micro-batch `first` on, at the same
    steps, and validated where `full` did with the same results."""
    reference = metric(full, "trainer/loss")
    assert metric(resumed, "trainer/loss") == {
        s: reference[s] for s in range(first, STEPS * ACCUMULATE)
    }
    validations = metric(resumed, "val/nll")
    assert validations and validations.items() <= metric(full, "val/nll").items()


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """The uninterrupted run, with a checkpoint and a validation at every step."""
    run = tmp_path_factory.mktemp("full")
    job(run, EVERY_STEP)
    return run


def test_resume_from_a_periodic_checkpoint_reproduces_the_run(full, tmp_path):
    """From step 3 (micro-batch 12, mid-epoch) the resumed run crosses two epoch
    boundaries, one inside a window. Each checkpoint it writes equals the uninterrupted
    run's of that step, the data positions recorded in the epoch it resumed in and in the
    epochs after it included (a second resume starts from them)."""
    job(tmp_path, EVERY_STEP, resume_from(full / "checkpoints" / "step=3.ckpt"))
    assert_continues(tmp_path, full, first=3 * ACCUMULATE)
    # step 3 is not saved again inside the first window (with Lightning's counters ahead)
    assert not (tmp_path / "checkpoints" / "step=3.ckpt").exists()
    names = [f"step={step}.ckpt" for step in range(4, STEPS + 1)] + ["last.ckpt"]
    pairs = [(load(full / "checkpoints" / n), load(tmp_path / "checkpoints" / n)) for n in names]
    assert [b["resume"]["data"] for _, b in pairs] == [a["resume"]["data"] for a, _ in pairs]
    for a, b in pairs:
        assert_same_state(a, b)


@pytest.mark.parametrize(
    "index",
    [
        13,  # micro-batch 2 of step 4's window (12-15), inside epoch 1 (10-19)
        10,  # micro-batch 3 of step 3's window (8-11), which began in epoch 0
        15,  # the last of step 4's window: the save lies between two windows
    ],
    ids=["mid-window", "window-from-the-previous-epoch", "window-end"],
)
def test_resume_after_a_preemption_during_an_accumulation_window(
    full, tmp_path, monkeypatch, index
):
    """SIGUSR1 as micro-batch `index` starts: the run finishes that accumulation window
    (the optimiser step), writes last.ckpt at it and stops; the resumed run continues
    from the next window as the uninterrupted run."""
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(
            runner, "build_trainer", with_signal(runner.build_trainer, signal.SIGUSR1, index)
        )
        with pytest.raises(SystemExit) as stop:  # Lightning's SIGTERMException
            job(killed, NO_PERIODIC)
    assert stop.value.code in (None, 0)
    steps = index // ACCUMULATE + 1  # the step whose window holds micro-batch `index`
    # nothing ran after that window's last micro-batch
    assert max(metric(killed, "trainer/loss")) == steps * ACCUMULATE - 1
    last = killed / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == steps

    job(resumed, NO_PERIODIC, resume_from(last))
    assert_continues(resumed, full, first=steps * ACCUMULATE)
    assert_same_state(
        load(full / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    )


def test_sigusr1_finishes_the_step_saves_last_ckpt_and_exits_cleanly(tmp_path):
    """SIGUSR1 (the usual pre-emption warning) as micro-batch 15, the last of step 4's
    window, starts: that micro-batch and step 4 still run, then last.ckpt is written at
    step 4 (the newest periodic save is step 3) and the process exits with status 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "tests/signal_at_batch.py", "USR1", "15"]
    cmd += ["--config-path", str(ROOT / "configs"), f"hydra.run.dir={tmp_path}", *QUIET, *RUN]
    cmd += ["callbacks.checkpoint_every_n_steps.every_n_train_steps=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(metric(tmp_path, "trainer/loss")) == 15  # no micro-batch after that one
    assert (tmp_path / "checkpoints" / "step=3.ckpt").exists()
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["ema"]["num_updates"] == 4
    epoch, start = divmod(4 * ACCUMULATE, EPOCH)  # 16 rows read: the next window's first
    assert ckpt["resume"]["data"] == {
        "epoch": epoch,
        "start": start,
        "seed": 1,
        "world": 1,
        "batch_size": ckpt["resume"]["data"]["batch_size"],
    }
    assert ckpt["resume"]["rng"]


def test_best_ckpt_holds_the_validation_with_the_lowest_nll(full):
    """configs/callbacks/checkpoint_monitor.yaml: best.ckpt is the state at the lowest
    val/nll, a whole resumable checkpoint (vadd config, EMA, data position and RNG)."""
    nll = metric(full, "val/nll")  # one validation after each step's last micro-batch
    lowest = min(nll, key=nll.get)
    assert lowest not in (min(nll), max(nll)), f"val/nll must fall, then rise (optim.lr): {nll}"
    step = (lowest + 1) // ACCUMULATE
    best = load(full / "checkpoints" / "best.ckpt")
    assert best["global_step"] == step
    assert {"vadd", "ema", "resume"} <= best.keys() and best["resume"].keys() == {"data", "rng"}
    assert best["vadd"] == load(full / "checkpoints" / "last.ckpt")["vadd"]  # config, vocab
    # the periodic save of that step, written just before the validation: same weights,
    # EMA, optimiser, schedule and data position
    assert_same_state(load(full / "checkpoints" / f"step={step}.ckpt"), best)


def test_a_signal_during_a_validation_waits_for_the_next_window_end(full, tmp_path, monkeypatch):
    """SIGUSR1 as the validation after step 2 starts (the EMA weights and the validation's
    RNG are swapped in): the validation ends, step 3's window runs, last.ckpt holds step
    3 with the raw weights, and the resume from it is the uninterrupted run."""
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    with monkeypatch.context() as patch:
        build = with_signal(runner.build_trainer, signal.SIGUSR1, 1, phase="val")
        patch.setattr(runner, "build_trainer", build)
        with pytest.raises(SystemExit):
            job(killed, NO_PERIODIC)
    assert max(metric(killed, "trainer/loss")) == 3 * ACCUMULATE - 1
    last = killed / "checkpoints" / "last.ckpt"
    assert_same_state(load(full / "checkpoints" / "step=3.ckpt"), load(last))
    job(resumed, NO_PERIODIC, resume_from(last))
    assert_continues(resumed, full, first=3 * ACCUMULATE)


def test_a_checkpoint_saved_inside_a_window_is_refused_for_resume(tmp_path):
    """A validation every 6 micro-batches falls inside windows of 4: best.ckpt then has
    no data position, and a resume from it is one error naming the fix."""
    from errors import CheckpointError

    first = tmp_path / "first"
    job(first, NO_PERIODIC, "trainer.val_check_interval=6", "trainer.max_steps=3")
    best = load(first / "checkpoints" / "best.ckpt")
    assert best["resume"]["partial_window"] == [2, ACCUMULATE] and "data" not in best["resume"]
    with pytest.raises(CheckpointError, match="multiple of 4"):
        job(tmp_path / "again", resume_from(first / "checkpoints" / "best.ckpt"))
    assert not (tmp_path / "again" / "checkpoints" / "last.ckpt").exists()


def test_a_finished_run_extended_to_more_steps_is_the_longer_run(full, tmp_path):
    """A run that ends at max_steps=6 (mid-epoch, no periodic save there), resumed from its
    last.ckpt with max_steps=8: the rows, losses and final state of the 8-step run (the
    final save sits where periodic saves are, inside its epoch, not after it closed)."""
    short, longer = tmp_path / "short", tmp_path / "longer"
    job(short, NO_PERIODIC, "trainer.max_steps=6")
    last = short / "checkpoints" / "last.ckpt"
    assert (
        load(last)["resume"]["data"] == load(full / "checkpoints" / "step=6.ckpt")["resume"]["data"]
    )
    job(longer, NO_PERIODIC, resume_from(last))
    assert_continues(longer, full, first=6 * ACCUMULATE)
    assert_same_state(
        load(full / "checkpoints" / "last.ckpt"), load(longer / "checkpoints" / "last.ckpt")
    )


def test_a_run_ended_by_max_epochs_resumes_at_the_next_epoch(tmp_path):
    """max_epochs=1 (8 micro-batches: 2 whole windows) then resumed with max_epochs=2: the
    second epoch reads all its rows, as in the uninterrupted 2-epoch run (the data
    position of a file written after Lightning closed the epoch points past its end)."""
    epochs = ["trainer.max_steps=-1", "trainer.limit_train_batches=8", NO_PERIODIC]
    whole, first, second = tmp_path / "whole", tmp_path / "first", tmp_path / "second"
    job(whole, *epochs, "+trainer.max_epochs=2")
    job(first, *epochs, "+trainer.max_epochs=1")
    job(second, *epochs, "+trainer.max_epochs=2", resume_from(first / "checkpoints" / "last.ckpt"))
    reference = metric(whole, "trainer/loss")
    assert sorted(reference) == list(range(16))
    assert metric(second, "trainer/loss") == {s: reference[s] for s in range(8, 16)}
    assert_same_state(
        load(whole / "checkpoints" / "last.ckpt"), load(second / "checkpoints" / "last.ckpt")
    )

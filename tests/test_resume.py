"""Exact resume: a run killed with SIGKILL and resumed gives the uninterrupted run's losses."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import MICRO_MODEL, QUIET, wait_for

import utils
from data.order import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *MICRO_MODEL,
    *QUIET,
    "loader.global_batch_size=4",
    "loader.eval_batch_size=8",
    "trainer.limit_val_batches=1",
    "trainer.limit_train_batches=7",  # short epochs: the run crosses epoch boundaries
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=1",
    "training.kl_weight_interval=20",  # beta is still annealing when the run is killed
    "callbacks.checkpoint_every_n_steps.every_n_train_steps=3",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "main.py", f"hydra.run.dir={run_dir}", *TINY, *extra]


def losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    return {int(r["step"]): float(r["trainer/loss"]) for r in rows if r.get("trainer/loss")}


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    steps = "trainer.max_steps=30"
    full = tmp_path / "full"
    subprocess.run(command(full, steps), cwd=ROOT, env=ENV, check=True, capture_output=True)
    reference = losses(full)
    assert len(reference) == 30

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(killed, steps), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for(killed / "checkpoints" / "step=6.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = killed / "checkpoints" / "last.ckpt"
    resumed_from = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
    assert 3 <= resumed_from < 30, "the run finished before it could be killed"

    resumed = tmp_path / "resumed"  # a new output folder, resuming from the old checkpoint
    subprocess.run(
        command(resumed, steps, f"checkpointing.resume_ckpt_path={last}"),
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
    )
    after = losses(resumed)
    # the resumed run also tracks the data position: its final checkpoint points where the
    # uninterrupted run's does
    final = [
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for d in (full, resumed)
    ]
    assert final[0]["resume"]["data"] == final[1]["resume"]["data"]
    assert sorted(after) == list(range(resumed_from + 1, 31)) or min(after) == resumed_from
    for step, loss in after.items():
        assert loss == reference[step], (step, loss, reference[step])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_cover_each_epoch_once(world, monkeypatch):
    seen = []
    for rank in range(world):
        monkeypatch.setattr(utils, "rank_world", lambda r=rank: (r, world))
        sampler = ResumableSampler(10, seed=3, shuffle=True, drop_last=False)
        seen += list(sampler)
    assert sorted(seen) == list(range(10))


def test_sampler_resumes_mid_epoch_and_new_epochs_reshuffle():
    sampler = ResumableSampler(20, seed=1, shuffle=True, drop_last=True)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2)
    sampler.load_state_dict(sampler.state_dict(consumed=7))
    assert list(sampler) == full[7:]
    assert list(sampler) == full  # the position applies to one pass only
    sampler.set_epoch(3)
    assert sorted(sampler) == sorted(full) and list(sampler) != full


def test_sigterm_saves_a_checkpoint_then_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        command(run, "trainer.max_steps=100000"),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(run / "checkpoints" / "step=3.ckpt", proc)
    time.sleep(0.5)  # a few more steps
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] >= 3 and "resume" in ckpt and "ema" in ckpt


def test_keeps_only_the_newest_periodic_checkpoints(tmp_path):
    run = tmp_path / "run"
    args = ["trainer.max_steps=12", "callbacks.checkpoint_every_n_steps.every_n_train_steps=2"]
    subprocess.run(
        command(run, *args, "checkpointing.keep_last=2"),
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
    )
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert names == ["best.ckpt", "last.ckpt", "step=10.ckpt", "step=12.ckpt"]

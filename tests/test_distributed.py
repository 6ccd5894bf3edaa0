"""DDP with 2 CPU processes (gloo) trains the same model as one process on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import MICRO_MODEL, QUIET

from data_order import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = [
    *MICRO_MODEL,
    *QUIET,
    "loader.global_batch_size=8",
    "trainer.max_steps=3",
    "trainer.limit_val_batches=0",
    "training.loss_strategy=none",  # beta = 1 so the encoder learns from the first step
    "logger=none",
]


def train(run_dir: Path, *extra: str) -> dict:
    cmd = [sys.executable, "main.py", f"hydra.run.dir={run_dir}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_training(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == 3
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return train(tmp_path_factory.mktemp("single"))


def test_ddp_two_cpu_processes_match_one_process(single, tmp_path):
    ddp = train(tmp_path, "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert_same_training(single, ddp)


def test_gradient_accumulation_matches_the_full_batch(single, tmp_path):
    accumulated = train(tmp_path, "loader.batch_size=2")  # 4 micro-batches of 2
    assert_same_training(single, accumulated)


@pytest.mark.parametrize("world,batch", [(2, 4), (4, 2)])
def test_training_shards_put_global_row_i_at_position_i(world, batch, monkeypatch):
    single = ResumableSampler(64, seed=5, shuffle=True, drop_last=True, batch_size=world * batch)
    reference = list(single)
    shards = []
    for rank in range(world):
        monkeypatch.setattr(
            ResumableSampler, "_rank_world", staticmethod(lambda r=rank: (r, world))
        )
        shards.append(
            list(ResumableSampler(64, seed=5, shuffle=True, drop_last=True, batch_size=batch))
        )
    monkeypatch.undo()
    rebuilt = [
        row
        for step in range(len(shards[0]) // batch)
        for shard in shards
        for row in shard[step * batch : (step + 1) * batch]
    ]
    assert rebuilt == reference

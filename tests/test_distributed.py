"""DDP and FSDP with 2 CPU processes (gloo) train the same model as one process on the same
global batch, with EMA and gradient clipping active; DDP and FSDP runs resume exactly."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import MICRO_MODEL, QUIET

import utils
from data.order import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = [
    *MICRO_MODEL,
    *QUIET,
    "loader.global_batch_size=8",
    "trainer.max_steps=3",
    "trainer.limit_val_batches=0",
    "training.loss_strategy=none",  # beta = 1 so the encoder learns from the first step
    "trainer.gradient_clip_val=0.05",  # the gradient norm is ~1: every step is clipped
    "trainer.log_every_n_steps=1",
    "trainer.precision=32-true",  # auto may pick bf16-mixed (AMX CPUs): keep float32 sums
]
TWO_CPUS = ["trainer.accelerator=cpu", "trainer.devices=2"]
# Float tolerance between a distributed run and one process (different summation orders).
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def train(run_dir: Path, *extra: str, script: tuple[str, ...] = ("main.py",)) -> dict:
    """Run main.py; return last.ckpt, plus the gradient norm of each optimiser step under
    "grad_norms" (a logged value repeats on the rows of the following micro-batches) and
    the job's standard output under "stdout"."""
    cmd = [sys.executable, *script, f"hydra.run.dir={run_dir}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    (run_dir / "stderr.log").write_text(proc.stderr)  # every rank's output, for failures
    assert proc.returncode == 0, f"{run_dir}/stderr.log ends: {proc.stderr[-3000:]}"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    logged = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    ckpt["grad_norms"] = [x for i, x in enumerate(logged) if i == 0 or x != logged[i - 1]]
    ckpt["stdout"] = proc.stdout
    return ckpt


def assert_same_training(a: dict, b: dict, **tolerance) -> None:
    """Same step, weights, EMA, AdamW moments and (pre-clipping) gradient norms."""
    tolerance = tolerance or TOLERANCE
    assert a["global_step"] == b["global_step"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], **tolerance, msg=key)
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 3
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(x, y, **tolerance)
    moments_a, moments_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert moments_a.keys() == moments_b.keys()
    for key, state in moments_a.items():  # both AdamW moments
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[moment], moments_b[key][moment], **tolerance)
    assert len(a["grad_norms"]) == len(b["grad_norms"]) == 3
    assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-4)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    run = train(tmp_path_factory.mktemp("single"))
    assert min(run["grad_norms"]) > 0.05, "gradient clipping must be active"
    return run


PERIODIC = [  # a checkpoint and an (EMA) validation at step 2 of 3
    "callbacks.checkpoint_every_n_steps.every_n_train_steps=2",
    "trainer.limit_val_batches=2",
    "trainer.val_check_interval=2",
]


def resume_from_step2(first: Path, run_dir: Path, *extra: str, **kwargs) -> dict:
    """A second run resumed from the first run's step-2 checkpoint, in a new folder."""
    step2 = first / "checkpoints" / "step=2.ckpt"
    return train(run_dir, *extra, f"checkpointing.resume_ckpt_path='{step2}'", **kwargs)  # '='


def test_ddp_two_cpu_processes_match_one_process_and_resume(single, tmp_path):
    # 2 processes x 1 row x 4 accumulation steps: gradients are all-reduced on the last
    # micro-batch of each step only (the micro model's gradients fit in one DDP bucket)
    counting = ("tests/count_allreduce.py", "--config-path", str(ROOT / "configs"))
    ddp_args = ("strategy=ddp", *TWO_CPUS, "loader.batch_size=1", *PERIODIC)
    ddp = train(tmp_path / "full", *ddp_args, script=counting)
    assert_same_training(single, ddp)
    # both ranks print at exit into one pipe: their lines may run together
    calls = sorted(re.findall(r"allreduce calls: \d+ \d+", ddp["stdout"]))
    assert calls == ["allreduce calls: 0 3", "allreduce calls: 1 3"]  # 3 steps, not 12
    resumed = resume_from_step2(tmp_path / "full", tmp_path / "resumed", *ddp_args)
    assert resumed["grad_norms"] == ddp["grad_norms"][2:]  # the resumed run logs step 2 only
    assert_same_training(ddp, dict(resumed, grad_norms=ddp["grad_norms"]), rtol=0, atol=0)
    assert resumed["resume"]["data"] == ddp["resume"]["data"]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> dict:
    """FSDP2 on 2 CPU processes: 3 steps with a checkpoint and an (EMA) validation at step 2,
    then a second run resumed from that checkpoint in a new folder."""
    first = tmp_path_factory.mktemp("fsdp")
    full = train(first, "strategy=fsdp", *TWO_CPUS, *PERIODIC)
    resumed = resume_from_step2(
        first, tmp_path_factory.mktemp("fsdp_resumed"), "strategy=fsdp", *TWO_CPUS, *PERIODIC
    )
    return {"full": full, "resumed": resumed}


def test_fsdp_two_cpu_processes_match_one_process(single, fsdp):
    full = fsdp["full"]
    assert_same_training(single, full)
    # one ordinary file of whole tensors (not DTensor shards): every checkpoint tool reads it
    tensors = [*full["state_dict"].values(), *full["ema"]["shadow_params"]]
    assert all(type(t) is torch.Tensor for t in tensors)
    data = full["resume"]["data"]  # 3 steps x 4 rows of this rank, read as 2 x 4
    assert data == {"epoch": 0, "start": 12, "seed": 1, "world": 2, "batch_size": 4}
    assert len(full["resume"]["rng"]) == 2  # one RNG state per rank


def test_fsdp_resume_reproduces_the_uninterrupted_run(single, fsdp):
    resumed = dict(fsdp["resumed"], grad_norms=fsdp["full"]["grad_norms"])  # it logs step 2 only
    assert fsdp["resumed"]["grad_norms"] == fsdp["full"]["grad_norms"][2:]
    assert_same_training(fsdp["full"], resumed, rtol=0, atol=0)
    assert resumed["resume"]["data"] == fsdp["full"]["resume"]["data"]
    for a, b in zip(resumed["resume"]["rng"], fsdp["full"]["resume"]["rng"], strict=True):
        assert torch.equal(a["torch"], b["torch"])


def test_gradient_accumulation_matches_the_full_batch(single, tmp_path):
    accumulated = train(tmp_path, "loader.batch_size=2")  # 4 micro-batches of 2
    assert_same_training(single, accumulated)


@pytest.mark.parametrize("latent1d", [True, False])
def test_the_losses_of_global_rows_do_not_depend_on_the_split(latent1d, monkeypatch):
    """Each row's t, mask and z noise (one z per row, or per position with latent1d=False)
    are fixed by its global index: 8 rows as 2 ranks x 2 micro-batches of 2 get the losses
    of 8 rows in one piece. A per-rank draw (the global RNG) would give each rank's first
    rows the same noise."""
    from hydra import compose, initialize_config_dir

    import dataloader
    import runner

    overrides = [*MICRO_MODEL, f"model.latent1d={latent1d}", "decoder.mu_init_std=1"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=overrides)
    runner.derive_batch_sizes(cfg, 1)
    module = runner.build_module(cfg, dataloader.get_tokenizer(cfg.data))
    x0 = torch.randint(0, module.vocab.size, (8, cfg.model.length))
    seed = 20_240_501 * 1_000_003  # a step's seed for seed=20240501 (no overflow)

    def losses(world: int, accumulate: int) -> torch.Tensor:
        n, module.accumulate = 8 // (world * accumulate), accumulate
        per_row = torch.empty(8)
        for micro in range(accumulate):
            for rank in range(world):
                monkeypatch.setattr(utils, "rank_world", lambda r=rank: (r, world))
                first = (micro * world + rank) * n  # the sampler's global row order
                batch = {"input_ids": x0[first : first + n]}
                t = module.draw_t(n, seed, micro)
                draws = module.global_draws(n, cfg.model.length, seed, micro)
                with torch.no_grad():
                    per_row[first : first + n] = module.compute_loss(
                        batch, t, 1.0, 1, draws
                    ).per_seq
        return per_row

    whole = losses(world=1, accumulate=1)
    torch.testing.assert_close(losses(world=2, accumulate=2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses(world=1, accumulate=4), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world,batch", [(2, 4), (4, 2)])
def test_training_shards_put_global_row_i_at_position_i(world, batch, monkeypatch):
    single = ResumableSampler(64, seed=5, shuffle=True, drop_last=True, batch_size=world * batch)
    reference = list(single)
    shards = []
    for rank in range(world):
        monkeypatch.setattr(utils, "rank_world", lambda r=rank: (r, world))
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


def test_evaluation_with_strategy_fsdp_runs_as_plain_data_parallel():
    """fsdp's group has no find_unused_parameters: evaluation must not read it."""
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.strategies import DDPStrategy

    import runner

    root = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(root), version_base=None):
        cfg = compose("config", overrides=["strategy=fsdp", "mode=ppl_eval"])
    strategy = runner._strategy(cfg)
    assert isinstance(strategy, DDPStrategy)
    assert not strategy._ddp_kwargs.get("find_unused_parameters")

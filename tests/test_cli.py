"""The command line: VADD/MDLM command lines compose, bad input fails fast with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_PPL_EVAL = (
    "mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16 data=lambada model=small "
    "parameterization=subs backbone=dit model.length=1024 training.loss_type=vae "
    "model.latentMLP=True model.latent1d=True model.latent_struc=adaln model.latent_dim=512 "
    "decoder.mask_struc=adaln eval.checkpoint_path=/path/to/checkpoint.ckpt +eval.ppl_times=5"
)
SEED_SAMPLE = (
    "mode=sample_eval data=openwebtext-split model=small parameterization=subs model.length=1024 "
    "training.loss_type=vae model.latentMLP=True model.latent1d=True model.latent_struc=adaln "
    "model.latent_dim=512 decoder.mask_struc=adaln sampling.predictor=vae sampling.steps=256 "
    "sampling.fixz=True loader.eval_batch_size=8 sampling.num_sample_batches=4 "
    "eval.checkpoint_path=/path/to/checkpoint.ckpt"
)
SEED_CACHE = (
    "mode=sample_eval sampling.predictor=vae_cache sampling.steps=1024 "
    "eval.checkpoint_path=/path/to/checkpoint.ckpt"
)
SEED_RESUME = (
    "checkpointing.resume_from_ckpt=True checkpointing.resume_ckpt_path=/path/to/checkpoint.ckpt"
)


def run_main(args: list[str], tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "main.py", f"hydra.run.dir={tmp_path}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_failed_before_any_work(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    """ "Fails fast" without a clock (timings flake on a loaded machine): the error came
    before any network was built (build_module prints "[vadd] vocab") and before any
    checkpoint or log was written."""
    assert "[vadd] vocab" not in proc.stdout + proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "logs").exists()


@pytest.mark.parametrize("line", [SEED_PPL_EVAL, SEED_SAMPLE, SEED_CACHE, SEED_RESUME])
def test_seed_readme_command_lines_compose(line, tmp_path):
    proc = run_main([*line.split(), "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "loss_type: vae" in proc.stdout


def test_train_script_composes(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(tmp_path)}
    args = ["bash", "scripts/train_owt_vadd.sh", "16", "1024", "1", "1", "adaln", "adaln", "512"]
    proc = subprocess.run(
        [*args, "--cfg", "job"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "global_batch_size: 512" in proc.stdout and "batch_size: 16" in proc.stdout


def test_eval_script_composes(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "16", "OUT_DIR": str(tmp_path)}
    args = ["bash", "scripts/eval_owt_vadd.sh", "True", "/path/to/checkpoint.ckpt", "--cfg", "job"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fixz: true" in proc.stdout.lower() and "predictor: vae_cache" in proc.stdout


BAD_INPUTS = [
    (["training.loss_type=vea"], "training.loss_type='vea'", "did you mean training.loss_type=vae"),
    (["training.foo=1"], "foo", "+training.foo"),
    (["mode=ppl_eval"], "eval.checkpoint_path", "needs a trained model"),
    (["training.num_particles=0"], "training.num_particles=0", ">= 1"),
    (["training.kl_weighting=steps"], "T=0", "set T=<steps>"),
    (["model.latent_dim=0"], "model.latent_dim=0", "positive integer"),
    (
        ["model.latentMLP=False", "model.latent_dim=32"],
        "model.latentMLP=False",
        "model.latent_dim=64",
    ),
    (["model.n_heads=3"], "model.hidden_size=128", "n_heads=3"),
    (
        ["noise=loglinear", "noise.type=cosin"],
        "noise.type='cosin'",
        "did you mean noise.type=cosine",
    ),
    (
        [
            "mode=sample_eval",
            "eval.checkpoint_path=x.ckpt",
            "training.loss_type=mdlm",
            "sampling.predictor=vae",
        ],
        "sampling.predictor=vae",
        "ddpm_cache",
    ),
    (
        [
            "mode=sample_eval",
            "eval.checkpoint_path=x.ckpt",
            "sampling.predictor=ddpm",
            "sampling.fixz=True",
        ],
        "sampling.fixz=True",
        "sampling.predictor=vae",
    ),
    (["backbone=ar"], "backbone=ar", "parameterization=ar"),
    (["training.init_kl_weight=2"], "training.init_kl_weight=2", "[0.0, 1.0]"),
    (["loader.global_batch_size=30", "loader.batch_size=8"], "global_batch_size=30", "multiple"),
    (
        ["mode=ppl_eval", "eval.checkpoint_path=/nonexistent/x.ckpt"],
        "/nonexistent/x.ckpt",
        "does not exist",
    ),
    (["data=wikitext2"], "'wikitext2' is not cached", "run once with network access"),
    (["data=local_text", "data.path=/nonexistent/corpus"], "/nonexistent/corpus", "does not exist"),
    (["data=local_text"], "data.path is not set", "data.path=/path/to"),
    (
        ["strategy=fsdp", "trainer.precision=64-true"],
        "strategy=fsdp does not support trainer.precision=64-true",
        "or strategy=ddp",
    ),
    (["optim.beta1=1.5"], "optim.beta1=1.5", "[0.0, 0.999999]"),
    (
        ["training.kl_weighting=once"],
        "does not hold with decoder.mask_struc=adaln",
        "set decoder.mask_struc=none",
    ),  # fmt: skip
    (
        ["training.kl_weighting=once", "decoder.mask_struc=none"],
        "decoder.fade_to_prior=True",
        "decoder.fade_to_prior=False",
    ),  # fmt: skip
    (["seed=-1"], "seed=-1", ">= 0"),
    (["loader.batch_size=0"], "loader.batch_size=0", "positive integer"),
    (["checkpointing.save_dir=README.md/run"], "README.md/run cannot be written", "writable"),
    (["data=wikitxt"], "data=wikitxt is not a config of configs/data/", "data=wikitext2"),
    (["model=zzz"], "model=zzz", "use one of cpu, medium"),
    (["loader.eval_batch_size=0"], "loader.eval_batch_size=0", "positive integer"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0", "must be > 0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0", "positive number of steps"),
    (["sampling.eps=0.7"], "sampling.eps=0.7", "(0, 0.5)"),
    (["checkpointing.save_dir='~/runs/x'"], "checkpointing.save_dir=~/runs/x", "absolute path"),
    (["checkpointing.resume_ckpt_path=/typo.ckpt"], "/typo.ckpt does not exist", "fix the path"),
    (["eval.disable_ema=no"], "eval.disable_ema='no' is not a boolean", "eval.disable_ema=False"),
    (["sampling.fixz=yes"], "sampling.fixz='yes' is not a boolean", "sampling.fixz=True"),
    (["model.length=2"], "model.length=2 is too short", "model.length >= 3"),
    (["checkpointing.keep_last=-2"], "checkpointing.keep_last=-2 is out of range", ">= -1"),
    (["model.latent_dim=100000000"], "model.latent_dim=100000000 makes", "than this machine"),
    (["noise.type=linear"], "lacks noise.sigma_max, noise.sigma_min", "with noise=linear"),
    (["strategy.name=ddp"], "lacks strategy.find_unused_parameters", "with strategy=ddp"),
]


@pytest.mark.parametrize("args,names,fix", BAD_INPUTS, ids=[" ".join(a[0]) for a in BAD_INPUTS])
def test_bad_input_fails_fast_with_one_line(args, names, fix, tmp_path):
    proc = run_main(args, tmp_path, timeout=60)
    assert proc.returncode != 0
    assert names in proc.stderr and fix in proc.stderr, proc.stderr
    assert_failed_before_any_work(proc, tmp_path)
    assert "Traceback" not in proc.stderr
    if "+training.foo" not in fix:  # our own errors: exactly one line, prefixed "error:"
        assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
            proc.stderr.strip().splitlines()[-1]
        ], proc.stderr


def test_empty_local_text_folder_fails_fast(tmp_path):
    empty = tmp_path / "corpus"
    empty.mkdir()
    proc = run_main(["data=local_text", f"data.path={empty}"], tmp_path / "run", timeout=60)
    assert proc.returncode == 2
    assert_failed_before_any_work(proc, tmp_path / "run")
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: data.path={empty}")


def test_multinode_launchers_compose(tmp_path):
    """The torchrun and SLURM launchers build a command line main.py accepts."""
    fake = tmp_path / "torchrun"  # stands in for torchrun: runs main.py --cfg job
    fake.write_text(f'#!/usr/bin/env bash\nshift 5\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"}
    env.update(TORCHRUN=str(fake), RUN_DIR=str(tmp_path / "run"), GPUS_PER_NODE="4")
    args = ["bash", "scripts/train_multinode_torchrun.sh", "--cfg", "job"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "num_nodes: 2" in proc.stdout and "devices: 4" in proc.stdout
    sbatch = (ROOT / "scripts" / "train_owt_vadd.sbatch").read_text()
    assert "--signal=TERM@" in sbatch and 'trainer.num_nodes="$SLURM_NNODES"' in sbatch


def test_multirun_jobs_run_in_one_process_each_in_its_folder(tmp_path):
    """Hydra's basic launcher (-m): every job trains in its own folder under the sweep dir."""
    from tiny import MICRO_MODEL, QUIET

    args = ["-m", "training.loss_type=mdlm,vae", "trainer.max_steps=1", *MICRO_MODEL, *QUIET,
            "loader.global_batch_size=4", "trainer.limit_val_batches=0", "logger=csv",
            f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "💡" not in proc.stdout + proc.stderr  # Lightning's product tip is filtered out
    for num, loss in ((0, "mdlm"), (1, "vae")):
        job = tmp_path / str(num)
        assert (job / "checkpoints" / "last.ckpt").exists()
        assert f"training.loss_type={loss}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert "loss_type: " + loss in (job / "logs" / "hparams.yaml").read_text()


def test_the_vadd_command_is_main_py(tmp_path):
    """scripts/setup.sh installs the checkout (pip install -e .): `vadd` runs main.cli."""
    vadd = Path(sys.executable).with_name("vadd")
    assert vadd.exists(), "run bash scripts/setup.sh (pip install -e .[dev])"
    proc = subprocess.run([str(vadd), "data=wikitxt", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "did you mean data=wikitext2" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_evaluation_from_the_command_line_takes_the_model_from_the_checkpoint(tmp_path):
    """`python main.py mode=sample_eval eval.checkpoint_path=...` on a toy-MLP checkerboard
    run: the network type, sizes and length come from the checkpoint (the defaults'
    DiT keys dropped) before the start-up checks, which would refuse length 128 there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    train = [
        "data=checkerboard",
        "model=toy_mlp",
        "recipe=checkerboard",
        "noise=linear",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "logger=none",
        "trainer.enable_progress_bar=False",
    ]
    proc = subprocess.run(
        [sys.executable, "main.py", f"hydra.run.dir={tmp_path / 'run'}", *train],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evaluate = [
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        "data=checkerboard",
        "sampling.steps=1",
        "sampling.num_sample_batches=1",
        "loader.eval_batch_size=64",
    ]
    proc = subprocess.run([sys.executable, "main.py", f"hydra.run.dir={tmp_path / 'eval'}",
                           *evaluate], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "architecture from the checkpoint" in proc.stdout and "model.type=toy_mlp" in proc.stdout
    (samples,) = (tmp_path / "eval").glob("samples_vae_T1_fixzTrue_seed1.json")
    saved = json.loads(samples.read_text())
    assert (
        saved["config"]["model"]["type"] == "toy_mlp" and "n_heads" not in saved["config"]["model"]
    )
    assert saved["config"]["noise"] == {"type": "linear", "sigma_min": 1e-3, "sigma_max": 7.0}
    wrong = subprocess.run([sys.executable, "main.py", f"hydra.run.dir={tmp_path / 'wrong'}",
                            *evaluate, "model.hidden_size=64"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert wrong.returncode == 2
    assert "model.hidden_size=64 on the command line" in wrong.stderr and "128" in wrong.stderr

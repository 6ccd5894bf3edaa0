"""Whole main.py jobs run in-process: compose the Hydra config, validate it, run it.

The same path as `python main.py ...` minus the command-line parsing (tests/test_cli.py
covers that), so a job costs no interpreter start-up. Outputs go under the test's folder.
"""

import contextlib
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import main
from config_check import validate_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=False", "trainer.enable_model_summary=False"]


def compose_job(out: Path, *overrides: str) -> DictConfig:
    """The config `python main.py <overrides>` would run, writing everything under `out`."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(
            "config",
            overrides=[
                *QUIET,
                f"checkpointing.save_dir={out}",
                f"eval.output_dir={out}",
                *overrides,
            ],
        )


def run_job(out: Path, *overrides: str) -> DictConfig:
    cfg = compose_job(out, *overrides)
    validate_config(cfg)
    main.run(cfg)
    return cfg


@contextlib.contextmanager
def one_thread():
    """Tiny networks: one thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

"""vadd entry point: `python main.py mode=train | ppl_eval | sample_eval [overrides]`.

The config is validated before torch, Lightning or the data are touched, so a bad value
fails in seconds with one line (and exit status 2) instead of a stack trace later.
"""

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from config_check import check_group_choices, validate_config
from errors import VaddError

# Known, harmless warnings of our dependencies that would otherwise fill every log:
# checkpoints are taken after the optimiser step on purpose (manual optimisation), and
# Lightning's own pytree helper uses a deprecated torch call.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from checkpointing.architecture import explicit_keys

    try:
        explicit = explicit_keys(list(HydraConfig.get().overrides.task), CONFIG_DIR)
        ckpt = None
        path = str(cfg.eval.checkpoint_path or "")
        if cfg.mode != "train" and ("://" in path or (path and os.path.exists(path))):
            # evaluation: the checkpoint's architecture first, so that the checks below see
            # the model the checkpoint holds (e.g. its length for image data)
            from runner import adopt_architecture

            ckpt = _read_once(path)
            adopt_architecture(cfg, ckpt, explicit)
        validate_config(cfg)
        run(cfg, ckpt=ckpt)
    except VaddError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # the next job runs; this one says why
            out = HydraConfig.get().runtime.output_dir
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "error.txt").write_text(f"error: {err}\n")
            return
        sys.exit(2)


_LAST_READ: tuple = (None, None)  # (path and file state, checkpoint) of the last job


def _read_once(path: str) -> dict:
    """The evaluated checkpoint, read once for all the jobs of a multirun (`-m data=a,b`:
    one process) while its file is unchanged; its tensors are only ever copied from."""
    global _LAST_READ
    from checkpointing.checkpoints import read_checkpoint

    key = (path, os.stat(path).st_mtime_ns if os.path.isfile(path) else None)
    if _LAST_READ[0] != key or key[1] is None:
        _LAST_READ = (None, None)  # free the previous one before reading the next
        _LAST_READ = (key, read_checkpoint(path))
    return _LAST_READ[1]


def run(cfg: DictConfig, explicit: dict[str, str] | None = None, ckpt: dict | None = None) -> None:
    """Run cfg.mode. `explicit`: the keys the command line set (architecture.explicit_keys);
    given, an evaluation takes the other architecture keys from its checkpoint. `ckpt`: the
    evaluated checkpoint when the caller has read it already."""
    import dataloader  # heavy imports after validation

    tokenizer = dataloader.get_tokenizer(cfg.data)  # local data errors show before Lightning loads

    import lightning as L

    import runner
    from checkpointing.checkpoints import read_checkpoint

    trainer = runner.build_trainer(cfg)
    runner.derive_batch_sizes(cfg, trainer.num_devices * trainer.num_nodes)
    # a missing or bad data set fails before any network is built
    loaders = dataloader.get_dataloaders(cfg, tokenizer) if cfg.mode == "train" else None
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.mode == "train":
        runner.train(cfg, trainer, runner.build_module(cfg, tokenizer), tokenizer, loaders)
        return
    ckpt = read_checkpoint(cfg.eval.checkpoint_path) if ckpt is None else ckpt
    if explicit is not None:
        runner.adopt_architecture(cfg, ckpt, explicit)
    tokenizer = runner.eval_tokenizer(ckpt, tokenizer)
    module = runner.build_module(cfg, tokenizer)
    if cfg.mode == "ppl_eval":
        runner.ppl_eval(cfg, trainer, module, tokenizer, ckpt)
    else:
        runner.sample_eval(cfg, module, tokenizer, ckpt)


def cli() -> None:
    """`python main.py ...` and the `vadd` command (pyproject.toml)."""
    try:  # before Hydra: a misspelt config group is one line, not Hydra's listing
        check_group_choices(sys.argv[1:], CONFIG_DIR)
    except VaddError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()

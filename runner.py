"""What each mode does, step by step: build the trainer, derive batch sizes, run the job."""

import copy
import logging
import os
import time
import uuid
import warnings
from contextlib import nullcontext

import fsspec
import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import dataloader
import sharding
import utils
from checkpointing import architecture, interchange
from checkpointing.checkpoints import AtomicCheckpointIO, check_resume, load_for_eval
from config_check import ConfigError, validate_config
from data.tokenization import GridTokenizer
from diffusion import Diffusion, Vocab
from evaluation.jobs import run_ppl_eval, run_sample_eval
from models import count_parameters

MODULE_OWNED_TRAINER_KEYS = ("accumulate_grad_batches", "gradient_clip_val")  # manual optimisation


class _NoAdverts(logging.Filter):
    """Lightning prints a product tip at every Trainer: not ours to show in every log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
# The training loader is resumable (data/order.py's sampler state is in every checkpoint),
# but not through Lightning's _Stateful interface, so Lightning warns on a mid-epoch resume.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


def build_trainer(cfg: DictConfig) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in MODULE_OWNED_TRAINER_KEYS:
        kwargs.pop(key)
    kwargs["precision"] = resolve_precision(kwargs["precision"], kwargs["accelerator"])
    if cfg.mode == "ppl_eval":  # the whole split unless limited for this mode
        limit = cfg.eval.get("limit_batches")
        kwargs["limit_val_batches"] = 1.0 if limit is None else limit
    logger = _logger(cfg) if cfg.mode == "train" else False
    callbacks = []
    if cfg.mode == "train":
        callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
        if logger is False:  # LearningRateMonitor refuses a trainer without logger
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return L.Trainer(
        **kwargs,
        strategy=_strategy(cfg),
        callbacks=callbacks,
        logger=logger,
        default_root_dir=cfg.checkpointing.save_dir,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # data_order.ResumableSampler shards by rank itself
    )


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """`auto`: bf16-mixed where the hardware multiplies bf16 fast (CUDA GPUs, and CPUs with
    AMX tiles, where bf16 matmuls run 6-10x faster than float32), else 32-true."""
    if precision != "auto":
        return precision
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16-mixed" if gpu or amx else "32-true"


def _strategy(cfg: DictConfig):
    """ddp, fsdp (FSDP2, sharding.py) or Lightning's choice. Evaluation with strategy=fsdp
    runs unsharded data parallel: forward passes need no optimiser state to shard."""
    name = cfg.strategy.name
    if name == "fsdp" and cfg.mode == "train":
        return sharding.fsdp_strategy()
    if name == "ddp":
        return DDPStrategy(find_unused_parameters=cfg.strategy.find_unused_parameters)
    if name == "fsdp":  # evaluation
        return DDPStrategy()
    return "auto"


def _logger(cfg: DictConfig):
    if cfg.logger == "none":
        return False
    if cfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        w = cfg.wandb
        run_id = wandb_run_id(cfg.checkpointing.save_dir, _resuming(cfg), w.id)
        return WandbLogger(
            project=w.project, name=w.name, mode=w.mode, tags=list(w.tags),
            save_dir=cfg.checkpointing.save_dir, id=run_id, resume="allow",
        )  # fmt: skip
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(cfg.checkpointing.save_dir, name="tensorboard", version="")
    from checkpointing.callbacks import HistoryCSVLogger

    ck = cfg.checkpointing
    return HistoryCSVLogger(ck.save_dir, name="logs", version="", keep_history=_resuming(cfg))


def log_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    """The resolved config to the run's logger: CSV hparams.yaml, the wandb run's config,
    TensorBoard's hparams (nested keys flattened there as a.b.c)."""
    if trainer.logger:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


def _resuming(cfg: DictConfig) -> bool:
    ck = cfg.checkpointing
    if not (ck.resume_from_ckpt and ck.resume_ckpt_path):
        return False
    return fsspec.url_to_fs(ck.resume_ckpt_path)[0].exists(ck.resume_ckpt_path)


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(save_dir: str, resuming: bool, explicit: str | None = None) -> str:
    """The wandb run id of this run folder: a resume continues the run that wrote the
    checkpoint (its curves go on, not a new run per restart); a fresh run gets a new id.
    `wandb.id` set by the user wins. Kept in <save_dir>/wandb_run_id."""
    path = f"{str(save_dir).rstrip('/')}/{WANDB_ID_FILE}"
    fs, root = fsspec.url_to_fs(path)
    if explicit:
        run_id = str(explicit)
    elif resuming and fs.exists(root):
        return fs.cat_file(root).decode().strip()
    else:
        run_id = uuid.uuid4().hex[:8]
    # DDP re-launches this script per rank; only rank 0 logs, and only it records the id
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        utils.atomic_write(path, lambda f: f.write(run_id.encode()))
    return run_id


def derive_batch_sizes(cfg: DictConfig, world: int) -> None:
    """Per-device batches and accumulation from the global batch and the trainer's devices."""
    loader = cfg.loader
    with open_dict(cfg):
        for per_dev, glob in (
            ("batch_size", "global_batch_size"),
            ("eval_batch_size", "eval_global_batch_size"),
        ):
            if loader[per_dev] is None:
                loader[per_dev] = max(1, loader[glob] // world)
        accumulate, rest = divmod(loader.global_batch_size, loader.batch_size * world)
        if cfg.trainer.accumulate_grad_batches is None:
            if rest or accumulate < 1:
                raise ConfigError(
                    f"loader.global_batch_size={loader.global_batch_size} is not a multiple of "
                    f"loader.batch_size={loader.batch_size} x {world} device(s): change one of them"
                )
            cfg.trainer.accumulate_grad_batches = accumulate


def eval_tokenizer(ckpt: dict, tokenizer):
    """Evaluation tokenises with the checkpoint's own tokenizer when it stores one.

    A BPE trained on one corpus and another trained on the evaluation corpus can have the
    same size but different ids; scoring with the wrong one would be silently wrong.
    """
    state = ckpt.get("vadd", {}).get("tokenizer")
    if state is None or state["fingerprint"] == dataloader.tokenizer_fingerprint(tokenizer):
        return tokenizer
    if isinstance(tokenizer, GridTokenizer):  # bins / levels are the data, not a tokenizer
        raise ConfigError(
            f"the checkpoint was trained on {state['name']} but the data config gives "
            f"{tokenizer.name_or_path}: set data.bins (or data.levels) to the training value"
        )
    utils.print0(
        f"[vadd] using the checkpoint's tokenizer ({state['name']}), not the data config's"
    )
    return dataloader.tokenizer_from_state(state)


def adopt_architecture(cfg: DictConfig, ckpt: dict, explicit: dict[str, str]) -> None:
    """Evaluation: the checkpoint's architecture over the config's defaults, checked
    again as a whole (checkpointing/architecture.py)."""
    saved = ckpt.get("vadd", {}).get("config")
    changed = architecture.adopt_architecture(cfg, saved, explicit, cfg.eval.checkpoint_path)
    if changed:
        validate_config(cfg)  # a no-op under main(), which validates after adopting
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        utils.print0(f"[vadd] architecture from the checkpoint: {', '.join(changed[:6])}{more}")


def build_module(cfg: DictConfig, tokenizer) -> Diffusion:
    state = dataloader.tokenizer_state(tokenizer)
    module = Diffusion(cfg, Vocab.from_tokenizer(tokenizer), state)
    utils.print0(
        f"[vadd] vocab {module.vocab.size} (+1 mask) | "
        f"backbone {count_parameters(module.backbone):,} params | "
        f"encoder {count_parameters(module.encoder):,} params"
    )
    return module


def train(cfg: DictConfig, trainer: L.Trainer, module: Diffusion, tokenizer, loaders=None) -> None:
    """Fit `module`; `loaders` = (train, valid) when the caller built them (main.py does,
    before the model, so a missing data set fails before any network is built)."""
    train_dl, valid_dl = loaders or dataloader.get_dataloaders(cfg, tokenizer)
    module.train_sampler = getattr(train_dl, "sampler", None)  # resumable data position
    ckpt = None
    path = cfg.checkpointing.resume_ckpt_path
    if cfg.checkpointing.resume_from_ckpt and path and fsspec.url_to_fs(path)[0].exists(path):
        ckpt = path
        if "://" not in str(path):  # refused before anything is written
            check_resume(cfg, module.vocab.size, path)
        utils.print0(f"[vadd] resuming from {path}")
    elif cfg.model.get("init_from"):  # a fresh run only: a resumed run keeps its own weights
        interchange.warm_start(module, cfg.model.init_from, cfg.model.init_from_ema)
    save_dir = cfg.checkpointing.save_dir
    local = "://" not in str(save_dir)
    lock = utils.folder_lock(save_dir) if trainer.is_global_zero and local else nullcontext()
    with lock:  # one run per folder
        if trainer.is_global_zero:
            os.makedirs(save_dir, exist_ok=True)
            OmegaConf.save(cfg, os.path.join(save_dir, "config.yaml"), resolve=True)
        log_config(trainer, cfg)
        start = time.time()
        trainer.fit(module, train_dl, valid_dl, ckpt_path=ckpt)
        if trainer.is_global_zero:  # steps from the one this fit started at (a resume's)
            steps = trainer.global_step - getattr(module, "first_step", 0)
            summarise_training(cfg, trainer, steps, time.time() - start)
    if cfg.logger == "wandb" and trainer.is_global_zero:
        import wandb

        wandb.finish()  # files flushed; a next job in this process (multirun) gets its own run


def summarise_training(cfg: DictConfig, trainer: L.Trainer, steps: int, seconds: float) -> dict:
    """What a finished (or stopped) run did, printed and in <save_dir>/train_summary.json:
    steps and tokens of this process's fit, wall time, the last and best validation NLL,
    the checkpoints."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    best = next(
        (c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor
         == "val/nll"), None,
    )  # fmt: skip
    folder = os.path.join(cfg.checkpointing.save_dir, "checkpoints")
    summary = {
        "global_step": trainer.global_step,
        "steps_this_run": steps,
        "tokens_this_run": steps * int(cfg.loader.global_batch_size) * int(cfg.model.length),
        "wall_seconds": round(seconds, 1),
        "last_validation": metrics,
        "best_val_nll": None if best is None or best.best_model_score is None
        else float(best.best_model_score),
        "best_checkpoint": (best.best_model_path or None) if best else None,
        "last_checkpoint": os.path.join(folder, "last.ckpt"),
    }  # fmt: skip
    utils.write_json(os.path.join(cfg.checkpointing.save_dir, "train_summary.json"), summary)
    last = f"val/nll {metrics['val/nll']:.4f}" if "val/nll" in metrics else "no validation"
    bests = f", best {summary['best_val_nll']:.4f}" if summary["best_val_nll"] is not None else ""
    utils.print0(
        f"[vadd] trained {steps} steps ({summary['tokens_this_run']:,} tokens) in "
        f"{seconds / 60:.1f} min to step {trainer.global_step}; {last}{bests}; checkpoints in "
        f"{folder}; {cfg.checkpointing.save_dir}/train_summary.json"
    )
    return summary


def ppl_eval(cfg: DictConfig, trainer: L.Trainer, module: Diffusion, tokenizer, ckpt) -> dict:
    load_for_eval(module, ckpt, cfg.eval.checkpoint_path)
    log_config(trainer, cfg)
    _, valid_dl = dataloader.get_dataloaders(cfg, tokenizer, skip_train=True)
    return run_ppl_eval(cfg, module, trainer, valid_dl, cfg.eval.checkpoint_path)


def sample_eval(cfg: DictConfig, module: Diffusion, tokenizer, ckpt) -> list[dict]:
    """Samples at sampling.steps, or at each of a list of step counts: the checkpoint is
    loaded and the judge (gen-PPL) built once; each T writes its own files, the ones a
    process of its own would write (the sampler's generator starts from sampling.seed)."""
    load_for_eval(module, ckpt, cfg.eval.checkpoint_path)
    module.to("cuda" if torch.cuda.is_available() else "cpu")
    steps = cfg.sampling.steps
    results = []
    for t in list(steps) if isinstance(steps, ListConfig) else [steps]:
        one = copy.deepcopy(cfg)
        one.sampling.steps = t
        results.append(run_sample_eval(one, module, tokenizer, cfg.eval.checkpoint_path))
    return results

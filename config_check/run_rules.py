"""Rules on what a run reads and writes: batch sizes, paths, checkpoints to evaluate,
resume and warm start, the strategy, and the sampler's fit to the model."""

import os

from omegaconf import ListConfig, OmegaConf

import algorithms
from config_check.model_rules import CONFIG_DIR
from config_check.values import _get, optional
from errors import ConfigError, missing_path
from sampling import predictors

# precisions Lightning's ModelParallelStrategy (strategy=fsdp) accepts, besides auto
FSDP_PRECISIONS = ["auto", "32-true", "32", "bf16-mixed", "bf16-true"]


# Groups whose file is chosen by one key inside it: `noise=linear` selects the file and its
# keys; `noise.type=linear` alone changes the name and keeps the old group's keys.
GROUP_SELECTORS = {"noise": "type", "lr_scheduler": "name", "strategy": "name"}


def _check_group_selection(cfg):
    for group, key in GROUP_SELECTORS.items():
        name = cfg[group][key]
        path = os.path.join(CONFIG_DIR, group, f"{name}.yaml")
        if not os.path.isfile(path):
            continue  # the choice check names the valid values
        missing = sorted(set(OmegaConf.load(path)) - set(cfg[group]))
        if missing:
            raise ConfigError(
                f"{group}.{key}={name} keeps the keys of another {group} group and lacks "
                f"{', '.join(f'{group}.{m}' for m in missing)}: select the group with "
                f"{group}={name} instead"
            )


def _check_strategy(cfg):
    if cfg.strategy.name != "fsdp":
        return
    if not isinstance(cfg.strategy.get("reshard_after_forward"), bool):
        raise ConfigError(
            f"strategy.reshard_after_forward={cfg.strategy.get('reshard_after_forward')!r} "
            "must be True or False"
        )
    if cfg.mode == "train" and str(cfg.trainer.precision) not in FSDP_PRECISIONS:
        raise ConfigError(
            f"strategy=fsdp does not support trainer.precision={cfg.trainer.precision}: "
            f"use one of {FSDP_PRECISIONS} or strategy=ddp"
        )


# logger -> (the packages of which one must be installed, the pip extra that brings it)
LOGGER_PACKAGES = {"tensorboard": (("tensorboardX", "tensorboard"), "tensorboard"),
                   "wandb": (("wandb",), "wandb")}  # fmt: skip


def _check_steps(cfg):
    """sampling.steps: a number of steps, or (sample_eval) a list of them: one process
    samples at each, loading the checkpoint and the judge once (scripts/steps_sweep.py)."""
    steps = cfg.sampling.steps
    many = isinstance(steps, ListConfig)
    values = list(steps) if many else [steps]
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    if not ok or (many and not values):
        raise ConfigError(
            f"sampling.steps={steps} must be an integer >= 1, or for mode=sample_eval a "
            "list of them (sampling.steps=[16,64,256])"
        )
    if many and not predictors.resolve(cfg).uses_steps:
        raise ConfigError(
            f"sampling.steps={steps}: sampling.predictor={cfg.sampling.predictor} takes one "
            "position per call and no step count; give one number"
        )
    if many and cfg.mode != "sample_eval":
        raise ConfigError(
            f"sampling.steps={steps} is a list: only mode=sample_eval samples at several step "
            "counts; give one number (validation samples at it)"
        )


def _check_logger(cfg):
    import importlib.util

    if cfg.logger not in LOGGER_PACKAGES:
        return
    packages, extra = LOGGER_PACKAGES[cfg.logger]
    if not any(importlib.util.find_spec(name) for name in packages):
        raise ConfigError(
            f'logger={cfg.logger} needs the {packages[0]} package: pip install -e ".[{extra}]" '
            f"(or pip install {packages[0]}), or use logger=csv"
        )


def _check_eval(cfg):
    if cfg.mode in ("ppl_eval", "sample_eval") and not cfg.eval.checkpoint_path:
        raise ConfigError(
            f"mode={cfg.mode} needs a trained model: set eval.checkpoint_path=<path to a .ckpt>"
        )
    path = str(cfg.eval.checkpoint_path)
    if cfg.mode != "train" and "://" not in path and not os.path.exists(path):
        raise missing_path("eval.checkpoint_path", path)
    limit = cfg.eval.get("limit_batches")
    ok = limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1)
    if not ok and not (isinstance(limit, float) and 0.0 < limit <= 1.0):
        raise ConfigError(
            f"eval.limit_batches={limit!r} must be null (the whole split), a number of "
            "batches >= 1, or a fraction in (0, 1]"
        )
    times = optional(cfg, "eval.ppl_times")
    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise ConfigError(f"eval.ppl_times={times!r} must be an integer >= 1")
    _check_any_order(cfg)


def _check_any_order(cfg):
    """eval.any_order: the exact likelihood of a denoiser read as an any-order AR model."""
    order = cfg.eval.get("any_order")
    if order is None:
        return
    if order not in ("forward", "backward", "random"):
        raise ConfigError(
            f"eval.any_order={order!r} is not one of ['forward', 'backward', 'random'] "
            "(or null: off)"
        )
    algo = algorithms.algorithm_class(cfg)
    if algo.uses_latent or algo.family != "diffusion":
        raise ConfigError(
            f"eval.any_order={order} reads the denoiser as an any-order AR model, which "
            f"{_algorithm_key(cfg)} is not (a latent z or a causal model): set eval.any_order=null"
        )


def _check_warm_start(cfg):
    """model.init_from / init_from_ema and training.freeze_decoder_steps (README "Warm start")."""
    path, freeze = _get(cfg, "model.init_from"), _get(cfg, "training.freeze_decoder_steps")
    if path and cfg.mode == "train" and "://" not in str(path) and not os.path.exists(path):
        raise missing_path("model.init_from", path)
    if freeze and not algorithms.algorithm_class(cfg).uses_latent:
        raise ConfigError(
            f"training.freeze_decoder_steps={freeze} trains only GenDIT's latent path and the "
            f"encoder, which needs training.loss_type=vae ({_algorithm_key(cfg)} has none): "
            "set training.freeze_decoder_steps=0"
        )
    if freeze and not path:
        raise ConfigError(
            f"training.freeze_decoder_steps={freeze} would freeze an untrained decoder: "
            "set model.init_from=<MDLM checkpoint> or training.freeze_decoder_steps=0"
        )


def _algorithm_key(cfg) -> str:
    """'training.loss_type=mdlm' / 'parameterization=ar': what selected the algorithm."""
    algo = algorithms.algorithm_class(cfg)
    return f"{algo.selected_by}={algo.name}"


DEFAULT_RESUME_PATH = "${.save_dir}/checkpoints/last.ckpt"  # configs/config.yaml

PATH_KEYS = ("checkpointing.save_dir", "checkpointing.resume_ckpt_path", "eval.checkpoint_path",
             "data.path", "data.cache_dir", "model.init_from")  # fmt: skip


def _check_sizes_and_paths(cfg):
    """Batch sizes, step counts and paths that would fail late or silently."""
    for key in ("loader.batch_size", "loader.eval_batch_size", "loader.eval_global_batch_size"):
        value = _get(cfg, key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"{key}={value!r} must be a positive integer (or null: derived)")
    interval = _get(cfg, "trainer.val_check_interval")
    if interval is not None and not isinstance(interval, bool) and interval <= 0:
        raise ConfigError(
            f"trainer.val_check_interval={interval} must be > 0: a number of steps, or a "
            "fraction of an epoch in (0, 1]"
        )
    if cfg.mode == "train" and _get(cfg, "trainer.max_steps") == 0:
        raise ConfigError(
            "trainer.max_steps=0 trains nothing and would write no checkpoint: set a "
            "positive number of steps (-1: until trainer.max_epochs)"
        )
    eps = _get(cfg, "sampling.eps")
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 0.5
    ):
        raise ConfigError(f"sampling.eps={eps!r} must be in (0, 0.5): the sampler's last time")
    for key in PATH_KEYS:
        try:
            value = _get(cfg, key)
        except Exception:  # an interpolation that only resolves inside a Hydra run
            continue
        if isinstance(value, str) and value.startswith("~"):
            raise ConfigError(
                f"{key}={value} starts with '~', which is not expanded here (it would be a "
                "folder named '~'): write the absolute path (the shell expands $HOME/...)"
            )
    writes = [
        "data.cache_dir",
        "checkpointing.save_dir" if cfg.mode == "train" else "eval.output_dir",
    ]
    for key in writes:
        try:
            value = _get(cfg, key)
        except Exception:
            continue
        if isinstance(value, str) and value and "://" not in value and not _can_create(value):
            raise ConfigError(
                f"{key}={value} cannot be written (a file is in the way, or no permission): "
                "point it at a writable folder"
            )


def _can_create(path: str) -> bool:
    """Can `path` be a folder we write into: its nearest existing ancestor is a writable
    folder (and `path` itself, if it exists, a folder)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return os.path.isdir(path) and os.access(path, os.W_OK)
    parent = os.path.dirname(path)
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return os.path.isdir(parent) and os.access(parent, os.W_OK)


def _check_resume(cfg):
    """The default resume path is used when it exists (re-running a command continues the
    run); a resume path given explicitly must exist: a typo is not a fresh run."""
    ck = cfg.checkpointing
    if cfg.mode != "train" or not ck.get("resume_from_ckpt") or "resume_ckpt_path" not in ck:
        return
    raw = OmegaConf.to_container(ck, resolve=False).get("resume_ckpt_path")
    if raw in (None, "", DEFAULT_RESUME_PATH):
        return
    path = str(ck.resume_ckpt_path)
    if "://" not in path and not os.path.exists(path):
        raise missing_path("checkpointing.resume_ckpt_path", path)


def _check_sampling_keys(cfg):
    """top_p and the conditioning texts, in every mode (the keys are cheap to check)."""
    top_p = _get(cfg, "sampling.top_p")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ConfigError(
            f"sampling.top_p={top_p!r} must be a number in (0, 1]: "
            "1.0 turns nucleus sampling off, e.g. sampling.top_p=0.9 keeps 90% of the mass"
        )
    for key in ("prefix", "suffix", "template"):
        value = _get(cfg, f"sampling.{key}")
        if value is not None and not isinstance(value, str):
            raise ConfigError(
                f"sampling.{key}={value!r} must be text or null: quote it on the command line, "
                f"e.g. 'sampling.{key}=\"{value}\"'"
            )
    s = cfg.sampling
    if s.template and (s.prefix or s.suffix):
        raise ConfigError(
            "sampling.template is set together with sampling.prefix/suffix: "
            "write the prefix and suffix into the template and drop them"
        )


def _check_sampling(cfg):
    """The sampler fits the model: its family, its latent, fixz (predictors.py)."""
    if cfg.mode != "sample_eval":
        return
    pred, algo = predictors.resolve(cfg), algorithms.algorithm_class(cfg)
    if pred.family != algo.family:
        raise ConfigError(
            f"sampling.predictor={pred.name} is for {pred.family} models, and "
            f"{algo.selected_by}={algo.name} is not one: set "
            f"sampling.predictor={algo.default_predictor}"
        )
    if pred.needs_latent and not algo.uses_latent:
        raise ConfigError(
            f"sampling.predictor={pred.name} samples z, which needs training.loss_type=vae: "
            f"for an {algo.name.upper()} model use sampling.predictor={algo.default_predictor}"
        )
    fixz = cfg.sampling.fixz
    if fixz is not None and not (pred.fixz and algo.uses_latent):
        drawers = ", ".join(p.name for p in predictors.PREDICTORS.values() if p.fixz)
        what = f"sampling.predictor={pred.name}" if algo.uses_latent else _algorithm_key(cfg)
        fix = " or use sampling.predictor=vae" if algo.uses_latent else ""
        raise ConfigError(
            f"sampling.fixz={fixz} applies to a VADD model under a sampler that draws z "
            f"({drawers}), not to {what}: drop sampling.fixz{fix}"
        )
    if cfg.sampling.get("semi_ar", False):
        _check_semi_ar(cfg, pred, algo)


def _check_keep_frame(cfg):
    """keep_frame=True: a diffusion model on text whose sampler is given the same frame."""
    if not cfg.get("keep_frame", False):
        return
    kind, algo = cfg.data.kind, algorithms.algorithm_class(cfg)
    if kind not in ("text", "set") or algo.family == "ar":
        what = f"data.kind={kind}" if algo.family != "ar" else "the AR baseline"
        raise ConfigError(f"keep_frame=True needs a diffusion model on text; {what} has no "
                          "frame: set keep_frame=False")  # fmt: skip
    if cfg.sampling.frame != "auto":
        raise ConfigError(
            f"keep_frame=True never masks the frame in training, so the sampler must be given "
            f"it: sampling.frame={cfg.sampling.frame} -> sampling.frame=auto (or keep_frame=False)"
        )
    if cfg.sampling.get("semi_ar", False) and kind == "text" and cfg.data.wrap:
        raise ConfigError(
            "keep_frame=True with wrapped text never masks EOS at L-1, but semi_ar windows do "
            "not end with it: set sampling.semi_ar=False or keep_frame=False"
        )


def _check_semi_ar(cfg, pred, algo):
    """sampling.semi_ar: windows of model.length slid by stride_length, num_strides times
    (samplers.sample_semi_ar); the first window alone holds the BOS frame and a prefix."""
    s, length = cfg.sampling, cfg.model.length
    off = "or set sampling.semi_ar=False"
    if algo.family == "ar":
        raise ConfigError(
            f"sampling.semi_ar=True slides a diffusion sampler's window, and "
            f"{algo.selected_by}={algo.name} decodes left to right at any length: set "
            "sampling.semi_ar=False"
        )
    if not pred.uses_steps:
        raise ConfigError(
            f"sampling.semi_ar=True does not combine with sampling.predictor={pred.name}: use "
            f"a stepped diffusion sampler (sampling.predictor={algo.default_predictor}) {off}"
        )
    if cfg.data.kind != "text":
        raise ConfigError(
            f"sampling.semi_ar=True writes rows longer than model.length, which "
            f"data={cfg.data.name} ({cfg.data.kind} data) cannot score: set sampling.semi_ar=False"
        )
    for key in ("suffix", "template"):
        if s.get(key):
            raise ConfigError(
                f"sampling.{key}={s[key]!r} with sampling.semi_ar=True: only a prefix is "
                f"supported (it opens the first window): drop sampling.{key} {off}"
            )
    frame = int(s.frame == "auto" or bool(s.prefix))  # BOS at 0 (semi-AR drops the EOS)
    num, stride, most = s.get("num_strides"), s.get("stride_length"), length - frame
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ConfigError(
            f"sampling.num_strides={num!r} must be an integer >= 1 (the number of windows) {off}"
        )
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= most:
        why = f"model.length={length}" + (" less the BOS the frame fixes" if frame else "")
        raise ConfigError(
            f"sampling.stride_length={stride!r} must be an integer in [1, {most}] ({why}): "
            f"each window keeps model.length - stride_length tokens of the last {off}"
        )

"""Start-up validation of the composed config: one clear line per bad value, in seconds.

Imports only omegaconf so it runs before torch/lightning are loaded. Every message names
the key, the bad value and the fix.
"""

import difflib
import os

from omegaconf import DictConfig

import algorithms
from config_check.data_rules import _check_data
from config_check.model_rules import (
    _check_algorithm,
    _check_backbone,
    _check_booleans,
    _check_model_shape,
)
from config_check.run_rules import (
    _check_eval,
    _check_group_selection,
    _check_keep_frame,
    _check_logger,
    _check_resume,
    _check_sampling,
    _check_sampling_keys,
    _check_sizes_and_paths,
    _check_steps,
    _check_strategy,
    _check_warm_start,
)
from config_check.values import _check_choice, _check_range
from errors import ConfigError  # noqa: F401  (re-exported)
from sampling import predictors

CHOICES = {
    "mode": ["train", "ppl_eval", "sample_eval"],
    "diffusion": ["absorbing_state"],
    "backbone": ["dit", "ar", "radd"],
    "parameterization": ["subs", "sedd", "ar"],
    "training.loss_type": "registry",  # the registered algorithms (registry_choices)
    "training.loss_strategy": ["klweight", "cyclical", "none"],
    "training.kl_weighting": ["time", "steps", "once"],
    "model.latent_struc": ["adaln"],
    "model.type": ["ddit", "toy_mlp"],
    "model.gelu": ["auto", "tanh", "erf"],
    "decoder.mask_struc": ["adaln", "none"],
    "noise.type": ["loglinear", "linear", "cosine", "geometric"],
    "lr_scheduler.name": ["constant_warmup", "cosine_decay_warmup"],
    "strategy.name": ["auto", "ddp", "fsdp"],
    "sampling.predictor": "registry",  # "auto" and the registered samplers
    "sampling.order": ["left_to_right", "random"],
    "sampling.frame": ["auto", "none"],
    "logger": ["csv", "wandb", "tensorboard", "none"],
    "wandb.mode": ["offline", "online", "disabled"],
    # no fp16: the -inf mask logit overflows and the manual optimisation has no GradScaler
    "trainer.precision": ["auto", "32-true", "32", "bf16-mixed", "bf16-true", "64-true"],
}


def check_group_choices(args: list[str], config_dir: str) -> None:
    """`group=name` overrides on the command line name a file configs/<group>/<name>.yaml;
    a typo (`data=wikitxt`) gets one line with the close matches instead of Hydra's
    page-long listing. Run before Hydra parses the command line."""
    for arg in args:
        key, sep, value = arg.lstrip("+").partition("=")
        folder = os.path.join(config_dir, key)
        if not sep or "." in key or "/" in key or not os.path.isdir(folder):
            continue
        names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
        for name in value.strip("[]").split(","):  # multirun lists: data=a,b
            name = name.strip().strip("'\"")
            if name and name not in names and name != "null":
                close = difflib.get_close_matches(name, names, n=3)
                fix = " or ".join(f"{key}={c}" for c in close)
                fix = f"did you mean {fix}?" if close else "use one of " + ", ".join(names)
                raise ConfigError(f"{key}={name} is not a config of configs/{key}/: {fix}")


# key: (minimum, maximum or None, integer?)
RANGES = {
    "T": (0, None, True),
    "model.length": (2, None, True),
    "model.hidden_size": (1, None, True),
    "model.n_blocks": (1, None, True),
    "model.cond_dim": (1, None, True),
    "training.num_particles": (1, None, True),
    "training.encoder_training_times": (1, None, True),
    "training.init_kl_weight": (0.0, 1.0, False),
    "training.kl_weight_interval": (0, None, True),
    "training.kl_hold_steps": (0, None, True),
    "training.kl_cycles": (1, None, True),
    "training.kl_cycle_ramp": (0.0, 1.0, False),
    "training.free_bits": (0.0, None, False),
    "training.free_bits_group": (0, None, True),
    "training.ema": (0.0, 0.999999, False),
    "training.sampling_eps": (0.0, 0.5, False),
    "training.freeze_decoder_steps": (0, None, True),
    "eval.num_particles": (1, None, True),
    "sampling.num_sample_batches": (0, None, True),
    "sampling.top_k": (0, None, True),
    "loader.global_batch_size": (1, None, True),
    "loader.num_workers": (0, None, True),
    "seed": (0, None, True),
    "optim.lr": (0.0, None, False),
    "optim.beta1": (0.0, 0.999999, False),  # AdamW needs [0, 1)
    "optim.beta2": (0.0, 0.999999, False),
    "optim.eps": (0.0, None, False),
    "optim.weight_decay": (0.0, None, False),
    "checkpointing.keep_last": (-1, None, True),  # -1 keeps every periodic checkpoint
    "optim.encoder_lr_scale": (0.0, None, False),
    "trainer.max_steps": (-1, None, True),
    "trainer.num_nodes": (1, None, True),
}


def registry_choices() -> dict[str, list[str]]:
    """The choices the registries define: algorithms by training.loss_type, samplers."""
    return {
        "training.loss_type": algorithms.names("training.loss_type"),
        "sampling.predictor": ["auto", *predictors.PREDICTORS],
    }


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad value found."""
    registry = registry_choices()
    for key, allowed in CHOICES.items():
        _check_choice(cfg, key, registry[key] if allowed == "registry" else allowed)
    for key, (lo, hi, integer) in RANGES.items():
        _check_range(cfg, key, lo, hi, integer)
    rules = (
        _check_group_selection,
        _check_steps,
        _check_booleans,
        _check_sizes_and_paths,
        _check_data,
        _check_backbone,
        _check_algorithm,
        _check_model_shape,
        _check_sampling_keys,
        _check_sampling,
        _check_keep_frame,
        _check_eval,
        _check_warm_start,
        _check_resume,
        _check_strategy,
        _check_logger,
    )
    for rule in rules:
        rule(cfg)

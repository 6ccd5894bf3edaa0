"""Checkpoints describe themselves: evaluation takes the architecture from the checkpoint.

`ppl_eval` / `sample_eval` with only `eval.checkpoint_path=...` get the sizes, the
algorithm (`training.loss_type`), the backbone and the latent keys the model was trained
with. A value the command line sets itself must agree: one that contradicts the
checkpoint is refused naming both, so the seed README's long command lines (which repeat
the training values) still work, and a wrong size is one line, not a shape error.
"""

import os

from omegaconf import DictConfig, OmegaConf, open_dict

from errors import ConfigError

# What decides the networks and the bound: adopted from the checkpoint's saved config.
TOP_KEYS = ("backbone", "parameterization", "time_conditioning", "training.loss_type")
GROUPS = ("model", "decoder", "noise")  # every key of these groups but the ones below
RUNTIME_KEYS = {"model.compile", "model.init_from", "model.init_from_ema"}  # never adopted
# Adopted unless the command line sets them, and then the command line wins: kernel
# choices and dropout change no weight (model.gelu=tanh keeps MDLM's tanh, README "Speed").
LENIENT_KEYS = {"model.gelu", "model.dropout", "decoder.dropout"}
GROUP_KINDS = {"noise": "type", "model": "type"}  # the key that says which file a group is
RUNTIME_NAMES = {key.split(".")[1] for key in RUNTIME_KEYS}


def explicit_keys(overrides: list[str], config_dir: str) -> dict[str, str]:
    """The config keys a command line sets, each with what set it: `a.b=v` sets a.b;
    `model=small` the keys configs/model/small.yaml holds (a file with `# @package
    _global_`, e.g. a recipe, holds keys of the whole config)."""
    keys, values = {}, {}
    for arg in overrides:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep:
            continue
        path = os.path.join(config_dir, key, f"{value}.yaml")
        if "." in key or not os.path.isfile(path):
            values[key] = "the command line"
            continue
        with open(path, encoding="utf-8") as f:  # the header sits among the leading comments
            head = [ln for ln in f.read().splitlines() if ln.strip()][:5]
        is_global = any("@package _global_" in ln for ln in head if ln.startswith("#"))
        node = OmegaConf.to_container(OmegaConf.load(path)) or {}
        node.pop("defaults", None)
        keys.update({f"{'' if is_global else key + '.'}{leaf}": arg for leaf in leaves(node)})
    return {**keys, **values}  # Hydra applies value overrides after the group files


def leaves(node: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} of a nested dict's leaves."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def architecture(saved: dict) -> dict:
    """key -> value of the architecture keys in a checkpoint's saved config."""
    flat = leaves(saved)
    keys = [k for k in TOP_KEYS if k in flat]
    keys += [k for k in flat if k.split(".")[0] in GROUPS and k not in RUNTIME_KEYS]
    return {k: flat[k] for k in keys}


def adopt_architecture(cfg: DictConfig, saved: dict | None, explicit: dict, path) -> list:
    """Set cfg's architecture keys to the checkpoint's; refuse an explicit value that
    contradicts it. When the checkpoint's noise schedule or network type is not the one
    the defaults chose, the default group file's other keys are dropped (a loglinear
    `eps` must not reach a linear schedule). Returns the changes as 'key=value' strings."""
    if not saved:
        return []  # not a vadd checkpoint (e.g. MDLM's own): the config decides
    changed, before = [], {g: cfg[g].get(kind) for g, kind in GROUP_KINDS.items()}
    for key, value in architecture(saved).items():
        current = OmegaConf.select(cfg, key, default=None)
        if current == value or (key in LENIENT_KEYS and key in explicit):
            continue
        if key in explicit and str(current) != str(value):  # '512' (quoted) is 512
            source = explicit[key]  # "the command line", or the group choice "model=small"
            by, drop = ("on the command line", key)
            if "=" in source:
                by, drop = f"(by {source})", source
            raise ConfigError(
                f"{key}={current} {by}, but {path} was trained with {key}={value}: drop "
                f"{drop} (evaluation takes the architecture from the checkpoint) or pass the "
                "checkpoint this value belongs to"
            )
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, force_add=True)
        changed.append(f"{key}={value}")
    for group, kind in GROUP_KINDS.items():  # another schedule / network type than the
        mine, theirs = before[group], (saved.get(group) or {}).get(kind)  # defaults had
        if theirs is None or mine == theirs or any(k.startswith(f"{group}.") for k in explicit):
            continue
        stale = set(cfg[group]) - set(saved[group]) - RUNTIME_NAMES
        with open_dict(cfg):  # the keys of the group file the defaults chose, not this one's
            for name in stale:
                del cfg[group][name]
    return changed

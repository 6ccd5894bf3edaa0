"""Reading config values and the two generic checks: a choice list, a numeric range."""

import difflib

from omegaconf import OmegaConf

from errors import ConfigError

# Keys config.yaml leaves unset so that the seed command lines' `+key=value` still works
# (Hydra refuses `+` for a key that exists); their defaults live here, read by optional().
OPTIONAL_DEFAULTS = {"eval.ppl_times": 1}


def optional(cfg, key: str):
    """The value of an OPTIONAL_DEFAULTS key: the config's when set, else the default."""
    value = OmegaConf.select(cfg, key, default=None)
    return OPTIONAL_DEFAULTS[key] if value is None else value


def _get(cfg, key):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _check_choice(cfg, key, allowed):
    value = _get(cfg, key)
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        fix = f"did you mean {key}={hint[0]}?" if hint else f"use one of {allowed}"
        raise ConfigError(f"{key}={value!r} is not one of {allowed}: {fix}")


def _check_range(cfg, key, lo, hi, integer):
    value = _get(cfg, key)
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{key}={value!r} must be {kind}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}={value} is out of range: it must be {bound}")

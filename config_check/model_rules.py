"""Rules on the model as a whole: backbone / parameterization, the selected algorithm's
own rules, attention heads, a size that cannot fit in memory, and boolean keys."""

import os

from omegaconf import DictConfig, OmegaConf

import algorithms
from config_check.values import _check_range, _get
from errors import ConfigError


def _check_backbone(cfg):
    if (cfg.backbone == "ar") != (cfg.parameterization == "ar"):
        raise ConfigError(
            f"backbone={cfg.backbone} with parameterization={cfg.parameterization}: "
            "the AR baseline needs both backbone=ar and parameterization=ar"
        )
    if cfg.backbone == "radd" and cfg.time_conditioning:
        raise ConfigError(
            "backbone=radd is RADD's time-independent network, it has no time input: set "
            "time_conditioning=False, or backbone=dit to condition on time"
        )
    if cfg.backbone == "radd" and cfg.model.type == "toy_mlp":
        raise ConfigError(
            "backbone=radd with model=toy_mlp: the toy data's MLP networks are their own "
            "backbone; drop backbone=radd (or use a DiT-sized model, e.g. model=cpu)"
        )
    if cfg.training.get("decoupled_strata") and not cfg.training.antithetic_sampling:
        raise ConfigError(
            "training.decoupled_strata=True jitters the strata of antithetic_sampling, "
            "which is off: set training.antithetic_sampling=True or drop decoupled_strata"
        )
    if str(cfg.model.get("name", "")).endswith("_radd") and cfg.backbone != "radd":
        raise ConfigError(
            f"model={cfg.model.name} gives RADD's sizes for its time-free network, but "
            f"backbone={cfg.backbone}: add backbone=radd (or pick model=small / medium)"
        )
    if cfg.training.kl_weighting == "steps" and cfg.T < 1:
        raise ConfigError(
            "training.kl_weighting=steps needs the number of steps T >= 1 "
            f"(got T={cfg.T}): set T=<steps> or use training.kl_weighting=time"
        )


def _check_algorithm(cfg):
    """The selected algorithm's own rules (algorithms/)."""
    algorithms.algorithm_class(cfg).validate(cfg)


# Keys only the attention networks read (models/dit.py, models/autoregressive.py): the
# toy MLP's groups (model=toy_mlp) do not carry them.
ATTENTION_RANGES = {"n_heads": (1, None, True), "dropout": (0.0, 1.0, False)}


def _check_model_shape(cfg):
    if cfg.model.type != "toy_mlp":
        for key, (lo, hi, integer) in ATTENTION_RANGES.items():
            _check_range(cfg, f"model.{key}", lo, hi, integer)
        _check_heads("model", cfg.model)
        if algorithms.algorithm_class(cfg).uses_latent:
            _check_heads("decoder", cfg.decoder)
    _check_memory(cfg)


def _parameter_estimate(cfg) -> dict[str, float]:
    """Rough parameter counts of what each size key builds (models/dit.py's layout: 12 H^2
    per block plus AdaLN, the token table in and out, z's MLP and the encoder's head)."""
    m, vocab = cfg.model, int(cfg.data.get("vocab_size") or 50304)
    terms = {
        "model.hidden_size": m.n_blocks * (12 * m.hidden_size**2 + 6 * m.cond_dim * m.hidden_size)
        + 2 * vocab * m.hidden_size,
    }
    if algorithms.algorithm_class(cfg).uses_latent and m.latent_dim:
        d, dec = int(m.latent_dim), cfg.decoder
        latent_mlp = 2 * d * d + d * m.cond_dim if m.latentMLP else 0
        terms["model.latent_dim"] = latent_mlp + 2 * d * dec.hidden_size
        terms["decoder.hidden_size"] = (
            dec.n_blocks * (12 * dec.hidden_size**2 + 6 * dec.cond_dim * dec.hidden_size)
            + vocab * dec.hidden_size
        )
    return terms


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def _check_memory(cfg):
    """A size typo (model.latent_dim=5120000) would otherwise allocate until the machine
    swaps or the OOM killer ends the job: refuse a model whose weights, gradients and
    AdamW moments (16 bytes a parameter; weights and EMA, 8, to evaluate) exceed the
    memory of this machine."""
    total = _memory_bytes()
    if total is None or cfg.model.type == "toy_mlp":
        return
    terms = _parameter_estimate(cfg)
    params = sum(terms.values())
    need = params * (16 if cfg.mode == "train" else 8)
    if need > total:
        key = max(terms, key=terms.get)
        raise ConfigError(
            f"{key}={_get(cfg, key)} makes the model about {params:.2g} parameters "
            f"({need / 2**30:,.0f} GiB to {'train' if cfg.mode == 'train' else 'evaluate'}), "
            f"more than this machine's {total / 2**30:.0f} GiB of memory: is it a typo? "
            "(model=small: hidden_size 768, latent_dim 512)"
        )


def _boolean_keys(config_dir: str) -> set[str]:
    """Names of the keys the YAML files give a boolean value (fixz: null / True / False)."""
    names = {"fixz"}

    def walk(node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(value, bool):
                names.add(str(key))

    for folder, _, files in os.walk(config_dir):
        for file in files:
            if file.endswith(".yaml"):
                node = OmegaConf.to_container(OmegaConf.load(os.path.join(folder, file)))
                if isinstance(node, dict):
                    walk(node)
    return names


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

FALSE_WORDS = ("no", "n", "off", "false", "f", "0", "")


def _check_booleans(cfg):
    """Hydra reads `eval.disable_ema=no` as the string 'no', which Python treats as True:
    a boolean key must hold True, False (or null where null is its default)."""
    names = _boolean_keys(CONFIG_DIR)

    def walk(node, prefix):
        for key in node:
            path = f"{prefix}{key}"
            try:
                value = node[key]
            except Exception:  # an interpolation that resolves only inside a Hydra run
                continue
            if isinstance(value, DictConfig):
                walk(value, f"{path}.")
            elif key in names and value is not None and not isinstance(value, bool):
                meant = "False" if str(value).strip().lower() in FALSE_WORDS else "True"
                raise ConfigError(
                    f"{path}={value!r} is not a boolean: write {path}={meant} (or "
                    f"{'True' if meant == 'False' else 'False'})"
                )

    walk(cfg, "")


def _check_heads(prefix, m):
    if m.hidden_size % m.n_heads or (m.hidden_size // m.n_heads) % 2:
        raise ConfigError(
            f"{prefix}.hidden_size={m.hidden_size} must split into {prefix}.n_heads={m.n_heads} "
            "heads of even size (rotary embedding): change one of them"
        )

"""Start-up validation of the composed config: one clear line per bad value, in seconds.

Imports only omegaconf so it runs before torch/lightning are loaded. Every message names
the key, the bad value and the fix.
"""

import difflib
import os

from omegaconf import DictConfig, OmegaConf

import algorithms
from errors import ConfigError, VaddError  # noqa: F401  (ConfigError: re-exported)
from sampling import predictors

CHOICES = {
    "mode": ["train", "ppl_eval", "sample_eval"],
    "diffusion": ["absorbing_state"],
    "backbone": ["dit", "ar"],
    "parameterization": ["subs", "ar"],
    "training.loss_strategy": ["klweight", "cyclical", "none"],
    "training.kl_weighting": ["time", "steps", "once"],
    "model.latent_struc": ["adaln"],
    "model.type": ["ddit", "toy_mlp"],
    "model.gelu": ["auto", "tanh", "erf"],
    "decoder.mask_struc": ["adaln", "none"],
    "noise.type": ["loglinear", "linear", "cosine", "geometric"],
    "lr_scheduler.name": ["constant_warmup", "cosine_decay_warmup"],
    "strategy.name": ["auto", "ddp", "fsdp"],
    "sampling.order": ["left_to_right", "random"],
    "sampling.frame": ["auto", "none"],
    "logger": ["csv", "wandb", "none"],
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
    "model.n_heads": (1, None, True),
    "model.n_blocks": (1, None, True),
    "model.cond_dim": (1, None, True),
    "model.dropout": (0.0, 1.0, False),
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
    "sampling.steps": (1, None, True),
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
    for key, allowed in {**CHOICES, **registry_choices()}.items():
        _check_choice(cfg, key, allowed)
    for key, (lo, hi, integer) in RANGES.items():
        _check_range(cfg, key, lo, hi, integer)
    rules = (
        _check_booleans,
        _check_sizes_and_paths,
        _check_data,
        _check_backbone,
        _check_algorithm,
        _check_model_shape,
        _check_sampling_keys,
        _check_sampling,
        _check_eval,
        _check_warm_start,
        _check_resume,
        _check_strategy,
    )
    for rule in rules:
        rule(cfg)


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


# Non-text data (data.kind=grid / image, data/grid.py): what a local folder must hold.
DATA_KINDS = ["text", "grid", "image", "set"]
LOCAL_FOLDERS = {
    "mnist_local": "train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]",
    "cifar10_local": "CIFAR-10's python batches (cifar-10-batches-py: data_batch_1..5, test_batch)",
}


def data_kind(cfg: DictConfig) -> str:
    """text (tokenised corpora), grid (the checkerboard), image (MNIST, CIFAR-10) or set
    (a known finite set of text sequences, data/text_set.py)."""
    return cfg.data.get("kind", "text")


def _check_data(cfg):
    kind = data_kind(cfg)
    if kind not in DATA_KINDS:
        raise ConfigError(f"data.kind={kind!r} is not one of {DATA_KINDS}")
    if cfg.model.get("type") == "toy_mlp":
        _check_toy_mlp(cfg, kind)
    if kind == "text":
        if cfg.data.get("valid") == "local_text":
            _check_range(cfg, "data.valid_fraction", 0.0, 0.5, False)
            _check_range(cfg, "data.valid_min_chars", 0, None, True)
        if cfg.model.length < 3:
            raise ConfigError(
                f"model.length={cfg.model.length} is too short for text: every row holds BOS "
                "and EOS around its tokens; set model.length >= 3 (MDLM: 1024)"
            )
        return
    if kind == "set":
        _check_range(cfg, "data.num_sequences", 1, None, True)
        _check_range(cfg, "data.repeats", 1, None, True)
        return
    _check_local_folder(cfg)
    _check_grid_data(cfg, kind)


def _check_grid_data(cfg, kind):
    d, name = cfg.data, cfg.data.name
    shape = list(d.shape)
    length = 1
    for dim in shape:
        length *= int(dim)
    if cfg.model.length != length:
        dims = " x ".join(str(dim) for dim in shape)
        raise ConfigError(
            f"model.length={cfg.model.length} but data={name} rows have {length} tokens "
            f"({dims}): set model.length={length}"
        )
    key, lo, hi = ("levels", 2, 256) if kind == "image" else ("bins", 1, None)
    _check_range(cfg, f"data.{key}", lo, hi, True)
    for key in ("prefix", "suffix", "template"):
        if cfg.sampling.get(key):
            raise ConfigError(
                f"sampling.{key} conditions on text, but data={name} has none: drop sampling.{key}"
            )
    if cfg.eval.compute_generative_perplexity:
        raise ConfigError(
            f"eval.compute_generative_perplexity=True scores text with a judge LM, but "
            f"data={name} is not text: set eval.compute_generative_perplexity=False "
            "(sample_eval reports JS divergence / writes an image grid instead)"
        )


def _check_local_folder(cfg):
    name = str(cfg.data.train)
    if name not in LOCAL_FOLDERS:
        return
    path = cfg.data.get("path")
    if not path:
        raise ConfigError(
            f"data={cfg.data.name} reads a local copy and data.path is not set: pass "
            f"data.path=<folder holding {LOCAL_FOLDERS[name]}>"
        )
    if "://" not in str(path) and not os.path.isdir(os.path.expanduser(str(path))):
        raise ConfigError(
            f"data.path={path} is not a folder: point it at the folder holding "
            f"{LOCAL_FOLDERS[name]}"
        )


def _check_toy_mlp(cfg, kind):
    if kind != "grid":
        raise ConfigError(
            f"model=toy_mlp is an MLP for 2-token toy data (data=checkerboard), not "
            f"data={cfg.data.name}: use a DiT model group (model=cpu, or model=pixel_tiny "
            "for images)"
        )
    if not cfg.model.latent1d:
        raise ConfigError(
            "model=toy_mlp draws one z per sequence: set model.latent1d=True "
            "(per-position latents need a DiT model group)"
        )
    if algorithms.algorithm_class(cfg).uses_latent and not cfg.decoder.get("emb_dim"):
        raise ConfigError(
            f"model=toy_mlp needs its MLP encoder sizes (decoder.emb_dim), but "
            f"decoder={cfg.decoder.name} is a DiT group: use decoder=toy_mlp"
        )


def _check_backbone(cfg):
    if (cfg.backbone == "ar") != (cfg.parameterization == "ar"):
        raise ConfigError(
            f"backbone={cfg.backbone} with parameterization={cfg.parameterization}: "
            "the AR baseline needs both backbone=ar and parameterization=ar"
        )
    if cfg.training.kl_weighting == "steps" and cfg.T < 1:
        raise ConfigError(
            "training.kl_weighting=steps needs the number of steps T >= 1 "
            f"(got T={cfg.T}): set T=<steps> or use training.kl_weighting=time"
        )


def _check_algorithm(cfg):
    """The selected algorithm's own rules (algorithms/)."""
    algorithms.algorithm_class(cfg).validate(cfg)


def _check_model_shape(cfg):
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
    if total is None or cfg.model.get("type") == "toy_mlp":
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


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
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


# precisions Lightning's ModelParallelStrategy (strategy=fsdp) accepts, besides auto
FSDP_PRECISIONS = ["auto", "32-true", "32", "bf16-mixed", "bf16-true"]


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


def _check_eval(cfg):
    if cfg.mode in ("ppl_eval", "sample_eval") and not cfg.eval.checkpoint_path:
        raise ConfigError(
            f"mode={cfg.mode} needs a trained model: set eval.checkpoint_path=<path to a .ckpt>"
        )
    path = str(cfg.eval.checkpoint_path)
    if cfg.mode != "train" and "://" not in path and not os.path.exists(path):
        raise ConfigError(
            f"eval.checkpoint_path={path} does not exist: pass the path of a .ckpt file "
            "or of a folder written by scripts/export.py"
        )
    limit = cfg.eval.get("limit_batches")
    ok = limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1)
    if not ok and not (isinstance(limit, float) and 0.0 < limit <= 1.0):
        raise ConfigError(
            f"eval.limit_batches={limit!r} must be null (the whole split), a number of "
            "batches >= 1, or a fraction in (0, 1]"
        )
    times = cfg.eval.get("ppl_times", 1)
    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise ConfigError(f"eval.ppl_times={times!r} must be an integer >= 1")


def _check_warm_start(cfg):
    """model.init_from / init_from_ema and training.freeze_decoder_steps (README "Warm start")."""
    path, freeze = _get(cfg, "model.init_from"), _get(cfg, "training.freeze_decoder_steps")
    if path and cfg.mode == "train" and "://" not in str(path) and not os.path.exists(path):
        raise ConfigError(
            f"model.init_from={path} does not exist: pass an MDLM or vadd .ckpt, or a folder "
            "with config.json and model.safetensors"
        )
    if freeze and not algorithms.algorithm_class(cfg).uses_latent:
        raise ConfigError(
            f"training.freeze_decoder_steps={freeze} trains only GenDIT's latent path and the "
            f"encoder, which needs training.loss_type=vae (got {cfg.training.loss_type}): "
            "set training.freeze_decoder_steps=0"
        )
    if freeze and not path:
        raise ConfigError(
            f"training.freeze_decoder_steps={freeze} would freeze an untrained decoder: "
            "set model.init_from=<MDLM checkpoint> or training.freeze_decoder_steps=0"
        )


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
        raise ConfigError(
            f"checkpointing.resume_ckpt_path={path} does not exist: fix the path, or drop it "
            "to resume from <checkpointing.save_dir>/checkpoints/last.ckpt when that exists"
        )


def resolve_predictor(cfg: DictConfig) -> str:
    """`auto` -> the algorithm's default sampler (vae for VADD, ddpm_cache for MDLM, ar)."""
    return predictors.resolve(cfg).name


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
    if pred.needs_latent and not algo.uses_latent:
        raise ConfigError(
            f"sampling.predictor={pred.name} samples z, which needs training.loss_type=vae: "
            f"for an {algo.name.upper()} model use sampling.predictor={algo.default_predictor}"
        )
    if pred.family != algo.family:
        raise ConfigError(
            f"sampling.predictor={pred.name} is for {pred.family} models, and "
            f"{algo.selected_by}={algo.name} is not one: set "
            f"sampling.predictor={algo.default_predictor}"
        )
    fixz = cfg.sampling.fixz
    if fixz is not None and not (pred.fixz and algo.uses_latent):
        raise ConfigError(
            f"sampling.fixz={fixz} only applies to the vae samplers (got "
            f"sampling.predictor={pred.name}): drop sampling.fixz or use sampling.predictor=vae"
        )

"""Training algorithms: one small class each, registered by name (cf. DUO's algo.py).

An algorithm says which networks it trains, the loss of a batch, the bound `ppl_eval`
reports (and that bound's name), the sampler `sampling.predictor=auto` picks, the config
rules it needs, and what it adds to validation. The rest of the code asks the algorithm
instead of comparing `loss_type` / `backbone` strings. `training.loss_type` selects a
diffusion algorithm; `parameterization=ar` (with `backbone=ar`) the AR baseline.

Adding one: subclass Algorithm, decorate it with @register, add its config keys, test
it (README "Extending vadd"). config_check imports this module before torch is loaded,
so the hooks that need torch import it where they run.
"""

from typing import ClassVar

from omegaconf import DictConfig

from errors import ConfigError


class Algorithm:
    """Hooks with MDLM-like defaults; subclasses override what differs."""

    name: ClassVar[str]  # the value of `selected_by` that picks this algorithm
    aliases: ClassVar[tuple[str, ...]] = ()  # other spellings that select it (RADD's)
    selected_by: ClassVar[str] = "training.loss_type"
    label: ClassVar[str]  # what the exported model card calls the model
    uses_latent: ClassVar[bool] = False  # an encoder r(z | x0, xt) and a decoder reading z
    family: ClassVar[str] = "diffusion"  # which samplers fit: predictors.Predictor.family
    default_predictor: ClassVar[str] = "ddpm_cache"
    # the class of models/modeling_vadd.py an export loads as (None: vadd's loader only)
    transformers_class: ClassVar[str | None] = None

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        """Raise ConfigError (one line: the key, the value, the fix) for a config this
        algorithm cannot run. Called by config_check.validate_config at start-up."""

    def build_networks(self, vocab_size: int):
        """(backbone, encoder or None) for a vocabulary of `vocab_size` ids ([MASK] incl.)."""
        raise NotImplementedError

    def loss(self, module, batch: dict, t, beta: float, num_particles: int, draws, train: bool):
        """objectives.LossOutput of a batch. train=True may add training-only terms;
        evaluation calls it with beta=1, train=False: the plain bound."""
        raise NotImplementedError

    def bound_name(self, num_particles: int) -> str:
        """What `ppl_eval` reports, named exactly (README "Reported numbers")."""
        raise NotImplementedError

    def validation_extras(self, module, batch: dict, t) -> dict:
        """Further per-row values for validation (name -> (rows,) tensor), summed there."""
        return {}

    def log_score(self, logits, alpha_t):
        """log of the concrete score p_t(y) / p_t([MASK]) at masked positions, for the real
        tokens: logits (N, V) float32 of those positions, alpha_t (N,) or a scalar tensor
        -> (N, V) in the logits' dtype. Absorbing diffusion's score is the clean-data
        conditional times alpha_t / (1 - alpha_t) (RADD, eq. 4); SEDD's parameterisation
        overrides this. The score entropy and SEDD's `analytic` sampler read it."""
        import torch

        a = torch.as_tensor(alpha_t, dtype=torch.float64, device=logits.device)
        shift = (torch.log(a) - torch.log1p(-a)).reshape(-1, 1)
        return torch.log_softmax(logits, dim=-1) + shift.to(logits.dtype)

    def latent_shape(self, length: int) -> tuple[int, ...] | None:
        """Shape of one sequence's z for rows of `length` tokens; None without a latent."""
        if not self.uses_latent:
            return None
        d = self.cfg.model.latent_dim
        return (d,) if self.cfg.model.latent1d else (length, d)  # one z per position

    def time_desc(self) -> str:
        return "continuous time" if self.cfg.T == 0 else f"T={self.cfg.T} steps"

    def t_eps(self) -> float:
        """The lower end of the t (or masking ratio) draw: training.sampling_eps in
        continuous time, 0 on a T-step grid (every step equally likely)."""
        return 0.0 if self.cfg.T > 0 else float(self.cfg.training.sampling_eps)

    def denoiser(self, vocab_size: int, latent: bool = False):
        """The network `backbone=` names (models/radd.BACKBONES): MDLM's DiT or RADD's
        time-free net; latent=True: the VADD decoder that reads z."""
        from models.radd import BACKBONES

        return BACKBONES[self.cfg.backbone][int(latent)](self.cfg.model, vocab_size)


ALGORITHMS: dict[str, type[Algorithm]] = {}
ALIASES: dict[str, str] = {}  # another spelling -> the registered name


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make `cls` selectable by `<cls.selected_by>=<cls.name>` (or an alias)."""
    for name in (cls.name, *cls.aliases):
        owner = ALGORITHMS.get(ALIASES.get(name, name))
        if owner is not None and owner is not cls:
            raise ValueError(f"an algorithm named {name!r} is registered already")
    ALGORITHMS[cls.name] = cls
    ALIASES.update({alias: cls.name for alias in cls.aliases})
    return cls


def names(selected_by: str = "training.loss_type") -> list[str]:
    """The values of `selected_by` that select a registered algorithm (aliases too)."""
    own = [n for n, c in ALGORITHMS.items() if c.selected_by == selected_by]
    return own + [a for a, n in ALIASES.items() if n in own]


def algorithm_class(cfg: DictConfig) -> type[Algorithm]:
    """The registered class the config selects (config_check has checked the names)."""
    for cls in ALGORITHMS.values():
        if cls.selected_by != "training.loss_type" and _select(cfg, cls.selected_by) == cls.name:
            return cls
    name = ALIASES.get(cfg.training.loss_type, cfg.training.loss_type)
    if name not in ALGORITHMS:
        raise ConfigError(f"training.loss_type={cfg.training.loss_type!r} is not one of {names()}")
    return ALGORITHMS[name]


def get_algorithm(cfg: DictConfig) -> Algorithm:
    return algorithm_class(cfg)(cfg)


def _select(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return node


def key_mask(batch: dict):
    """Padding mask (B, L) bool, or None when every token is real (fast attention path)."""
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()


# ---------------------------------------------------------------- the algorithms
@register
class MDLM(Algorithm):
    """Masked diffusion (Sahoo et al. 2024): the SUBS-parameterised NELBO, no latent."""

    name, label = "mdlm", "MDLM (DiT)"
    aliases = ("t_DCE", "t_dce")  # RADD's name for the same loss
    transformers_class = "VaddForMaskedLM"

    def build_networks(self, vocab_size):
        return self.denoiser(vocab_size), None

    def loss(self, module, batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        from algorithms import objectives

        x0 = batch["input_ids"]
        return objectives.mdlm_loss(module.backbone, x0, key_mask(batch), t, module.spec, draws)

    def bound_name(self, num_particles):
        if self.cfg.training.loss_type != self.name:  # asked for by RADD's name
            return f"t-DCE = MDLM NELBO ({self.time_desc()})"
        return f"MDLM NELBO ({self.time_desc()})"


@register
class VADD(Algorithm):
    """VADD: GenDIT p(x0 | xt, z) and InferDIT r(z | x0, xt), the (IWAE-)DELBO."""

    name, label = "vae", "VADD (GenDIT decoder + InferDIT encoder)"
    transformers_class = "VaddForMaskedLM"
    uses_latent = True
    default_predictor = "vae"

    @classmethod
    def validate(cls, cfg):
        m = cfg.model
        if not isinstance(m.latent_dim, int) or m.latent_dim <= 0:
            raise ConfigError(
                f"model.latent_dim={m.latent_dim!r} must be a positive integer for "
                "training.loss_type=vae (the paper uses model.latent_dim=512)"
            )
        if not m.latentMLP and m.latent_dim != m.cond_dim:
            raise ConfigError(
                f"model.latentMLP=False adds z to the conditioning directly, so model.latent_dim "
                f"({m.latent_dim}) must equal model.cond_dim ({m.cond_dim}): set "
                f"model.latentMLP=True or model.latent_dim={m.cond_dim}"
            )
        sizes = ("hidden_size", "n_blocks")  # the toy MLP encoder has no heads, no AdaLN
        for key in sizes if m.type == "toy_mlp" else (*sizes, "n_heads", "cond_dim"):
            value = cfg.decoder.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"decoder.{key}={value!r} must be a positive integer")
        group, tr = cfg.training.free_bits_group, cfg.training
        if tr.free_bits > 0 and group > 0 and m.latent_dim % group:
            raise ConfigError(
                f"training.free_bits_group={group} must divide model.latent_dim={m.latent_dim}: "
                "use a divisor, or 0 for one floor over all of z"
            )
        if tr.kl_weighting == "once":
            _check_kl_once(cfg)
        if tr.loss_strategy == "cyclical" and tr.kl_cycle_ramp <= 0:
            raise ConfigError(
                "training.kl_cycle_ramp=0 leaves no steps for beta to rise in a cycle: use a "
                "fraction in (0, 1], e.g. 0.5"
            )

    def build_networks(self, vocab_size):
        from models.dit import InferDIT

        m = self.cfg.model
        decoder = self.denoiser(vocab_size, latent=True)  # first: fixes both initialisations
        return decoder, InferDIT(self.cfg.decoder, m.latent_dim, m.latent1d, vocab_size, m.gelu)

    def loss(self, module, batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        from algorithms import objectives

        return objectives.vae_loss(
            module.backbone, module.encoder, batch["input_ids"], key_mask(batch), t,
            module.spec, beta=beta, num_particles=num_particles, draws=draws,
            free_bits=module.free_bits if train else None,
        )  # fmt: skip

    def bound_name(self, num_particles):
        kind = "DELBO" if num_particles == 1 else f"IWAE-DELBO (K={num_particles})"
        weighting = self.cfg.training.kl_weighting
        return f"negative {kind}, kl_weighting={weighting}, {self.time_desc()}, beta=1"

    def validation_extras(self, module, batch, t):
        """The decoder's NELBO with z drawn from the prior: what z buys is the gap."""
        from algorithms import objectives

        x0 = batch["input_ids"]
        shape = self.latent_shape(x0.shape[1])
        prior = objectives.vae_prior_nelbo(
            module.backbone, x0, key_mask(batch), t, module.spec, shape
        )
        return {"prior_nelbo": prior.per_seq}


def _check_kl_once(cfg: DictConfig) -> None:
    """kl_weighting=once bounds -log p only for an r(z | x0) that sees neither xt nor t."""
    struc = cfg.decoder.get("mask_struc")
    rules = [
        (struc != "none", f"decoder.mask_struc={struc}", "decoder.mask_struc=none (r reads x0)"),
        (bool(cfg.decoder.get("fade_to_prior")), "decoder.fade_to_prior=True",
         "decoder.fade_to_prior=False (r may not depend on t)"),
        (bool(cfg.time_conditioning), "time_conditioning=True", "time_conditioning=False"),
        (cfg.training.num_particles != 1 or cfg.eval.num_particles != 1, "num_particles > 1",
         "training.num_particles=1 eval.num_particles=1 (one z per sequence)"),
    ]  # fmt: skip
    for bad, what, fix in rules:
        if bad:
            raise ConfigError(
                f"training.kl_weighting=once (the KL paid once for one z) does not hold with "
                f"{what}: set {fix}, or use training.kl_weighting=time"
            )


@register
class AR(Algorithm):
    """The autoregressive baseline: a causal transformer, exact next-token NLL."""

    name, selected_by, label = "ar", "parameterization", "autoregressive DiT"
    family, default_predictor = "ar", "ar"

    @classmethod
    def validate(cls, cfg):
        kind = cfg.data.kind
        if kind == "set":
            raise ConfigError(
                f"data={cfg.data.name} rows have no BOS for backbone=ar to start from: use "
                "backbone=dit parameterization=subs"
            )
        if kind != "text":
            raise ConfigError(
                f"backbone=ar needs text data (rows open with BOS), not data={cfg.data.name}: "
                "use backbone=dit parameterization=subs"
            )
        if cfg.model.get("init_from"):
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} loads a DiT (MDLM / vadd) checkpoint, "
                "but backbone=ar: warm-start backbone=dit models only"
            )

    def build_networks(self, vocab_size):
        from models.autoregressive import AR as CausalTransformer

        return CausalTransformer(self.cfg.model, vocab_size), None

    def loss(self, module, batch, t=None, beta=1.0, num_particles=1, draws=None, train=False):
        from algorithms import objectives

        return objectives.ar_loss(module.backbone, batch["input_ids"], key_mask(batch), module.spec)

    def bound_name(self, num_particles):
        return "exact autoregressive NLL"


from algorithms import radd as _radd  # noqa: E402, F401  (registers RADD's and SEDD's losses)

"""Samplers by name (`sampling.predictor`), with the properties the rest of the code reads.

A predictor is a function that turns x_init (B, L) — [MASK] at the free positions —
into tokens, plus what generation, evaluation and config_check need to know about it:
the kind of model it samples (`family`), whether it needs a latent z, whether
`sampling.fixz` applies, whether it reads `sampling.steps`. The maths of each step is in
samplers.py; this module connects it to a trained module (EMA swap and autocast are
generation.generate's). Adding a sampler: a function and one `register` call (README
"Extending vadd"). config_check imports this module before torch is loaded, so the
functions import torch where they run.
"""

from collections.abc import Callable
from dataclasses import dataclass

# run(module, x_init (B, L), *, steps, fixz, generator, top_k, top_p, order)
#   -> (tokens (B, L), {"steps": ..., "nfe_per_sequence": ..., ...})
RunFn = Callable[..., tuple]


@dataclass(frozen=True)
class Predictor:
    name: str
    run: RunFn
    family: str = "diffusion"  # the algorithms it samples: Algorithm.family
    needs_latent: bool = False  # draws z, so the model must have one (vae samplers)
    fixz: bool = False  # sampling.fixz applies (with a model that has a latent)
    uses_steps: bool = True  # reads sampling.steps (any_order: one position per call)
    cached: bool = False  # skips the network for rows with nothing to reveal
    summary: str = ""


PREDICTORS: dict[str, Predictor] = {}


def register(predictor: Predictor) -> Predictor:
    if predictor.name in PREDICTORS and PREDICTORS[predictor.name] != predictor:
        raise ValueError(f"a predictor named {predictor.name!r} is registered already")
    PREDICTORS[predictor.name] = predictor
    return predictor


def get_predictor(name: str) -> Predictor:
    return PREDICTORS[name]


def resolve(cfg) -> Predictor:
    """sampling.predictor, with `auto` -> the algorithm's default_predictor."""
    from algorithms import algorithm_class

    name = cfg.sampling.predictor
    return PREDICTORS[algorithm_class(cfg).default_predictor if name == "auto" else name]


# ---------------------------------------------------------------- module adapters
def denoiser(module):
    """samplers.DenoiseFn of a module; the revealed rows' logits are float32 (the draw
    is float64 after that)."""

    def denoise(xt, sigma, z, out_mask):
        if z is None:
            return module.backbone(xt, sigma, out_mask=out_mask, fp32_logits=True)
        return module.backbone(xt, sigma, z=z, out_mask=out_mask, fp32_logits=True)

    return denoise


def latent_fn(module, generator, length: int):
    """n -> z ~ N(0, I): (n, d) per sequence, or (n, L, d) when model.latent1d=False;
    None for a model without a latent. A VADD decoder always gets a z, also under the
    ddpm predictors (a fresh one per step)."""
    shape = module.algorithm.latent_shape(length)
    if shape is None:
        return None
    import torch

    def draw(n: int):
        return torch.randn((n, *shape), generator=generator, device=module.device)

    return draw


def last_logits(module):
    """prefix (B, i) -> (B, 1, V) float32 logits of the next token: only the last
    position is projected (the AR sampler reads nothing else)."""
    import torch

    def logits(prefix):
        last = torch.zeros_like(prefix, dtype=torch.bool)
        last[:, -1] = True
        return module.backbone(prefix, out_mask=last, fp32_logits=True)[:, None, :]

    return logits


# ---------------------------------------------------------------- the samplers
def _masked(cache: bool, update: str = "tweedie", final: str = "argmax") -> RunFn:
    """samplers.sample_masked with a reveal rule and an end of chain (its docstring)."""

    def run(module, x_init, *, steps, fixz, generator, top_k, top_p, order=None):
        from sampling import samplers

        vocab, cfg = module.vocab, module.cfg
        log_score = module.algorithm.log_score if update == "analytic" else None
        x, stats = samplers.sample_masked(
            denoiser(module), x_init,
            mask_id=vocab.mask_id, vocab_size=vocab.size, noise=module.spec.noise,
            steps=steps, eps=cfg.sampling.eps,
            latent=latent_fn(module, generator, x_init.shape[1]), fixz=fixz, cache=cache,
            time_conditioning=cfg.time_conditioning, noise_removal=cfg.sampling.noise_removal,
            top_k=top_k, top_p=top_p, generator=generator,
            update=update, final=final, log_score=log_score,
        )  # fmt: skip
        return x, stats.as_dict(x.shape[0])

    return run


def _any_order(module, x_init, *, steps, fixz, generator, top_k, top_p, order):
    from sampling import samplers

    vocab = module.vocab
    x, stats = samplers.sample_any_order(
        denoiser(module), x_init,
        mask_id=vocab.mask_id, vocab_size=vocab.size, order=order,
        latent=latent_fn(module, generator, x_init.shape[1]), fixz=fixz,
        noise=module.spec.noise if module.cfg.time_conditioning else None,
        top_k=top_k, top_p=top_p, generator=generator,
    )  # fmt: skip
    return x, stats.as_dict(x.shape[0])


def _autoregressive(module, x_init, *, steps, fixz, generator, top_k, top_p, order=None):
    from sampling import samplers

    vocab, (num_samples, length) = module.vocab, x_init.shape
    x = samplers.sample_autoregressive(
        last_logits(module), num_samples, length,
        bos_id=vocab.bos_id, vocab_size=vocab.size, device=x_init.device, generator=generator,
        top_k=top_k, top_p=top_p, x_init=x_init, mask_id=vocab.mask_id,
    )  # fmt: skip
    return x, {"steps": length, "nfe_per_sequence": length - 1}


for _name, _cache, _latent in [
    ("vae", False, True), ("vae_cache", True, True),
    ("ddpm", False, False), ("ddpm_cache", True, False),
]:  # fmt: skip
    register(
        Predictor(
            _name, _masked(_cache), needs_latent=_latent, fixz=_latent, cached=_cache,
            summary=("VADD: z per chain (fixz) or per step" if _latent else "MDLM ancestral")
            + (", skipping rows with nothing to reveal" if _cache else ""),
        )
    )  # fmt: skip
# RADD's DiffusionSampler and SEDD's analytic predictor: with a latent (VADD) they draw
# z as `vae` does (fixz), without one they sample MDLM models; cached (per-row cache).
# sample_masked(cache=False) is the uncached run, with the same samples for a seed.
for _name, _update, _final, _summary in [
    ("tweedie", "tweedie", "sample",
     "RADD: exact reveal probability, the last step reveals the rest by sampling"),
    ("euler", "euler", "sample",
     "RADD: first-order reveal rate dt * w(t), the last step reveals the rest by sampling"),
    ("analytic", "analytic", "argmax",
     "SEDD: Tweedie tau-leaping through Algorithm.log_score, then noise removal"),
]:  # fmt: skip
    register(
        Predictor(_name, _masked(True, _update, _final), fixz=True, cached=True,
                  summary=_summary + ", skipping rows with nothing to reveal")
    )  # fmt: skip
register(
    Predictor(
        "any_order", _any_order, fixz=True, uses_steps=False,
        summary="one position per network call in sampling.order (RADD's any-order sampler)",
    )
)  # fmt: skip
register(Predictor("ar", _autoregressive, family="ar", summary="left-to-right decoding"))

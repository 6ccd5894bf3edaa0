"""Sampling from a trained module: wires the networks (EMA weights) to samplers.py."""

import contextlib

import torch

import samplers
from diffusion import Diffusion


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def latent_fn(module: Diffusion, generator: torch.Generator, length: int):
    """z ~ N(0, I): (n, d) per sequence, or (n, L, d) when model.latent1d=False."""
    m = module.cfg.model
    shape = (m.latent_dim,) if m.latent1d else (length, m.latent_dim)

    def draw(n: int) -> torch.Tensor:
        return torch.randn((n, *shape), generator=generator, device=module.device)

    return draw


@torch.no_grad()
def generate(
    module: Diffusion,
    *,
    num_samples: int,
    predictor: str,
    steps: int,
    fixz: bool = True,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    length: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Draw `num_samples` sequences; x_init (B, L) may fix tokens (mask id = free)."""
    length = length or module.cfg.model.length
    device, vocab = module.device, module.vocab
    was_training = module.training
    module.eval()
    ema = module.ema if (module.ema is not None and not module.cfg.eval.disable_ema) else None
    ctx = ema.swapped_in(module.trainable_parameters()) if ema else contextlib.nullcontext()
    try:
        with ctx, _autocast(device):
            if predictor == "ar":
                x = samplers.sample_autoregressive(
                    lambda prefix: module.backbone(prefix), num_samples, length,
                    bos_id=vocab.bos_id, vocab_size=vocab.size, device=device, generator=generator,
                )  # fmt: skip
                return x, {"steps": length, "nfe_per_sequence": length - 1}
            return _generate_masked(
                module, num_samples, predictor, steps, fixz, generator, x_init, length
            )
    finally:
        module.train(was_training)


def _generate_masked(module, num_samples, predictor, steps, fixz, generator, x_init, length):
    vocab, device = module.vocab, module.device
    if x_init is None:
        x_init = torch.full((num_samples, length), vocab.mask_id, dtype=torch.long, device=device)
    uses_z = module.loss_type == "vae"  # a VADD decoder sampled with ddpm gets a fresh z per step
    latent = latent_fn(module, generator, x_init.shape[1]) if uses_z else None

    def denoise(xt, sigma, z, out_mask):
        if z is None:
            return module.backbone(xt, sigma, out_mask=out_mask)
        return module.backbone(xt, sigma, z=z, out_mask=out_mask)

    x, stats = samplers.sample_masked(
        denoise, x_init,
        mask_id=vocab.mask_id, vocab_size=vocab.size, noise=module.spec.noise, steps=steps,
        eps=module.cfg.sampling.eps, latent=latent,
        fixz=bool(fixz) and predictor.startswith("vae"), cache=predictor.endswith("_cache"),
        time_conditioning=module.cfg.time_conditioning,
        noise_removal=module.cfg.sampling.noise_removal, generator=generator,
    )  # fmt: skip
    return x, stats.as_dict(x.shape[0])

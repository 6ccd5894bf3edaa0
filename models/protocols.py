"""What the rest of vadd needs from a network, written down once.

Algorithms build these (algorithms/), objectives and samplers call them, and
models.build_networks compiles their `.blocks`. A new backbone satisfies one of them;
tests/test_models.py checks the built-in networks against them.
"""

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Denoiser(Protocol):
    """p(x0 | xt[, z]): DIT (MDLM), GenDIT (VADD, reads z through `latent_map`), ToyMLP.

    forward(xt (B, L) ids, sigma (B,), z=None (B, d) or (B, L, d), key_mask=None (B, L)
    bool, out_mask=None (B, L) bool, fp32_logits=False) -> logits (B, L, V), or (N, V)
    for the N positions where out_mask is True, in row-major order (the loss and the
    samplers never build the whole (B, L, V) tensor). fp32_logits: the head runs in
    float32 under bf16 autocast (the samplers' draw). Parameter names follow MDLM's DiT
    (vocab_embed, sigma_map, blocks.i.*, output_layer.*) so MDLM checkpoints warm-start;
    a decoder that reads z keeps that path in `latent_map` (warm start leaves it
    initialised, freeze_decoder_steps trains it alone).
    """

    blocks: nn.ModuleList  # per-block torch.compile (models.compile_blocks)

    def forward(self, xt: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor: ...


@runtime_checkable
class Encoder(Protocol):
    """r(z | x0, xt): InferDIT, ToyEncoder.

    forward(x0 (B, L), visible (B, L) bool, sigma (B,), key_mask=None) -> (mu, log_sigma),
    each (B, d), or (B, L, d) for per-position latents; float32.
    """

    blocks: nn.ModuleList

    def forward(
        self, x0: torch.Tensor, visible: torch.Tensor, sigma: torch.Tensor, key_mask=None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class CausalLM(Protocol):
    """The AR baseline: forward(ids (B, L), out_mask=None, fp32_logits=False) -> next-token
    logits (B, L, V), or (N, V) under out_mask."""

    blocks: nn.ModuleList

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor: ...

"""The one place where networks are built (so torch.compile and precision wrap them once)."""

import torch
from omegaconf import DictConfig
from torch import nn

from models.toy_mlp import toy_networks


def build_networks(
    cfg: DictConfig, vocab_size: int, algorithm
) -> tuple[nn.Module, nn.Module | None]:
    """Return (backbone, encoder). `vocab_size` counts the [MASK] id (the last id).

    `algorithm` (an algorithms.Algorithm) says which networks it trains: MDLM's DIT, VADD's
    GenDIT + InferDIT, the AR baseline's causal transformer. model.type=toy_mlp builds the
    MLP pair of models/toy_mlp.py instead (2-token toy data), an encoder only when the
    algorithm has a latent.
    """
    if cfg.model.type == "toy_mlp":
        backbone, encoder = toy_networks(cfg, vocab_size, with_encoder=algorithm.uses_latent)
    else:
        backbone, encoder = algorithm.build_networks(vocab_size)
    if cfg.model.compile:
        compile_blocks(backbone)
        if encoder is not None:
            compile_blocks(encoder)
    return backbone, encoder


def compile_blocks(net: nn.Module) -> None:
    """Per-block torch.compile: small graphs compile fast and fuse AdaLN/gates/residuals."""
    for i, block in enumerate(net.blocks):
        # dynamic=None: static shapes first; a second shape (validation batch, the
        # sampler's cached row subsets) recompiles once with dynamic sizes, not per shape.
        net.blocks[i] = torch.compile(block, dynamic=None)


def count_parameters(net: nn.Module | None) -> int:
    return 0 if net is None else sum(p.numel() for p in net.parameters())

"""strategy=fsdp: FSDP2 (torch's `fully_shard`) through Lightning's ModelParallelStrategy.

One code path on CPU (gloo) and GPU (nccl); Lightning's FSDPStrategy (FSDP1) refuses CPU.
`Diffusion.configure_model` shards each network (the decoder `backbone`, and the VADD
`encoder`): every transformer block is one shard group, the rest of the network
(embeddings, time / latent maps, output layer) its root group, all sharded on dim 0 over
every process of every node. Parameters, gradients, AdamW states and EMA shadows are then
DTensor shards: `clip_grad_norm_` reduces the norm over the shards, and checkpoints are
gathered into one ordinary file on rank 0 (`save_distributed_checkpoint=False`), the format
of single-process and DDP runs, so every checkpoint tool reads it.

Validation gathers the (EMA) weights once and runs forward passes without collectives, so
ranks may run different numbers of evaluation batches; `reshard` frees them afterwards.
"""

import warnings
from collections.abc import Iterable

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

# InferDIT returns (mu, log_sigma) as two views of one tensor; nothing modifies them in
# place (objectives.vae_loss), which is what this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPInferDIT\) returned a view")


def fsdp_strategy() -> ModelParallelStrategy:
    """The Lightning strategy of strategy=fsdp (the sharding itself is `shard_networks`)."""
    return ModelParallelStrategy(save_distributed_checkpoint=False)


def is_fsdp(strategy: Strategy) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


def shard_networks(
    nets: Iterable[nn.Module], strategy: Strategy, reshard_after_forward: bool
) -> None:
    """fully_shard every block, then each network; a no-op on networks already sharded."""
    mesh = init_device_mesh(strategy.root_device.type, (strategy.world_size,))
    for net in nets:
        if isinstance(net, FSDPModule):  # configure_model runs once per trainer stage
            continue
        for block in getattr(net, "blocks", []):  # the toy MLPs have none
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(net, mesh=mesh, reshard_after_forward=reshard_after_forward)


def _fsdp_modules(nets: Iterable[nn.Module]) -> list[FSDPModule]:
    return [m for net in nets for m in net.modules() if isinstance(m, FSDPModule)]


def gather_for_eval(nets: Iterable[nn.Module]) -> None:
    """All-gather the full weights and keep them through every evaluation forward."""
    for m in _fsdp_modules(nets):
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()


def reshard(nets: Iterable[nn.Module], reshard_after_forward: bool) -> None:
    """Free the gathered weights: the registered parameters are the shards again."""
    for m in _fsdp_modules(nets):
        m.reshard()
        m.set_reshard_after_forward(reshard_after_forward, recurse=False)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it); else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t

"""Reading checkpoints for evaluation, with clear refusals instead of silent mismatches."""

import fsspec
import torch
from torch import nn

from errors import VaddError


class CheckpointError(VaddError, RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def read_checkpoint(path: str, key: str = "eval.checkpoint_path") -> dict:
    """torch.load through fsspec; missing, truncated or foreign files raise CheckpointError.

    A folder written by scripts/export.py reads as a checkpoint too (interchange.read_export).
    """
    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(p):
        raise CheckpointError(
            f"{key}={path} does not exist: pass the path of a .ckpt file or an exported folder"
        )
    if fs.isdir(p):
        import interchange  # imports this module

        return interchange.read_export(path)
    try:
        with fs.open(p, "rb") as f:
            ckpt = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle of something else, ...
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); "
            "it may be truncated by an interrupted copy: use another checkpoint"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a vadd/Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Refuse a state dict whose tensors do not fit the configured model, naming both shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        hint = (
            " (a model without encoder: set training.loss_type=mdlm?)"
            if any(k.startswith("encoder.") for k in missing)
            else ""
        )
        raise CheckpointError(
            f"{path} lacks {len(missing)} weights the config needs, e.g. {missing[0]}{hint}"
        )
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        hint = (
            " (a VADD checkpoint: set training.loss_type=vae?)"
            if any(k.startswith("encoder.") for k in unexpected)
            else ""
        )
        raise CheckpointError(
            f"{path} has {len(unexpected)} weights the config lacks, e.g. {unexpected[0]}{hint}"
        )
    for key, tensor in own.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in the model built from the config: the checkpoint was "
                "trained with another vocabulary or model size "
                "(check data=..., model=..., decoder=...)"
            )


def load_for_eval(module, ckpt: dict, path: str) -> None:
    """Load the weights (and EMA) of a checkpoint read by `read_checkpoint` into `module`."""
    saved_vocab = ckpt.get("vadd", {}).get("vocab")
    if saved_vocab and saved_vocab["size"] != module.vocab.size:
        raise CheckpointError(
            f"{path} was trained with a vocabulary of {saved_vocab['size']} tokens but data="
            f"{module.cfg.data.name} gives {module.vocab.size}: "
            "use the data/tokenizer it was trained with"
        )
    check_compatible(module, ckpt["state_dict"], path)
    _check_same_process(module.cfg, ckpt.get("vadd", {}).get("config"), path)
    module.load_state_dict(ckpt["state_dict"])
    if module.ema is not None and ckpt.get("exported_weights") == "EMA":
        # an exported folder holds the EMA as its weights: evaluate (and report) them as EMA
        module.ema.shadow = [p.detach().clone() for p in module.trainable_parameters()]
    elif module.ema is not None and "ema" not in ckpt:  # trained with training.ema=0
        print(f"[vadd] {path} has no EMA weights: evaluating its raw weights", flush=True)
        module.ema = None
    module.on_load_checkpoint(ckpt)


def _check_same_process(cfg, saved: dict | None, path: str) -> None:
    """The network's inputs depend on these keys: evaluating with other values is wrong."""
    if not saved:
        return
    current = {
        "time_conditioning": cfg.time_conditioning,
        **{f"noise.{k}": v for k, v in cfg.noise.items()},
    }
    before = {"time_conditioning": saved.get("time_conditioning")}
    before.update({f"noise.{k}": v for k, v in saved.get("noise", {}).items()})
    if cfg.training.loss_type == "vae" and "decoder" in saved:  # how r is read off the encoder
        current["decoder.fade_to_prior"] = bool(cfg.decoder.get("fade_to_prior", False))
        before["decoder.fade_to_prior"] = bool(saved["decoder"].get("fade_to_prior", False))
    for key, value in current.items():
        if key in before and before[key] != value:
            raise CheckpointError(
                f"{path} was trained with {key}={before[key]} but the config has {key}={value}: "
                f"set {key}={before[key]}"
            )

"""Writing checkpoints that cannot destroy a good file, and reading them for evaluation
with clear refusals instead of silent mismatches."""

import fsspec
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

import utils
from algorithms import algorithm_class
from checkpointing.folders import read_export
from errors import CheckpointError, VaddError, missing_path  # noqa: F401  (CheckpointError: re-exported)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint write (periodic, last, best, on exception) through
    utils.atomic_write: a temp file in the destination folder, fsync, rename. A kill or a
    full disk mid-save leaves the previous file byte-identical (Lightning's own atomic
    save stages in $TMPDIR, a plain copy when the run folder is on another filesystem)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        utils.atomic_write(str(path), lambda f: torch.save(checkpoint, f))


def read_checkpoint(path: str, key: str = "eval.checkpoint_path") -> dict:
    """torch.load through fsspec; missing, truncated or foreign files raise CheckpointError.

    A folder written by scripts/export.py reads as a checkpoint too (folders.read_export).
    """
    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(p):
        raise missing_path(key, path, CheckpointError)
    if fs.isdir(p):
        from checkpointing import foreign

        return foreign.as_checkpoint(p) if foreign.is_foreign(p) else read_export(path)
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


def check_compatible(
    model: nn.Module, state: dict[str, torch.Tensor], path: str, saved: dict | None = None
) -> None:
    """Refuse a state dict whose tensors do not fit the configured model, naming both
    shapes; `saved` (the checkpoint's config) turns the refusal into the keys to set."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        if missing:
            what = f"{path} lacks {len(missing)} weights the config needs, e.g. {missing[0]}"
            guess = " (a model without encoder: set training.loss_type=mdlm?)"
        else:
            what = f"{path} has {len(unexpected)} weights the config lacks, e.g. {unexpected[0]}"
            guess = " (a VADD checkpoint: set training.loss_type=vae?)"
        if not any(k.startswith("encoder.") for k in missing or unexpected):
            guess = ""
        raise CheckpointError(what + (_structure_fix(saved, getattr(model, "cfg", None)) or guess))
    for key, tensor in own.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in the model built from the config: the checkpoint was "
                "trained with another vocabulary or model size "
                "(check data=..., model=..., decoder=...)"
                + _structure_fix(saved, getattr(model, "cfg", None))
            )


# The keys that decide which networks exist and their shapes.
ARCHITECTURE = (
    "backbone", "parameterization", "training.loss_type", "model.hidden_size",
    "model.cond_dim", "model.n_heads", "model.n_blocks", "model.latent_dim",
    "model.latent1d", "model.latentMLP", "model.latent_struc", "decoder.hidden_size",
    "decoder.cond_dim", "decoder.n_heads", "decoder.n_blocks", "decoder.mask_struc",
)  # fmt: skip


def _structure_fix(saved: dict | None, cfg) -> str:
    """': it was trained with backbone=ar ...: set backbone=ar ...' for the architecture
    keys whose values differ, or '' when the checkpoint carries no config."""
    if not saved or cfg is None:
        return ""
    from omegaconf import OmegaConf

    current = OmegaConf.to_container(cfg, resolve=True)
    diffs = [
        (key, before, _lookup(current, key))
        for key in ARCHITECTURE
        if (before := _lookup(saved, key)) is not _MISSING and before != _lookup(current, key)
    ]
    if not diffs:
        return ""
    was = ", ".join(f"{k}={b}" for k, b, _ in diffs)
    now = ", ".join(f"{k}={n}" for k, _, n in diffs)
    add = " ".join(f"{k}={b}" for k, b, _ in diffs)
    return f": it was trained with {was} (the config has {now}): set {add}"


def load_for_eval(module, ckpt: dict, path: str) -> None:
    """Load the weights (and EMA) of a checkpoint read by `read_checkpoint` into `module`."""
    if "foreign" in ckpt:  # a RADD / SEDD folder: padded to this module's tables
        from checkpointing import foreign

        ckpt = foreign.for_eval(module, ckpt, path)
    saved_vocab = ckpt.get("vadd", {}).get("vocab")
    if saved_vocab and saved_vocab["size"] != module.vocab.size:
        raise CheckpointError(
            f"{path} was trained with a vocabulary of {saved_vocab['size']} tokens but data="
            f"{module.cfg.data.name} gives {module.vocab.size}: "
            "use the data/tokenizer it was trained with"
        )
    check_compatible(module, ckpt["state_dict"], path, ckpt.get("vadd", {}).get("config"))
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
    if algorithm_class(cfg).uses_latent and "decoder" in saved:  # how r is read off r's head
        current["decoder.fade_to_prior"] = bool(cfg.decoder.fade_to_prior)
        before["decoder.fade_to_prior"] = bool(saved["decoder"].get("fade_to_prior", False))
    for key, value in current.items():
        if key in before and before[key] != value:
            raise CheckpointError(
                f"{path} was trained with {key}={before[key]} but the config has {key}={value}: "
                f"set {key}={before[key]}"
            )


# What a resumed run must share with its checkpoint: with other values the weights would
# not fit or would mean something else. (Optimiser and schedule values may change on a
# resume: Diffusion.on_train_start applies the config's over the restored state.)
RESUME_STRUCTURE = (
    "backbone", "parameterization", "diffusion", "time_conditioning", "T", "training.loss_type",
    "model.type", "model.hidden_size", "model.cond_dim", "model.n_heads", "model.n_blocks",
    "model.length", "model.latent_dim", "model.latent1d", "model.latentMLP",
    "model.latent_struc", "decoder.hidden_size", "decoder.cond_dim", "decoder.n_heads",
    "decoder.n_blocks", "decoder.mask_struc", "decoder.fade_to_prior", "data.name",
    "data.tokenizer_name_or_path", "seed",  # seed: the order rows are read in
    "keep_frame",  # which tokens are diffused and counted: another objective
)  # fmt: skip


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


_MISSING = object()


def check_resume(cfg, vocab_size: int, path: str) -> None:
    """Refuse, before anything is written, a resume whose structure differs from the
    checkpoint's, naming every difference with both values. The checkpoint is
    memory-mapped: its tensors are not read."""
    from omegaconf import OmegaConf

    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise CheckpointError(
            f"checkpointing.resume_ckpt_path={path} is not a readable checkpoint "
            f"({type(err).__name__}); it may be truncated: resume from another checkpoint"
        ) from err
    meta = ckpt.get("vadd") if isinstance(ckpt, dict) else None
    if not meta or "config" not in meta:
        return  # not one of ours (e.g. Lightning's own): Lightning's checks apply
    saved, current = meta["config"], OmegaConf.to_container(cfg, resolve=True)
    diffs = []
    for key in RESUME_STRUCTURE:
        before, now = _lookup(saved, key), _lookup(current, key)
        if before is not _MISSING and now is not _MISSING and before != now:
            diffs.append(f"{key}={before} in the checkpoint, {now} now")
    saved_vocab = meta.get("vocab", {}).get("size")
    if saved_vocab is not None and saved_vocab != vocab_size:
        diffs.append(f"vocabulary {saved_vocab} tokens in the checkpoint, {vocab_size} now")
    before, now = (
        _lookup(saved, "optim.encoder_lr_scale"),
        _lookup(current, "optim.encoder_lr_scale"),
    )
    if (
        algorithm_class(cfg).uses_latent
        and before is not _MISSING
        and (before == 1.0) != (now == 1.0)
    ):
        diffs.append(  # one AdamW parameter group at 1, two otherwise
            f"optim.encoder_lr_scale={before} in the checkpoint, {now} now (the optimiser "
            "state has another number of parameter groups)"
        )
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: " + "; ".join(diffs) + ". Set the checkpoint's "
            "values, or start a new run (another checkpointing.save_dir, or "
            "checkpointing.resume_from_ckpt=False; model.init_from=<ckpt> to warm-start)"
        )

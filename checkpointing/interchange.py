"""Interchange: warm-start from MDLM checkpoints; export and import Hugging Face-style folders.

Weights come from
- a Lightning `.ckpt` (MDLM's or ours): `state_dict` with `backbone.` (and for VADD
  `encoder.`) prefixes, and an `ema` entry whose `shadow_params` list follows the order of
  the parameters in `state_dict` (then the noise schedule's, none for loglinear);
- a folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`): MDLM's
  Hugging Face export, or one written by `scripts/export.py` (`format: vadd`);
- a RADD or SEDD hub folder or run dir (checkpointing/foreign.py).

Names are MDLM's (models/dit.py keeps them), so the mapping is one to one. The only
reshaping is the vocabulary: the embedding table and the output projection may carry
padding rows beyond the real vocabulary (real tokens + [MASK]); the real rows are copied
and the padding rows zero-filled, and only a different real vocabulary is refused.
"""

import os
from dataclasses import dataclass

import fsspec
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import utils
from checkpointing import foreign, hf_export
from checkpointing.checkpoints import read_checkpoint
from checkpointing.folders import FORMAT_VERSION, read_folder_weights, read_json
from data.tokenization import GRID_KEY
from errors import CheckpointError, missing_path
from models.ema import ExponentialMovingAverage

NETWORKS = ("backbone.", "encoder.")
BUFFER_SUFFIXES = ("inv_freq", "cos_cached", "sin_cached")  # rotary caches: recomputed
LATENT = "backbone.latent_map."  # GenDIT's latent path g(z); the rest of GenDIT is the trunk


@dataclass
class Source:
    """Weights read from a checkpoint or folder, with the names of the vadd modules."""

    tensors: dict[str, torch.Tensor]  # "backbone.*" / "encoder.*" -> tensor
    weights: str  # "EMA" or "raw": what `tensors` are
    model_size: int | None  # real vocabulary + [MASK] of the source, when it says
    config: dict | None  # the vadd config of the source, when it is ours
    kind: str | None = None  # "radd" / "sedd": a RADD or SEDD folder (checkpointing/foreign.py)


# ---------------------------------------------------------------- reading weights
def read_source(path: str, use_ema: bool) -> Source:
    """The weights of a `.ckpt` or a folder, EMA or raw (a folder holds one set)."""
    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(p):
        raise missing_path("model.init_from", path, CheckpointError)
    if fs.isdir(p) and foreign.is_foreign(p):  # RADD's / SEDD's hub folder or run dir
        theirs, tensors, weights = foreign.warm_start_weights(p, use_ema)
        return Source(tensors, weights, theirs.tokens + 1, theirs.config, theirs.kind)
    if fs.isdir(p):
        return _read_folder_source(path)
    ckpt = read_checkpoint(path, key="model.init_from")
    state = _network_tensors(ckpt["state_dict"])
    weights = "raw"
    if use_ema and ckpt.get("ema"):
        state, weights = ema_tensors(state, ckpt["ema"], path), "EMA"
    elif use_ema:
        utils.print0(f"[vadd] {path} has no EMA weights: warm-starting from its raw weights")
    vadd = ckpt.get("vadd", {})
    size = vadd["vocab"]["size"] + 1 if vadd.get("vocab") else None
    return Source(state, weights, size, vadd.get("config"))


def _network_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`backbone.*` / `encoder.*` entries (bare DiT names get `backbone.`), in stored order,
    without rotary caches and `torch.compile`'s `_orig_mod.` infix."""
    if not any(k.startswith(NETWORKS) for k in state) and "vocab_embed.embedding" in state:
        state = {f"backbone.{k}": v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if key.startswith(NETWORKS) and not key.endswith(BUFFER_SUFFIXES):
            out[key.replace("_orig_mod.", "")] = value
    return out


def ema_tensors(state: dict[str, torch.Tensor], ema: dict, path: str) -> dict[str, torch.Tensor]:
    """Name MDLM-style EMA shadows: `shadow_params` follows the parameters' order in
    `state` (extra trailing tensors, e.g. a learned noise schedule's, are ignored)."""
    shadow = ema["shadow_params"]
    if len(shadow) < len(state):
        raise CheckpointError(
            f"{path}: its EMA holds {len(shadow)} tensors but its state_dict {len(state)} "
            "network weights: use model.init_from_ema=False to load the raw weights"
        )
    named = {}
    for (key, value), avg in zip(state.items(), shadow, strict=False):
        if avg.shape != value.shape:
            raise CheckpointError(
                f"{path}: EMA tensor for {key} has shape {tuple(avg.shape)} but the weight "
                f"{tuple(value.shape)}: the EMA list is not in state_dict order; "
                "use model.init_from_ema=False"
            )
        named[key] = avg.detach().to(value.dtype)
    return named


def _read_folder_source(path: str) -> Source:
    config = read_json(os.path.join(path, "config.json"), path)
    state = _network_tensors(read_folder_weights(path))
    if config.get("format") == "vadd":
        size = config["vocab"]["size"] + 1
        return Source(state, config.get("weights", "raw"), size, config.get("config"))
    return Source(state, "as saved in the folder", None, None)  # e.g. MDLM's Hugging Face export


# ---------------------------------------------------------------- warm start
def warm_start(module, path: str, use_ema: bool) -> int:
    """Load `path` into the module's networks before training; returns the tensors loaded.

    GenDIT's latent path (`latent_map`) and the encoder keep their initialisation unless
    the source has them; latent_map's output layer is then zeroed, so the warm-started
    GenDIT equals the loaded MDLM for every z. The EMA restarts from the loaded weights.
    """
    source = read_source(path, use_ema)
    if source.kind:
        foreign.check_warm_start(module.cfg, source.kind, path)
    _check_time_conditioning(module.cfg, source.config, path)
    own = dict(module.named_parameters())
    own = {k.replace("_orig_mod.", ""): v for k, v in own.items()}
    _check_fits(own, source, module.vocab.model_size, path)
    _copy_into(own, source.tensors, module.vocab.model_size)
    note = _kept_note(own, source.tensors)
    if not any(k.startswith(LATENT) for k in source.tensors) and _zero_latent_output(module):
        note += " (latent_map's output layer zeroed: GenDIT = the loaded model for every z)"
    if module.ema is not None:
        module.ema = ExponentialMovingAverage(module.trainable_parameters(), module.ema.decay)
    utils.print0(
        f"[vadd] warm start from {path}: loaded {len(source.tensors)} tensors "
        f"({source.weights} weights); {note}"
    )
    return len(source.tensors)


def _check_fits(own: dict, source: Source, model_size: int, path: str) -> None:
    """Refuse unknown weights, missing trunk weights and shapes that do not fit."""
    unknown = [k for k in source.tensors if k not in own]
    if unknown:
        vadd = any(k.startswith(("encoder.", LATENT)) for k in unknown)
        hint = " (a VADD checkpoint: set training.loss_type=vae?)" if vadd else ""
        raise CheckpointError(
            f"model.init_from={path} has {len(unknown)} weights the model lacks, "
            f"e.g. {unknown[0]}{hint}"
        )
    trunk = [k for k in own if k.startswith("backbone.") and not k.startswith(LATENT)]
    missing = [k for k in trunk if k not in source.tensors]
    if missing:
        raise CheckpointError(
            f"model.init_from={path} lacks {len(missing)} decoder weights, e.g. {missing[0]}: "
            "it is not an MDLM/vadd DiT checkpoint of this architecture"
        )
    src_size = source.model_size
    for key, tensor in source.tensors.items():
        want = own[key].shape
        if _vocab_rows(key):  # compare the real vocabulary, not the padding
            rows = src_size or tensor.shape[0]
            got, want = (rows, *tensor.shape[1:]), (model_size, *want[1:])
            ok = got == want and tensor.shape[0] >= rows
        else:
            got, ok = tuple(tensor.shape), tensor.shape == want
        if not ok:
            raise CheckpointError(
                f"model.init_from={path}: {key} has shape {tuple(got)} in the checkpoint but "
                f"{tuple(want)} in the model built from the config: the checkpoint was trained "
                "with another vocabulary or model size (check data=..., model=..., decoder=...)"
            )


def _vocab_rows(key: str) -> bool:
    """Tensors with one row per token id (possibly padded past the real vocabulary)."""
    return key.endswith("vocab_embed.embedding") or key.startswith("backbone.output_layer.linear.")


def _check_time_conditioning(cfg: DictConfig, source_cfg: dict | None, path: str) -> None:
    before = (source_cfg or {}).get("time_conditioning")
    if before is not None and before != cfg.time_conditioning:
        raise CheckpointError(
            f"model.init_from={path} was trained with time_conditioning={before} but the "
            f"config has time_conditioning={cfg.time_conditioning}: set time_conditioning={before}"
        )


@torch.no_grad()
def _copy_into(own: dict[str, nn.Parameter], tensors: dict, model_size: int) -> None:
    for key, tensor in tensors.items():
        target = own[key]
        if _vocab_rows(key):
            target.zero_()  # padding rows (>= model_size) stay zero
            target[:model_size].copy_(tensor[:model_size])
        else:
            target.copy_(tensor)


@torch.no_grad()
def _zero_latent_output(module) -> bool:
    """g(z)'s last Linear -> 0: c = SiLU(emb(sigma)) + 0, the loaded MDLM's conditioning.
    False when there is none (an MDLM model, or latentMLP=False: g is the identity)."""
    latent_map = getattr(module.backbone, "latent_map", None)
    linears = [m for m in latent_map.modules() if isinstance(m, nn.Linear)] if latent_map else []
    if linears:
        nn.init.zeros_(linears[-1].weight)
        nn.init.zeros_(linears[-1].bias)
    return bool(linears)


def _kept_note(own: dict, loaded: dict) -> str:
    def part(key: str) -> str:  # "backbone.latent_map", or "encoder" as a whole
        return "encoder" if key.startswith("encoder.") else ".".join(key.split(".")[:2])

    kept = sorted({part(k) for k in own if k not in loaded})
    if not kept:
        return "every weight came from it"
    return "kept at initialisation: " + ", ".join(kept)


def trunk_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    """GenDIT's decoder trunk: every parameter except the latent path `latent_map`."""
    return [
        p
        for name, p in backbone.named_parameters()
        if not name.replace("_orig_mod.", "").startswith("latent_map.")
    ]


# ---------------------------------------------------------------- export / import
def export_folder(ckpt_path: str, out: str, raw: bool = False) -> dict:
    """Write a vadd checkpoint as config.json + model.safetensors + tokenizer + README.md."""
    from safetensors.torch import save

    ckpt = read_checkpoint(ckpt_path)
    vadd = ckpt.get("vadd")
    if not vadd or "foreign" in ckpt:  # a RADD / SEDD folder is read where it is
        raise CheckpointError(f"{ckpt_path} is not a vadd checkpoint (no 'vadd' entry)")
    state = _network_tensors(ckpt["state_dict"])
    weights = "raw"
    if not raw and ckpt.get("ema"):
        state, weights = ema_tensors(state, ckpt["ema"], ckpt_path), "EMA"
    os.makedirs(out, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    blob = save(tensors, metadata={"format": "pt"})  # each file is whole or absent
    utils.atomic_write(os.path.join(out, "model.safetensors"), lambda f: f.write(blob))
    run = OmegaConf.create(vadd["config"])
    size = int(vadd["vocab"]["size"])
    tokenizer = _write_tokenizer(out, vadd.get("tokenizer"), size, int(run.model.length))
    hf = hf_export.transformers_keys(run, size + 1)
    if hf:
        hf_export.write_model_code(out)
    config = {
        "format": "vadd",
        "format_version": FORMAT_VERSION,
        "weights": weights,
        "global_step": int(ckpt.get("global_step", 0)),
        "vocab": {**vadd["vocab"], "model_size": size + 1},
        "tokenizer": tokenizer,
        "parameters": {k: list(v.shape) for k, v in tensors.items()},
        "config": vadd["config"],
        **hf,
    }
    utils.write_json(os.path.join(out, "config.json"), config)
    hf_export.write_model_card(out, config, sum(v.numel() for v in tensors.values()))
    return config


def _write_tokenizer(out: str, state: dict | None, vocab_size: int, length: int) -> dict | None:
    """A text tokenizer through save_pretrained, with its mask token (hf_export); the grid
    data's id tokenizer as its one-line tokenizer.json."""
    if state is None:
        return None
    if state["json"].startswith(f'{{"{GRID_KEY}"'):
        utils.write_text(os.path.join(out, "tokenizer.json"), state["json"])
    else:
        mask = hf_export.save_tokenizer(out, state, vocab_size, length)
        return {**{k: state[k] for k in ("name", "specials", "fingerprint")}, "mask_token": mask}
    return {k: state[k] for k in ("name", "specials", "fingerprint")}

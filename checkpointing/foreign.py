"""RADD's and SEDD's folders as warm starts (model.init_from) and evaluated models
(eval.checkpoint_path), in the two forms their load_model.py reads: a hub folder
(PyTorchModelHubMixin: config.json = their Hydra config, or `{"config": {...}}`, and
model.safetensors or pytorch_model.bin: one set of weights, evaluated as the EMA like our
exported folders), or a run dir (.hydra/config.yaml, checkpoints-meta/checkpoint.pth with
'model' and 'ema', whose shadow_params follow model.parameters()).

Detection: the config (config.json, else .hydra/config.yaml) has an integer `tokens` and
a `model` with a `type`: ddit_wot is RADD's time-free net (backbone=radd), ddit SEDD's DiT
(backbone=dit, parameterization=sedd, time_conditioning=True). Ours (`format: vadd`, run
dirs) and MDLM's folders have no `tokens`: read as before. Their parameter names are ours
(models/radd.py, models/dit.py) under `backbone.`; rotary buffers are dropped, the token
rows ([MASK] = `tokens`, the last) fill our padded tables (padding rows zero).
"""

import json
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from checkpointing.folders import read_folder_weights
from errors import CheckpointError, VaddError

KINDS = {"ddit_wot": "radd", "ddit": "sedd"}  # their model.type -> which network
RUN_CONFIG = os.path.join(".hydra", "config.yaml")
RUN_WEIGHTS = os.path.join("checkpoints-meta", "checkpoint.pth")
GPT2_TOKENS = 50257  # both papers' models: GPT-2's tokenizer, [MASK] = 50257
RADD_LOSSES = ("t_DCE", "lambda_DCE", "k_DCE", "t_DSE")  # vadd's loss_type takes these
BUFFERS = ("inv_freq", "cos_cached", "sin_cached")
# Their (= our) parameter names: in each block, then outside the blocks.
_BLOCK = "attn_qkv.weight attn_out.weight mlp.0.weight mlp.0.bias mlp.2.weight mlp.2.bias "
_TOP = "vocab_embed.embedding output_layer.norm_final.weight output_layer.linear.weight "
NAMES = {
    "radd": (_BLOCK + "norm1.weight norm1.bias norm2.weight norm2.bias",
             _TOP + "output_layer.linear.bias output_layer.norm_final.bias"),
    "sedd": (_BLOCK + "norm1.weight norm2.weight adaLN_modulation.weight adaLN_modulation.bias",
             _TOP + "output_layer.linear.bias output_layer.adaLN_modulation.weight "
             "output_layer.adaLN_modulation.bias sigma_map.mlp.0.weight sigma_map.mlp.0.bias "
             "sigma_map.mlp.2.weight sigma_map.mlp.2.bias"),
}  # fmt: skip


@dataclass
class Foreign:
    kind: str  # "radd" | "sedd"
    config: dict  # the vadd config keys theirs decides (architecture.py adopts them)
    tokens: int  # real tokens; [MASK] is id `tokens`
    raw: dict[str, torch.Tensor]  # backbone.* -> the saved weights, their row count
    ema_state: dict | None  # a run dir's EMA state; None for a hub folder
    run_dir: bool


def their_config(path: str) -> dict | None:
    """Their config when `path` is a RADD / SEDD folder, else None. Raises nothing: other
    folders (a damaged config.json included) keep the errors of their own reader."""
    json_file, yaml_file = os.path.join(path, "config.json"), os.path.join(path, RUN_CONFIG)
    try:
        if os.path.isfile(json_file):
            config = json.loads(Path(json_file).read_text(encoding="utf-8"))
        elif os.path.isfile(yaml_file):
            config = OmegaConf.to_container(OmegaConf.load(yaml_file), resolve=False)
        else:
            return None
    except Exception:  # noqa: BLE001  (not ours to judge: the folder's own reader will)
        return None
    if isinstance(config, dict) and "model" not in config:
        config = config.get("config")  # save_pretrained(config=...) of an older mixin
    if not isinstance(config, dict) or config.get("format") == "vadd":
        return None
    ok = isinstance(config.get("tokens"), int) and "type" in (config.get("model") or {})
    return config if ok else None


def is_foreign(path: str) -> bool:
    return os.path.isdir(path) and their_config(path) is not None


def vadd_config(kind: str, theirs: dict, path: str) -> dict:
    """backbone, parameterization, time_conditioning, loss, model sizes and noise."""
    m = theirs["model"]
    if not all(isinstance(m.get(k), int) for k in ("hidden_size", "n_heads", "n_blocks")):
        raise CheckpointError(f"{path}: its {kind.upper()} config lacks integer model sizes")
    model = {
        "name": str(m.get("name", kind)), "type": "ddit", "hidden_size": m["hidden_size"],
        "cond_dim": int(m.get("cond_dim", 128)), "n_heads": m["n_heads"],
        "n_blocks": m["n_blocks"], "length": int(m.get("length", 1024)),
        "dropout": float(m.get("dropout", 0.0)),
    }  # fmt: skip
    loss = (theirs.get("training") or {}).get("loss_type")  # RADD's: the same conditional
    top = {"backbone": "radd", "parameterization": "subs", "time_conditioning": False}
    loss = loss if loss in RADD_LOSSES else "t_DCE"
    graph = (theirs.get("graph") or {}).get("type", "absorb")
    if kind == "sedd" and (graph != "absorb" or not m.get("scale_by_sigma", True)):
        raise CheckpointError(
            f"{path} is a SEDD model with graph.type={graph}, model.scale_by_sigma="
            f"{m.get('scale_by_sigma', True)}: vadd runs absorbing ([MASK]) diffusion only, "
            "so only graph.type=absorb SEDD models (scale_by_sigma=True) load"
        )
    if kind == "sedd":
        top = {"backbone": "dit", "parameterization": "sedd", "time_conditioning": True}
        loss = "t_DSE"
    noise = theirs.get("noise") or {}
    if noise.get("type", "loglinear") == "loglinear":  # their LogLinearNoise(): eps 1e-3
        noise = {"type": "loglinear", "eps": 1e-3}
    elif noise["type"] == "geometric":  # sigma_min^(1-t) sigma_max^t, as ours
        noise = {k: float(noise[k]) for k in ("sigma_min", "sigma_max")} | {"type": "geometric"}
    else:
        raise CheckpointError(f"{path}: noise.type={noise['type']}: vadd reads loglinear/geometric")
    return {**top, "training": {"loss_type": loss}, "model": model, "noise": noise}


def read(path: str) -> Foreign:
    """Config and weights of a RADD / SEDD folder (is_foreign(path) holds)."""
    theirs = their_config(path)
    kind = KINDS.get(str(theirs["model"]["type"]))
    if kind is None:
        what = f"model.type={theirs['model']['type']}"
        raise CheckpointError(f"{path}: {what}: vadd reads RADD's (ddit_wot) and SEDD's (ddit)")
    config, hub = vadd_config(kind, theirs, path), os.path.isfile(os.path.join(path, "config.json"))
    files = ("model.safetensors", "pytorch_model.bin") if hub else (RUN_WEIGHTS,)
    if not any(os.path.isfile(os.path.join(path, file)) for file in files):
        raise CheckpointError(
            f"{path} has a {kind.upper()} config but no {' or '.join(files)}: copy (or "
            "download) the whole folder"
        )
    file = os.path.join(path, RUN_WEIGHTS)
    try:
        weights = read_folder_weights(path) if hub else None  # refuses a damaged file itself
        state = {"model": weights} if hub else torch.load(file, "cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # truncated zip, another pickle, ...
        raise CheckpointError(
            f"{file} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "it may be truncated by an interrupted copy: copy the run again"
        ) from err
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{file} holds no 'model' state_dict: not a RADD/SEDD checkpoint")
    raw = _ours(state["model"], path, kind, config["model"]["n_blocks"])
    return Foreign(kind, config, theirs["tokens"], raw, state.get("ema"), not hub)


def _ours(state: dict, path: str, kind: str, blocks: int) -> dict[str, torch.Tensor]:
    """Their state_dict under our names (`backbone.` + theirs, in their order), rotary
    buffers dropped; anything but exactly their network's weights is refused."""
    plain = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}
    theirs = {k: v for k, v in plain.items() if not k.endswith(BUFFERS)}  # (DDP, compile)
    block, top = (names.split() for names in NAMES[kind])
    want = {*top} | {f"blocks.{i}.{name}" for i in range(blocks) for name in block}
    missing, extra = sorted(want - set(theirs)), sorted(set(theirs) - want)
    if missing or extra:
        raise CheckpointError(
            f"{path}: its weights are not the {kind.upper()} network of {blocks} blocks its "
            f"config describes: they {f'lack {missing[0]}' if missing else f'have {extra[0]}'} "
            f"({len(missing)} missing, {len(extra)} unknown)"
        )
    return {f"backbone.{k}": v for k, v in theirs.items()}


def ema_weights(f: Foreign, path: str) -> dict[str, torch.Tensor]:
    """Name a run dir's EMA shadows: they follow the parameters, i.e. `raw` in order."""
    shadow = list((f.ema_state or {}).get("shadow_params") or [])
    if [tuple(s.shape) for s in shadow] != [tuple(v.shape) for v in f.raw.values()]:
        raise CheckpointError(
            f"{path}: its EMA ({len(shadow)} tensors) does not follow its {len(f.raw)} model "
            "weights: use model.init_from_ema=False (eval.disable_ema=True) for the raw weights"
        )
    return {k: s.detach().to(v.dtype) for (k, v), s in zip(f.raw.items(), shadow, strict=True)}


# ---------------------------------------------------------------- the two ways in
def warm_start_weights(path: str, use_ema: bool) -> tuple[Foreign, dict, str]:
    """(folder, tensors to load, what they are) for model.init_from."""
    f = read(path)
    if not f.run_dir:
        return f, f.raw, "as saved in the folder"
    if use_ema and f.ema_state:
        return f, ema_weights(f, path), "EMA"
    return f, f.raw, "raw"  # (a run dir without EMA too: warm_start's line says "raw")


def check_warm_start(cfg, kind: str, path: str) -> None:  # which network the weights fit
    from algorithms import algorithm_class

    want = "radd" if kind == "radd" else "dit"
    if cfg.backbone != want:
        raise CheckpointError(
            f"model.init_from={path} is a {kind.upper()} model (backbone={want}) but the "
            f"config has backbone={cfg.backbone}: set backbone={want}"
        )
    if kind == "radd" and algorithm_class(cfg).uses_latent:
        raise CheckpointError(
            f"model.init_from={path} is a RADD model, whose blocks have no AdaLN to read z: "
            "VADD's decoder cannot start from it; use training.loss_type=t_DCE (or another)"
        )


def as_checkpoint(path: str) -> dict:
    """A checkpoint dict for evaluation: their config as the saved vadd config (adopted
    over the command line's defaults), GPT-2's tokenizer for a GPT-2 vocabulary (None: the
    data's). `for_eval` makes it what load_for_eval loads, once the module exists."""
    f = read(path)
    vadd = {"config": f.config, "vocab": {"size": f.tokens}, "tokenizer": None}
    if f.tokens == GPT2_TOKENS:  # built offline; if it cannot be, for_eval checks the data's
        from data.tokenization import get_tokenizer, tokenizer_state

        with suppress(VaddError, OSError, RuntimeError, ValueError):
            tok = get_tokenizer(OmegaConf.create({"tokenizer_name_or_path": "gpt2"}))
            vadd["tokenizer"] = tokenizer_state(tok) if len(tok) == f.tokens else None
    return {"state_dict": f.raw, "foreign": f, "vadd": vadd}


def for_eval(module, ckpt: dict, path: str) -> dict:
    """The weights padded to the module's tables; a run dir's EMA as the module's EMA
    state, a hub folder's one set as its EMA too (as an exported folder's)."""
    f: Foreign = ckpt["foreign"]
    if module.vocab.size != f.tokens:
        gpt2 = "gpt2 (or a local folder with GPT-2's tokenizer)"
        raise CheckpointError(
            f"{path} is a {f.kind.upper()} model of {f.tokens} tokens (+ [MASK]) but the "
            f"tokenizer gives {module.vocab.size}: pass data.tokenizer_name_or_path="
            + (gpt2 if f.tokens == GPT2_TOKENS else "<the tokenizer it was trained with>")
        )
    own = module.state_dict()
    out = {k: v for k, v in ckpt.items() if k != "foreign"}
    out["state_dict"] = _padded(f.raw, own)
    if not f.run_dir:
        out["exported_weights"] = "EMA"
    elif f.ema_state and module.ema is not None and module.encoder is None:
        ema = _padded(ema_weights(f, path), own)
        names = [f"backbone.{n}" for n, p in module.backbone.named_parameters() if p.requires_grad]
        if all(n in ema and ema[n].shape == own[n].shape for n in names):  # else: refused next
            out["ema"] = {**f.ema_state, "shadow_params": [ema[n] for n in names]}
    return out


def _padded(tensors: dict, own: dict) -> dict:
    """Token-row tensors zero-padded to the module's rows (round_up(tokens + 1, ...))."""
    out = {}
    for key, t in tensors.items():
        want = own.get(key)
        rows = key.endswith("vocab_embed.embedding") or ".output_layer.linear." in key
        if rows and want is not None and len(t) < len(want) and t.shape[1:] == want.shape[1:]:
            t = torch.cat([t, t.new_zeros((len(want) - len(t), *t.shape[1:]))])
        out[key] = t
    return out

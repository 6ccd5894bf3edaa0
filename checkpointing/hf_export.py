"""What makes an exported folder load with `transformers` (trust_remote_code, offline).

config.json gets `model_type`, `architectures` and `auto_map` beside vadd's own keys; the
folder gets models/modeling_vadd.py with the two files it imports (models/dit.py and
models/attention.py: the networks themselves, copied, not rewritten); the tokenizer is
written by `save_pretrained` with its mask token, the [MASK] id V of the models.

Our own reader (folders.read_export) drops that mask token again, so evaluation tokenises
with exactly the tokenizer the run was trained with.
"""

import json
import os
import tempfile

from omegaconf import DictConfig, OmegaConf

import utils
from algorithms import algorithm_class
from errors import CheckpointError

MASK_TOKEN = "[MASK]"
SPARE_MASK_TOKEN = "<|vadd_mask|>"  # when the vocabulary already has a "[MASK]" of its own
MODEL_FILES = ("modeling_vadd.py", "dit.py", "attention.py")  # from models/
MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def transformers_keys(cfg: DictConfig, model_size: int) -> dict:
    """config.json keys for AutoConfig / AutoModelForMaskedLM; {} for models that
    modeling_vadd.py does not build (the AR baseline, the toy MLP)."""
    name = algorithm_class(cfg).transformers_class
    m = cfg.model
    if name is None or m.get("type", "ddit") != "ddit" or cfg.data.get("kind", "text") != "text":
        return {}  # (older runs lack type / kind: DiTs on text then)
    if cfg.get("backbone", "dit") != "dit":  # modeling_vadd.py builds the DiT only
        return {}
    if "gelu" not in m or "vocab_multiple" not in m:  # saved before those keys existed
        return {}
    return {
        "model_type": "vadd",
        "architectures": [name],
        "auto_map": {
            "AutoConfig": "modeling_vadd.VaddConfig",
            "AutoModel": f"modeling_vadd.{name}",
            "AutoModelForMaskedLM": f"modeling_vadd.{name}",
        },
        "vocab_size": model_size,
    }


def write_model_code(out: str) -> None:
    """Copy the modelling files beside the weights (each written atomically)."""
    for name in MODEL_FILES:
        with open(os.path.join(MODELS_DIR, name), encoding="utf-8") as f:
            utils.write_text(os.path.join(out, name), f.read())


def save_tokenizer(out: str, state: dict, vocab_size: int, length: int) -> str:
    """tokenizer.json + tokenizer_config.json through save_pretrained, with a mask token
    at id `vocab_size` (the models' [MASK] id); files replaced atomically. Returns the
    mask token's text: "[MASK]", or SPARE_MASK_TOKEN when the vocabulary has its own
    "[MASK]" (BERT's, id 103: not the models' [MASK])."""
    from data.tokenization import tokenizer_from_state

    tokenizer = tokenizer_from_state(state)
    vocab = tokenizer.get_vocab()
    mask = next(t for t in (MASK_TOKEN, SPARE_MASK_TOKEN) if t not in vocab)
    tokenizer.add_special_tokens({"mask_token": mask})
    if tokenizer.mask_token_id != vocab_size:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer) - 1} tokens, not the models' {vocab_size}: "
            "export cannot put its mask token at the models' [MASK] id"
        )
    tokenizer.model_max_length = length  # the models' fixed sequence length
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                data = f.read()
            utils.atomic_write(os.path.join(out, name), lambda f, d=data: f.write(d))
    return mask


def without_mask_token(tokenizer_json: str, vocab_size: int) -> str:
    """An exported tokenizer.json minus the mask token save_tokenizer added (the special
    token at id V): the tokenizer the run was trained with (its fingerprint matches)."""
    tree = json.loads(tokenizer_json)
    added = tree.get("added_tokens") or []
    kept = [t for t in added if not (t["id"] == vocab_size and t.get("special"))]
    if len(kept) == len(added):
        return tokenizer_json
    tree["added_tokens"] = kept
    return json.dumps(tree, ensure_ascii=False)


def write_model_card(out: str, config: dict, num_params: int) -> None:
    """README.md of the folder: what it holds and the calls that load it."""
    cfg, m = config["config"], config["config"]["model"]
    lines = [
        f"# {algorithm_class(OmegaConf.create(cfg)).label}",
        "",
        f"Exported by vadd `scripts/export.py` (format version {config['format_version']}).",
        "",
        f"- weights: {config['weights']}, after {config['global_step']} optimiser steps",
        f"- parameters: {num_params:,}; hidden {m['hidden_size']}, {m['n_blocks']} blocks, "
        + (f"{m['n_heads']} heads, " if "n_heads" in m else "")  # the toy MLP has none
        + f"length {m['length']}",
        f"- data: {cfg['data']['name']}; vocabulary {config['vocab']['size']} tokens + [MASK]",
        f"- tokenizer: {(config['tokenizer'] or {}).get('name', 'from the data config')}",
        "",
        "Evaluate with the vadd code:",
        "",
        "```bash",
        f"python main.py mode=ppl_eval eval.checkpoint_path={os.path.abspath(out)} <overrides>",
        "```",
    ]
    if "auto_map" in config:
        lines += [
            "",
            "Load with transformers (offline; the modelling code is in this folder):",
            "",
            "```python",
            "from transformers import AutoModelForMaskedLM, AutoTokenizer",
            "model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)",
            "tokenizer = AutoTokenizer.from_pretrained(folder)  # mask_token = [MASK]",
            "log_probs = model(input_ids, z=z).logits  # SUBS log p(x0 | xt, z), (B, L, V+1)",
            "```",
            "",
            "`z` (VADD): (B, latent_dim), or None to draw it from the prior; "
            "`model.encode(x0, visible)` gives the encoder's (mu, log_sigma).",
        ]
    lines += [
        "",
        "Files: `config.json` (resolved vadd config, vocabulary, tokenizer identity), "
        "`model.safetensors` (`backbone.*` decoder, `encoder.*` encoder), `tokenizer.json`"
        + (", `modeling_vadd.py` with `dit.py`, `attention.py`." if "auto_map" in config else "."),
    ]
    utils.write_text(os.path.join(out, "README.md"), "\n".join(lines) + "\n")

"""Reading model folders: the ones scripts/export.py writes (`format: vadd`, read as a
checkpoint dict), and the weights and config of MDLM's Hugging Face folders. Damaged or
truncated files give one line naming the file."""

import json
import os

import torch

from errors import CheckpointError

# of the folders scripts/export.py writes; 2: loads with transformers too (hf_export.py),
# tokenizer.json holds the mask token
FORMAT_VERSION = 2


def read_folder_weights(path: str) -> dict[str, torch.Tensor]:
    safetensors_path = os.path.join(path, "model.safetensors")
    bin_path = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(safetensors_path):
        from safetensors.torch import load_file

        return _readable(safetensors_path, load_file)
    if os.path.exists(bin_path):
        return _readable(bin_path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    raise CheckpointError(
        f"{path} has no model.safetensors or pytorch_model.bin: pass a folder written by "
        "scripts/export.py (or an MDLM Hugging Face folder)"
    )


def _readable(file: str, read):
    """read(file), or one line naming the file when it is truncated or not what it says."""
    try:
        return read(file)
    except Exception as err:  # SafetensorError, UnpicklingError, JSONDecodeError, ...
        raise CheckpointError(
            f"{file} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); it may "
            "be truncated by an interrupted copy: copy or export the folder again"
        ) from err


def read_json(file: str, folder: str) -> dict:
    if not os.path.exists(file):
        raise CheckpointError(f"{folder} has no config.json: it is not a model folder")

    def read(path: str) -> dict:
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    return _readable(file, read)


def read_export(path: str) -> dict:
    """A folder from scripts/export.py as a checkpoint dict `checkpoints.load_for_eval` takes."""
    config = read_json(os.path.join(path, "config.json"), path)
    if config.get("format") != "vadd":
        raise CheckpointError(
            f"{path} is not a vadd export (config.json has no format=vadd): an MDLM folder "
            "can warm-start training with model.init_from=<folder>"
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {config['format_version']}, newer than this code "
            f"reads ({FORMAT_VERSION}): update vadd"
        )
    state = read_folder_weights(path)
    return {
        "state_dict": state,
        "global_step": config.get("global_step", 0),
        "exported_weights": config["weights"],
        "vadd": {
            "config": config["config"],
            "vocab": {k: v for k, v in config["vocab"].items() if k != "model_size"},
            "tokenizer": _read_tokenizer_state(
                path, config.get("tokenizer"), int(config["vocab"]["size"])
            ),
        },
    }


def _read_tokenizer_state(path: str, info: dict | None, vocab_size: int) -> dict | None:
    """Rebuild the tokenizer state a checkpoint stores (without the mask token the export
    added for transformers); refuse an edited tokenizer.json."""
    if info is None:
        return None
    from checkpointing.hf_export import without_mask_token
    from data.tokenization import tokenizer_fingerprint, tokenizer_from_state

    file = os.path.join(path, "tokenizer.json")

    def read(file: str) -> dict:
        with open(file, encoding="utf-8") as f:
            state = {**info, "json": without_mask_token(f.read(), vocab_size)}
        return state, tokenizer_fingerprint(tokenizer_from_state(state))

    state, fingerprint = _readable(file, read)
    if fingerprint != info["fingerprint"]:
        raise CheckpointError(
            f"{path}/tokenizer.json does not match the fingerprint in config.json: the "
            "tokenizer was changed after export; export the checkpoint again"
        )
    return state

"""User-facing errors: main.py prints their message as one line and exits with status 2."""


class VaddError(Exception):
    """Bad input (config value, data, checkpoint) with a message that names the fix."""


class ConfigError(VaddError, ValueError):
    """A bad configuration value; the message is meant to be shown to the user as is."""


class CheckpointError(VaddError, RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class NonFiniteLossError(VaddError):
    """The training loss became NaN or infinite."""


class DataUnavailableError(VaddError, RuntimeError):
    """The data (or its tokenizer) cannot be produced here; the message says how to fix it.

    A VaddError, so main.py prints it as one line instead of a stack trace.
    """


# What to pass instead, per key that names a path (missing_path's message).
PATH_FIXES = {
    "eval.checkpoint_path": "pass the path of a .ckpt file or of a folder written by "
    "scripts/export.py",
    "model.init_from": "pass an MDLM or vadd .ckpt, or a folder with config.json and "
    "model.safetensors",
    "checkpointing.resume_ckpt_path": "fix the path, or drop it to resume from "
    "<checkpointing.save_dir>/checkpoints/last.ckpt when that exists",
    "data.path": "point data.path at a .txt/.jsonl file or a folder",
    "eval.gen_ppl_eval_model_name_or_path": "point it at a folder holding a causal LM "
    "(config.json, weights, tokenizer files), a hub name, or smollm2",
}


def missing_path(key: str, path, error: type[VaddError] = ConfigError) -> VaddError:
    """The one refusal of a path that is not there: the key, the path and what to pass."""
    fix = PATH_FIXES.get(key, "fix the path")
    return error(f"{key}={path} does not exist: {fix}")

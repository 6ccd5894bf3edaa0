"""One call from a checkpoint or an exported folder to a ready model, in Python:

    from checkpointing.loading import load_model
    module = load_model("outputs/.../checkpoints/last.ckpt")   # or an exported folder
    module = Diffusion.load_from_checkpoint(path)               # the same (Lightning's name)

The architecture, vocabulary and tokenizer come from the checkpoint (no config to
repeat); the networks hold the EMA weights (`use_ema=False`: the raw ones) in eval mode.
"""

import torch
from omegaconf import OmegaConf, open_dict

from checkpointing.checkpoints import load_for_eval, read_checkpoint
from errors import CheckpointError


def load_model(path: str, use_ema: bool = True, map_location: str | torch.device = "cpu"):
    """A `diffusion.Diffusion` ready to evaluate or sample, with `.tokenizer` set."""
    from data.tokenization import tokenizer_from_state
    from diffusion import Diffusion, Vocab

    ckpt = read_checkpoint(str(path))
    vadd = ckpt.get("vadd")
    if not vadd or "config" not in vadd:
        raise CheckpointError(
            f"{path} holds no vadd config (an MDLM checkpoint?): warm-start a vadd run from "
            "it with model.init_from=<path>"
        )
    cfg = OmegaConf.create(vadd["config"])
    with open_dict(cfg):
        cfg.eval.disable_ema = not use_ema
    module = Diffusion(cfg, Vocab(**vadd["vocab"]), vadd.get("tokenizer"))
    load_for_eval(module, ckpt, str(path))
    if module.ema is not None:
        if use_ema:  # the weights every evaluation of this checkpoint reports
            module.ema.copy_to(module.trainable_parameters())
        module.ema = None  # the networks hold the chosen weights: nothing to swap
    state = vadd.get("tokenizer")
    module.tokenizer = tokenizer_from_state(state) if state else None
    return module.to(map_location).eval()

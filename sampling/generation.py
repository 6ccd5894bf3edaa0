"""Sampling from a trained module: wires the networks (EMA weights) to samplers.py, and
turns prefix / suffix / template text into the fixed tokens of conditional sampling.

Conditioning is a row x_init (L,) holding mask_id at free positions and token ids at
given ones; every sampler leaves the given tokens untouched. Rows of the data start with
BOS (both framings) and wrapped rows end with EOS, so conditioning text is placed inside
that frame: BOS, prefix ... suffix, EOS.
"""

import contextlib
import re
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from algorithms import algorithm_class
from errors import ConfigError
from sampling import predictors, samplers

if TYPE_CHECKING:  # a type only: diffusion imports these modules
    from diffusion import Diffusion

# `[MASK]` = one free token, `[MASK:n]` = n free tokens.
MASK_SPAN = re.compile(r"\[MASK(?::(\d+))?\]")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------- conditioning


def parse_template(template: str) -> list[str | int]:
    """'In the [MASK:3] God' -> ['In the ', 3, ' God']: text pieces and free-span lengths."""
    pieces: list[str | int] = []
    start = 0
    for span in MASK_SPAN.finditer(template):
        pieces += [template[start : span.start()], int(span.group(1) or 1)]
        start = span.end()
    pieces.append(template[start:])
    for piece in pieces:
        if isinstance(piece, str) and "[MASK" in piece:
            raise ConfigError(
                f"sampling.template={template!r} has a malformed mask in {piece!r}: "
                "write [MASK] for one free token or [MASK:n] for n"
            )
    return [p for p in pieces if p != ""]


def conditioning_from_text(
    tokenizer,
    length: int,
    *,
    prefix: str | None = None,
    suffix: str | None = None,
    template: str | None = None,
    mask_id: int,
    bos: bool = True,
    eos: bool = False,
) -> torch.LongTensor:
    """The conditioning row (L,): mask_id at free positions, token ids at given ones.

    bos / eos fix the data's framing tokens at positions 0 / L-1. prefix follows BOS,
    suffix ends just before EOS (or at L-1). template replaces both: its text (tokenised
    piece by piece, exactly as written, spaces included) follows BOS, each [MASK] /
    [MASK:n] leaves 1 / n free positions, and everything after the template is free.
    """
    if template and (prefix or suffix):
        raise ConfigError(
            "sampling.template is set together with sampling.prefix/suffix: "
            "write the prefix and suffix into the template and drop them"
        )
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    head = [tokenizer.bos_token_id] if bos else []
    tail = [tokenizer.eos_token_id] if eos else []
    if template:
        for piece in parse_template(template):
            head += [mask_id] * piece if isinstance(piece, int) else encode(piece)
    else:
        head += encode(prefix) if prefix else []
        tail = (encode(suffix) if suffix else []) + tail
    if len(head) + len(tail) > length:
        framing = int(bos) + int(eos)
        what = "sampling.template" if template else "sampling.prefix + sampling.suffix"
        raise ConfigError(
            f"{what} takes {len(head) + len(tail) - framing} tokens ({len(head) + len(tail)} "
            f"with BOS/EOS) but model.length={length}: shorten the text or raise model.length"
        )
    x = torch.full((length,), mask_id, dtype=torch.long)
    x[: len(head)] = torch.tensor(head, dtype=torch.long)
    x[length - len(tail) :] = torch.tensor(tail, dtype=torch.long)
    return x


def frame_positions(
    cfg: DictConfig, bos_id: int | None, eos_id: int | None
) -> tuple[bool, bool] | None:
    """(BOS at 0, EOS at L-1) that every training row holds, for sampling.frame=auto; None
    when nothing is fixed (frame=none, grid / image data, the AR baseline)."""
    if cfg.sampling.frame != "auto" or algorithm_class(cfg).family == "ar":
        return None  # the AR sampler opens every row with BOS itself
    kind = cfg.data.kind
    if kind == "set":  # data/text_set.py: BOS + the verse opening
        return True, False
    if kind != "text" or bos_id is None:
        return None
    return True, bool(cfg.data.wrap) and eos_id is not None


def training_frame(cfg: DictConfig, bos_id: int | None, eos_id: int | None) -> tuple[int, ...]:
    """keep_frame=True: the frame's positions (frame_positions), which the forward process
    never masks and the bound does not count, so that training sees the state a sampler
    given the frame starts from. () when keep_frame=False."""
    if not cfg.get("keep_frame", False):
        return ()
    frame = frame_positions(cfg, bos_id, eos_id)
    if frame is None:  # config_check refuses the cases it can see before the tokenizer
        raise ConfigError(
            "keep_frame=True but these data give no frame (no BOS token): set keep_frame=False"
        )
    bos, eos = frame
    return (0,) * bos + (int(cfg.model.length) - 1,) * eos


def conditioning_from_config(
    cfg: DictConfig, tokenizer, mask_id: int
) -> tuple[torch.LongTensor | None, dict]:
    """x_init (L,) from sampling.prefix/suffix/template (None when all unset) and a record
    of the conditioning for results files. BOS always opens it; EOS closes it for wrapped
    data (data.wrap=True), where every training row ends with EOS. Unconditional sampling
    gets the same frame when sampling.frame=auto (frame_positions).

    sampling.semi_ar=True: x_init is the FIRST window's (BOS, the prefix) and has no EOS,
    which would end up inside the longer sequence once the window slides."""
    s, length = cfg.sampling, int(cfg.model.length)
    record = {"prefix": s.prefix, "suffix": s.suffix, "template": s.template,
              "frame": s.frame}  # fmt: skip
    semi_ar = bool(s.get("semi_ar", False))
    x_init = None
    if s.prefix or s.suffix or s.template:
        x_init = conditioning_from_text(
            tokenizer, length, prefix=s.prefix, suffix=s.suffix, template=s.template,
            mask_id=mask_id, eos=bool(cfg.data.wrap) and not semi_ar,
        )  # fmt: skip
    elif frame := frame_positions(cfg, tokenizer.bos_token_id, tokenizer.eos_token_id):
        bos, eos = frame
        x_init = conditioning_from_text(
            tokenizer, length, mask_id=mask_id, bos=bos, eos=eos and not semi_ar
        )
    given = 0 if x_init is None else int((x_init != mask_id).sum())
    return x_init, {**record, "given_positions": given, "free_positions": length - given}


# ----------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(
    module: "Diffusion",
    *,
    num_samples: int,
    predictor: str,
    steps: int,
    fixz: bool = True,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    length: int | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    order: str = "left_to_right",
    stride_length: int | None = None,
    num_strides: int = 1,
) -> tuple[torch.Tensor, dict]:
    """Draw `num_samples` sequences; x_init (B, L) may fix tokens (mask id = free).

    predictor: a name in predictors.PREDICTORS (vae, vae_cache, ddpm, ddpm_cache, tweedie,
    euler, analytic, any_order, ar). `any_order` reveals one position per network call in
    `order` and ignores `steps`; with a VADD model it samples z as the vae predictors do
    (fixz). top_k / top_p restrict revealed tokens.
    stride_length (semi-autoregressive, samplers.sample_semi_ar): num_strides windows of
    L tokens, x_init the first one's; returns L + (num_strides - 1) * stride_length
    tokens. Each window is one chain of the predictor: with fixz, one z per window.
    """
    if x_init is not None:
        x_init = x_init.to(module.device)
        num_samples, length = x_init.shape
    length = length or module.cfg.model.length
    device, vocab = module.device, module.vocab
    was_training = module.training
    module.eval()
    ema = module.ema if (module.ema is not None and not module.cfg.eval.disable_ema) else None
    ctx = ema.swapped_in(module.trainable_parameters()) if ema else contextlib.nullcontext()
    pred = predictors.get_predictor(predictor)
    try:
        with ctx, _autocast(device):
            if x_init is None:
                x_init = torch.full((num_samples, length), vocab.mask_id, dtype=torch.long)
                x_init = x_init.to(device)
            run = lambda window: pred.run(
                module, window, steps=steps, fixz=bool(fixz) and pred.fixz,
                generator=generator, top_k=top_k, top_p=top_p, order=order,
            )  # fmt: skip
            if stride_length is None:
                return run(x_init)
            return samplers.sample_semi_ar(
                run, x_init, stride_length=stride_length, num_strides=num_strides,
                mask_id=vocab.mask_id,
            )  # fmt: skip
    finally:
        module.train(was_training)

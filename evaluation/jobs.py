"""The two evaluation jobs: `ppl_eval` (likelihood bound) and `sample_eval` (samples).

Both write JSON next to the run (eval.output_dir) that names the protocol, so a number
can always be traced to the bound, weights and draws it came from.
"""

import hashlib
import json
import time
from typing import TYPE_CHECKING

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import utils
from algorithms import get_algorithm
from config_check.values import optional
from data import grid as grid_data
from data import text_set
from evaluation import gen_ppl, latent_diagnostics
from sampling import predictors
from sampling.generation import conditioning_from_config, generate

if TYPE_CHECKING:  # a type only: diffusion imports these modules
    from diffusion import Diffusion


def bound_name(cfg: DictConfig, num_particles: int) -> str:
    """Human-readable name of the quantity ppl_eval reports (the algorithm's own)."""
    name = get_algorithm(cfg).bound_name(num_particles)
    if cfg.get("keep_frame", False):  # the frame is given, never masked, not counted
        name += ", of the tokens outside the frame (sampling.frame), given it"
    return name


def run_ppl_eval(
    cfg: DictConfig, module: "Diffusion", trainer: L.Trainer, loader, ckpt_path: str
) -> dict:
    module.eval_draws = int(optional(cfg, "eval.ppl_times"))
    module.eval_particles = int(cfg.eval.num_particles)
    module.eval_any_order = cfg.eval.get("any_order")
    start = time.time()
    trainer.validate(module, dataloaders=loader, verbose=False)
    module.eval_any_order = None
    results = {
        "mode": "ppl_eval",
        "data": cfg.data.name,
        "checkpoint": ckpt_path,
        "bound": bound_name(cfg, module.eval_particles),
        "weights": "raw" if (cfg.eval.disable_ema or module.ema is None) else "EMA",
        "ppl_times": module.eval_draws,
        "any_order": _any_order_record(cfg),
        "num_particles": module.eval_particles,
        "seconds": round(time.time() - start, 2),
        **module.results,
        "rows_in_split": _rows_in_split(loader),
        "split": _describe_split(cfg),
        "limit_batches": cfg.eval.get("limit_batches"),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        path = f"{cfg.eval.output_dir}/ppl_eval.json"
        utils.write_json(path, results)
        bits = f" bits/dim={results['bits_per_dim']:.4f}" if "bits_per_dim" in results else ""
        utils.print0(
            f"[ppl_eval] {cfg.data.name}: ppl={results['ppl']:.3f} nll={results['nll']:.4f}{bits} "
            f"({results['bound']}, {results['weights']} weights, "
            f"{module.eval_draws} draw(s), {int(results.get('sequences', 0))} of "
            f"{results['rows_in_split'] or '?'} rows) -> {path}"
        )
        if "any_order_nll" in results:
            utils.print0(
                f"[ppl_eval] {results['any_order']['bound']}: ppl={results['any_order_ppl']:.3f} "
                f"nll={results['any_order_nll']:.4f}"
            )
        share = (results["split"] or {}).get("validation_share")
        if share is not None:
            split = results["split"]
            utils.print0(
                f"[ppl_eval] {cfg.data.name} held out {split['validation_documents']} of "
                f"{split['documents']} documents, {split['validation_characters']:,} of "
                f"{split['characters']:,} characters ({share:.1%}; data.valid_fraction, "
                "data.valid_min_chars)"
            )
        if "active_units" in results:
            utils.print0(
                f"[ppl_eval] latent: KL {results['kl_closed']:.3f} nats/sequence, "
                f"{results['active_units']}/{results['latent_dims']} active units, "
                f"MI {results.get('mutual_information', float('nan')):.3f} nats"
            )
        warning = latent_diagnostics.collapse_warning(results)
        if warning:
            utils.print0(warning)
    return results


def _any_order_record(cfg: DictConfig) -> dict | None:
    """What `any_order_nll` is (eval.any_order), or None when it was not computed."""
    order = cfg.eval.get("any_order")
    if not order:
        return None
    return {
        "order": order,
        "bound": f"exact any-order AR NLL ({order} order; an upper bound on the denoiser's "
        "-log p only through the order: it is exact for that order)",
    }


def _describe_split(cfg: DictConfig) -> dict | None:
    """How the evaluation rows were held out (text data; None for grid / set data)."""
    if cfg.data.kind != "text":
        return None
    from data import sources as data_sources

    return data_sources.describe_split(cfg.data)


def _rows_in_split(loader) -> int | None:
    """Rows of the evaluation split (all ranks), to set beside the rows evaluated."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # a streaming dataset has no length
        return None


def draw_samples(cfg: DictConfig, module: "Diffusion", predictor: str, fixz: bool, x_init):
    """num_sample_batches x eval_batch_size samples -> tokens (N, L), mean NFE per sequence.

    sampling.semi_ar: N x (L + (num_strides - 1) * stride_length) tokens, x_init the first
    window's conditioning, NFE summed over the windows."""
    sp, batch = cfg.sampling, int(cfg.loader.eval_batch_size)
    gen = torch.Generator(device=module.device).manual_seed(int(sp.seed))
    x_init = None if x_init is None else x_init.repeat(batch, 1)  # the same for every row
    tokens, nfe = [], []
    bar = f"sampling T={sp.steps}" if predictors.get_predictor(predictor).uses_steps else "sampling"
    semi_ar = {}
    if sp.get("semi_ar", False):
        semi_ar = {"stride_length": int(sp.stride_length), "num_strides": int(sp.num_strides)}
    for _ in tqdm(range(sp.num_sample_batches), desc=bar, unit="batch", disable=None):
        x, stats = generate(
            module, num_samples=batch, predictor=predictor, steps=sp.steps, fixz=fixz,
            generator=gen, x_init=x_init, top_k=sp.top_k, top_p=sp.top_p, order=sp.order,
            **semi_ar,
        )  # fmt: skip
        tokens.append(x.cpu())
        nfe.append(stats["nfe_per_sequence"])
    tokens = torch.cat(tokens) if tokens else torch.empty(0, 0, dtype=torch.long)
    return tokens, sum(nfe) / max(len(nfe), 1)


def readable_text(row: list[int], given: list[bool], tokenizer) -> str:
    """One sample for the .txt file: BOS / PAD dropped, EOS a line break (a document
    boundary), the tokens the conditioning gave (prefix, suffix, template) in [[ ]]."""
    # GPT-2's BOS, EOS and PAD are one id: an EOS is a break unless it opens the row (BOS)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    drop = {tokenizer.pad_token_id} - {None, eos}
    parts, run, run_given = [], [], False

    def flush():
        text = tokenizer.decode(run) if run else ""
        parts.append(f"[[{text}]]" if run_given and text else text)
        run.clear()

    for i, (token, is_given) in enumerate(zip(row, given, strict=True)):
        if token in drop or (token == bos and (i == 0 or bos != eos)):
            continue
        if token == eos:
            flush()
            parts.append("\n")
            continue
        if is_given != run_given:
            flush()
            run_given = is_given
        run.append(token)
    flush()
    return "".join(parts).strip()


def score_samples(cfg: DictConfig, tokens: torch.Tensor, tokenizer, device) -> dict:
    """Unigram entropy, and gen-PPL under the judge LM when eval.compute_generative_perplexity.

    Each sample is cut at its first EOS (text after it is not scored) and re-tokenised
    with the judge's own tokenizer; every sample counts, whatever the judge batch size.
    """
    ids = gen_ppl.truncate_at_eos(tokens, tokenizer.eos_token_id, tokenizer.bos_token_id)
    scores = {"unigram_entropy": gen_ppl.unigram_entropy(ids) if len(ids) else None}
    if cfg.eval.compute_generative_perplexity and len(ids):
        judge = gen_ppl.load_judge(cfg.eval.gen_ppl_eval_model_name_or_path, device)
        texts = tokenizer.batch_decode(ids)
        result = gen_ppl.generative_perplexity(texts, judge, int(cfg.eval.perplexity_batch_size))
        scores["gen_ppl"] = result.pop("gen_ppl")
        scores["gen_ppl_details"] = result
    return scores


def _sample_tag(cfg: DictConfig, predictor: str, fixz: bool | None, conditioning) -> str:
    """What tells one sample file from another: predictor, T (or order), semi-AR windows
    (`_semiar<stride>x<windows>`), fixz, top-p / top-k when on, seed, and a short hash of
    the conditioning text when there is one."""
    sp = cfg.sampling
    stepped = predictors.get_predictor(predictor).uses_steps  # any_order: one position a call
    tag = f"{predictor}_T{sp.steps}" if stepped else f"{predictor}_{sp.order}"
    tag += f"_semiar{sp.stride_length}x{sp.num_strides}" if sp.get("semi_ar", False) else ""
    tag += f"_fixz{fixz}" if fixz is not None else ""
    tag += (f"_p{sp.top_p:g}" if sp.top_p < 1.0 else "") + (f"_k{sp.top_k}" if sp.top_k else "")
    tag += f"_seed{int(sp.seed)}"
    if conditioning:
        text = json.dumps(conditioning, sort_keys=True, default=str).encode()
        tag += "_cond" + hashlib.sha1(text).hexdigest()[:6]
    return tag


def run_sample_eval(cfg: DictConfig, module: "Diffusion", tokenizer, ckpt_path: str) -> dict:
    sp, pred = cfg.sampling, predictors.resolve(cfg)
    predictor = pred.name
    fixz = True if sp.fixz is None else bool(sp.fixz)
    uses_z = pred.fixz and module.algorithm.uses_latent  # fixz is a property of the samples
    semi_ar = bool(sp.get("semi_ar", False))
    x_cond, conditioning = conditioning_from_config(cfg, tokenizer, module.vocab.mask_id)
    start = time.time()
    tokens, nfe = draw_samples(cfg, module, predictor, fixz, x_cond)
    seconds = round(time.time() - start, 2)
    texts = tokenizer.batch_decode(tokens.tolist()) if len(tokens) else []
    given = [False] * (tokens.shape[1] if len(tokens) else 0)
    if x_cond is not None and len(tokens):  # the tokens the conditioning fixed
        first = (x_cond.reshape(-1, x_cond.shape[-1])[0] != module.vocab.mask_id).tolist()
        given = first + given[len(first) :]  # semi-AR: the first window's, then none
    readable = [readable_text(row, given, tokenizer) for row in tokens.tolist()]
    conditional = bool(sp.prefix or sp.suffix or sp.template)  # not the set data's BOS frame
    tag = _sample_tag(cfg, predictor, fixz if uses_z else None, conditional and conditioning)
    out = f"{cfg.eval.output_dir}/samples_{tag}"
    if grid_data.is_grid_data(cfg.data):  # checkerboard JS / image grid, and <out>.png
        scores = grid_data.score_samples(cfg.data, tokens, out)
    else:
        scores = score_samples(cfg, tokens, tokenizer, module.device)
        if cfg.data.kind == "set":  # exact precision / coverage against the known set
            scores.update(text_set.score_samples(cfg.data, tokens, tokenizer))
    results = {
        "mode": "sample_eval",
        "checkpoint": ckpt_path,
        "predictor": predictor,
        "steps": sp.steps if pred.uses_steps else None,
        "order": None if pred.uses_steps else sp.order,
        "fixz": fixz if uses_z else None,
        "top_k": sp.top_k,
        "top_p": sp.top_p,
        "semi_ar": semi_ar,
        "stride_length": int(sp.stride_length) if semi_ar else None,
        "num_strides": int(sp.num_strides) if semi_ar else None,
        "length": int(tokens.shape[1]) if len(tokens) else None,
        "conditioning": conditioning,
        "seed": int(sp.seed),
        "num_samples": len(texts),
        "seconds": seconds,
        "nfe_per_sequence": nfe,
        **scores,
        "samples": texts,
        "token_ids": tokens.tolist(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    utils.write_json(out + ".json", results)
    utils.write_text(out + ".txt", "\n\n==========\n\n".join(readable) + "\n")
    gen = f", gen-PPL {results['gen_ppl']:.2f}" if "gen_ppl" in results else ""
    gen += f", JS {results['js_divergence']:.4f} nats" if "js_divergence" in results else ""
    utils.print0(f"[sample_eval] {len(texts)} samples in {seconds} s{gen} -> {out}.json")
    return results

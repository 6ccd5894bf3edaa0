"""The two evaluation jobs: `ppl_eval` (likelihood bound) and `sample_eval` (samples).

Both write JSON next to the run (eval.output_dir) that names the protocol, so a number
can always be traced to the bound, weights and draws it came from.
"""

import math
import time
from collections import Counter

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

import utils
from config_check import resolve_predictor
from diffusion import Diffusion
from generation import generate


def bound_name(cfg: DictConfig, num_particles: int) -> str:
    """Human-readable name of the quantity ppl_eval reports."""
    if cfg.backbone == "ar":
        return "exact autoregressive NLL"
    time_desc = "continuous time" if cfg.T == 0 else f"T={cfg.T} steps"
    if cfg.training.loss_type == "mdlm":
        return f"MDLM NELBO ({time_desc})"
    kind = "DELBO" if num_particles == 1 else f"IWAE-DELBO (K={num_particles})"
    return f"negative {kind}, kl_weighting={cfg.training.kl_weighting}, {time_desc}, beta=1"


def run_ppl_eval(
    cfg: DictConfig, module: Diffusion, trainer: L.Trainer, loader, ckpt_path: str
) -> dict:
    module.eval_draws = int(cfg.eval.get("ppl_times", 1))
    module.eval_particles = int(cfg.eval.num_particles)
    start = time.time()
    trainer.validate(module, dataloaders=loader, verbose=False)
    results = {
        "mode": "ppl_eval",
        "data": cfg.data.name,
        "checkpoint": ckpt_path,
        "bound": bound_name(cfg, module.eval_particles),
        "weights": "raw" if (cfg.eval.disable_ema or module.ema is None) else "EMA",
        "ppl_times": module.eval_draws,
        "num_particles": module.eval_particles,
        "seconds": round(time.time() - start, 2),
        **module.results,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        path = f"{cfg.eval.output_dir}/ppl_eval.json"
        utils.write_json(path, results)
        utils.print0(
            f"[ppl_eval] {cfg.data.name}: ppl={results['ppl']:.3f} nll={results['nll']:.4f} "
            f"({results['bound']}, {results['weights']} weights, "
            f"{module.eval_draws} draw(s)) -> {path}"
        )
    return results


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token histogram."""
    values = []
    for row in tokens.tolist():
        counts = Counter(row).values()
        n = sum(counts)
        values.append(-sum(c / n * math.log(c / n) for c in counts))
    return sum(values) / max(len(values), 1)


def run_sample_eval(cfg: DictConfig, module: Diffusion, tokenizer, ckpt_path: str) -> dict:
    predictor = resolve_predictor(cfg)
    fixz = True if cfg.sampling.fixz is None else bool(cfg.sampling.fixz)
    batch = int(cfg.loader.eval_batch_size)
    gen = torch.Generator(device=module.device).manual_seed(int(cfg.sampling.seed))
    all_tokens, stats, start = [], [], time.time()
    for _ in range(cfg.sampling.num_sample_batches):
        x, s = generate(
            module, num_samples=batch, predictor=predictor, steps=cfg.sampling.steps,
            fixz=fixz, generator=gen,
        )  # fmt: skip
        all_tokens.append(x.cpu())
        stats.append(s)
    tokens = torch.cat(all_tokens) if all_tokens else torch.empty(0, 0, dtype=torch.long)
    texts = tokenizer.batch_decode(tokens.tolist()) if len(tokens) else []
    tag = f"{predictor}_T{cfg.sampling.steps}" + (
        f"_fixz{fixz}" if predictor.startswith("vae") else ""
    )
    results = {
        "mode": "sample_eval",
        "checkpoint": ckpt_path,
        "predictor": predictor,
        "steps": cfg.sampling.steps,
        "fixz": fixz if predictor.startswith("vae") else None,
        "seed": int(cfg.sampling.seed),
        "num_samples": len(texts),
        "seconds": round(time.time() - start, 2),
        "nfe_per_sequence": sum(s["nfe_per_sequence"] for s in stats) / max(len(stats), 1),
        "unigram_entropy": unigram_entropy(tokens) if len(tokens) else None,
        "samples": texts,
        "token_ids": tokens.tolist(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out = f"{cfg.eval.output_dir}/samples_{tag}"
    utils.write_json(out + ".json", results)
    utils.write_text(out + ".txt", "\n\n==========\n\n".join(texts) + "\n")
    utils.print0(
        f"[sample_eval] {len(texts)} samples ({tag}) in {results['seconds']} s -> {out}.json"
    )
    return results

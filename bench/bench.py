"""Throughput benchmark of vadd: training, ppl_eval and sampling, for MDLM and VADD, as JSON.

    python bench/bench.py                              # CPU: model=cpu, L=128, batch 32
    python bench/bench.py --device cuda -- model=small decoder=small model.length=1024 \
        loader.global_batch_size=32 data=openwebtext-split   # the H100 anchor's shapes

Everything after `--` is a Hydra override of configs/config.yaml, exactly as for main.py.
What is measured, per loss type (training.loss_type=mdlm and =vae):

1. training tokens/s through the real entry point: runner.build_trainer + runner.build_module
   + trainer.fit (manual optimisation, gradient clipping, EMA, the finite-loss check), on
   random token ids held in memory (data loading is not measured). A callback timestamps
   the end of every training batch after a device synchronisation; warm-up batches are
   dropped and the rest is cut into `--repeats` windows of `--steps-per-repeat` batches;
   the median window is reported, with model FLOPs utilisation (see FLOPS_FORMULA).
2. ppl_eval tokens/s through evaluation.run_ppl_eval (trainer.validate), timed the same way.
3. seconds to sample 16 x L at each T of `--sample-steps` (generation.generate, vae_cache /
   ddpm_cache, fixed z) after a warm-up; peak memory of each phase (see measure.py).
"""

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's modules (runner, diffusion, ...) are top level
sys.path.insert(0, str(ROOT / "bench"))  # measure.py beside this file
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # GPT-2 and the BPE tokenizers load offline

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from measure import (  # noqa: E402
    FLOPS_FORMULA,
    BatchTimer,
    environment,
    figure,
    flops_per_token,
    git_commit,
    measure_cpu_peak_tflops,
    non_embedding_params,
    peak_memory,
    reset_peak_memory,
    window_rates,
)
from omegaconf import DictConfig, open_dict  # noqa: E402
from report import compare_with_anchor, print_table  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import dataloader  # noqa: E402
import runner  # noqa: E402
from config_check import validate_config  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from evaluation.jobs import run_ppl_eval  # noqa: E402
from sampling.generation import generate  # noqa: E402

warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # data is in memory
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

SCHEMA = "vadd-bench/1"
DEFAULTS = {  # per device: CPU keeps the default run of both loss types under ~3 minutes
    "cpu": {"warmup": 2, "steps_per_repeat": 4, "repeats": 3, "sample_repeats": 1, "threads": 1},
    "cuda": {"warmup": 10, "steps_per_repeat": 20, "repeats": 5, "sample_repeats": 3},
}
H100_BF16_DENSE_TFLOPS = 989.0
DATA_FEED = ("random token ids in [0, vocab) from an in-memory Dataset (attention mask all "
             "ones, as for wrapped data); data loading, tokenisation not measured")  # fmt: skip


# ---------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark vadd training, ppl_eval and sampling throughput (JSON output).",
        epilog="Hydra overrides go after `--`, e.g. -- model=small model.length=1024",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    p.add_argument(
        "--loss-types", nargs="+", choices=["mdlm", "vae"], default=["mdlm", "vae"],
        help="training.loss_type values to measure, each with a fresh module",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="JSON path (default outputs/bench/<time>.json)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches (CPU 2, CUDA 10)")
    p.add_argument("--steps-per-repeat", type=int, default=None, help="batches per window")
    p.add_argument("--repeats", type=int, default=None, help="timed windows (median reported)")
    p.add_argument("--sample-steps", type=int, nargs="+", default=[16, 128, 1024],
                   help="sampling steps T to time, each on a --sample-batch x L batch")  # fmt: skip
    p.add_argument("--sample-batch", type=int, default=16, help="sequences per sampling batch")
    p.add_argument("--predictors", nargs="*", default=[], help="more sampling.predictor "
                   "names to time, e.g. tweedie analytic (JSON key `samplers`)")  # fmt: skip
    p.add_argument("--sample-repeats", type=int, default=None, help="runs per T (CPU 1, CUDA 3)")
    p.add_argument(
        "--peak-tflops", type=float, default=None,
        help=f"MFU denominator in TFLOP/s (CUDA default {H100_BF16_DENSE_TFLOPS}, H100 bf16 "
        "dense; CPU default: measured with a 2048x2048 float32 matmul loop)",
    )  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (CPU default 1: on a small shared machine, threads competing "
        "with other jobs made runs 5-20x slower and erratic; CUDA default: torch's)",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)  # before the CPU peak is measured: same threads
    for key in ("warmup", "steps_per_repeat", "repeats", "sample_batch", "sample_repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1 (warm-up gives the first timestamp)")
    if min(args.sample_steps) < 1:
        p.error("--sample-steps must all be >= 1")
    return args


# ---------------------------------------------------------------- config and trainer
def compose_cfg(args: argparse.Namespace, loss_type: str, workdir: str) -> DictConfig:
    """The composed Hydra config, with what a benchmark must pin set after the user's overrides."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                f"checkpointing.save_dir={workdir}",  # ${hydra:...} does not resolve in compose
                f"eval.output_dir={workdir}",
                *args.overrides,
                f"training.loss_type={loss_type}",
            ],
        )
    train_batches = args.warmup + args.repeats * args.steps_per_repeat
    with open_dict(cfg):
        cfg.mode = "train"
        cfg.logger = "none"
        cfg.callbacks = {}  # no checkpoints, no LR monitor: they are not per-step work
        t = cfg.trainer
        t.accelerator, t.devices, t.num_nodes = ("gpu" if args.device == "cuda" else "cpu"), 1, 1
        t.precision = runner.resolve_precision(t.precision, t.accelerator)  # recorded as run
        t.max_epochs = 1  # the in-memory dataset holds exactly the batches we time
        t.limit_train_batches = 1.0
        t.limit_val_batches = train_batches
        t.num_sanity_val_steps = 0
        t.enable_progress_bar = False
        t.enable_model_summary = False
        t.enable_checkpointing = False
    validate_config(cfg)
    runner.derive_batch_sizes(cfg, 1)
    with open_dict(cfg):  # max_steps counts optimizer steps (it also shapes the LR schedule)
        cfg.trainer.max_steps = math.ceil(train_batches / cfg.trainer.accumulate_grad_batches)
    return cfg


class RandomTokens(Dataset):
    """`rows` rows of random ids cycling over a small pool, so memory stays small."""

    def __init__(self, rows: int, length: int, vocab_size: int, seed: int, pool: int = 64):
        gen = torch.Generator().manual_seed(seed)
        self.rows = rows
        self.pool = torch.randint(0, vocab_size, (min(rows, pool), length), generator=gen)
        self.mask = torch.ones(length, dtype=torch.long)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.pool[i % len(self.pool)], "attention_mask": self.mask}


def random_loader(cfg: DictConfig, batch: int, batches: int, vocab: int, device: str):
    rows = RandomTokens(batch * batches, int(cfg.model.length), vocab, seed=int(cfg.seed))
    return DataLoader(
        rows, batch_size=batch, shuffle=False, drop_last=True, pin_memory=device == "cuda"
    )


# ---------------------------------------------------------------- the three measurements
def bench_train(cfg, module, trainer, timer, args, flops: int, peak_tflops: float) -> dict:
    batch, length = int(cfg.loader.batch_size), int(cfg.model.length)
    batches = args.warmup + args.repeats * args.steps_per_repeat
    reset_peak_memory(args.device)
    loader = random_loader(cfg, batch, batches, module.vocab.size, args.device)
    trainer.fit(module, loader)
    rates = window_rates(
        timer.stamps["train"], args.warmup, args.steps_per_repeat, args.repeats, batch * length
    )
    tok_s = statistics.median(rates)
    return {
        "tokens_per_s": figure(tok_s, "tokens/s", repeats=rates),
        "step_time": figure(batch * length / tok_s * 1e3, "ms/batch"),
        "model_flops_per_token": figure(flops, "FLOP/token"),
        "achieved": figure(flops * tok_s / 1e12, "TFLOP/s"),
        "mfu": figure(flops * tok_s / (peak_tflops * 1e12), "fraction of peak FLOP/s"),
        "timed_batches": args.repeats * args.steps_per_repeat,
        "optimizer_steps_run": trainer.global_step,
        "peak_memory": peak_memory(args.device),
    }


def bench_ppl_eval(cfg, module, trainer, timer, args, flops: int, peak_tflops: float) -> dict:
    batch, length = int(cfg.loader.eval_batch_size), int(cfg.model.length)
    batches = args.warmup + args.repeats * args.steps_per_repeat
    reset_peak_memory(args.device)
    loader = random_loader(cfg, batch, batches, module.vocab.size, args.device)
    results = run_ppl_eval(cfg, module, trainer, loader, "untrained (bench)")
    rates = window_rates(
        timer.stamps["validate"], args.warmup, args.steps_per_repeat, args.repeats, batch * length
    )
    tok_s = statistics.median(rates)
    return {
        "tokens_per_s": figure(tok_s, "tokens/s", repeats=rates),
        "batch_time": figure(batch * length / tok_s * 1e3, "ms/batch"),
        "model_flops_per_token": figure(flops, "FLOP/token"),
        "mfu": figure(flops * tok_s / (peak_tflops * 1e12), "fraction of peak FLOP/s"),
        "bound": results["bound"],
        "ppl_on_random_ids": figure(results["ppl"], "perplexity"),  # sanity only: ~vocab size
        "peak_memory": peak_memory(args.device),
    }


def bench_sampling(cfg, module: Diffusion, args, predictor: str | None = None) -> dict:
    """Seconds per batch at each T; the generator is reseeded per run so runs are identical."""
    device = torch.device(args.device)
    module.to(device)  # Lightning moves the module back to the CPU when fit/validate end
    default = "vae_cache" if module.algorithm.uses_latent else "ddpm_cache"
    predictor = predictor or default
    gen = torch.Generator(device=device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run(steps: int) -> tuple[float, dict]:
        gen.manual_seed(int(cfg.seed))
        sync()
        start = time.perf_counter()
        _, stats = generate(
            module,
            num_samples=args.sample_batch,
            predictor=predictor,
            steps=steps,
            fixz=True,
            generator=gen,
        )
        sync()
        return time.perf_counter() - start, stats

    reset_peak_memory(args.device)
    run(min(args.sample_steps))  # warm-up: kernels, allocator, compiled graphs
    rows = []
    for steps in args.sample_steps:
        times, stats = zip(*(run(steps) for _ in range(args.sample_repeats)), strict=True)
        seconds = statistics.median(times)
        calls, nfe = stats[0]["network_calls"], stats[0]["nfe_per_sequence"]
        rows.append(
            {
                "steps": steps,
                "seconds": figure(seconds, "s", repeats=list(times)),
                "time_per_step": figure(seconds / steps * 1e3, "ms/step"),
                "network_calls": figure(calls, "batched decoder calls"),
                "nfe_per_sequence": figure(nfe, "decoder evaluations/sequence"),
            }
        )
    return {
        "predictor": predictor,
        "fixz": module.algorithm.uses_latent,
        "autocast": "bfloat16" if args.device == "cuda" else "none (float32)",  # generate()'s
        "batch": args.sample_batch,
        "length": int(cfg.model.length),
        "runs": rows,
        "peak_memory": peak_memory(args.device),
    }


# ---------------------------------------------------------------- one loss type
def shapes(cfg: DictConfig, module: Diffusion, args) -> dict:
    net = lambda c: {k: int(c[k]) for k in ("hidden_size", "n_blocks", "n_heads", "cond_dim")}
    vae = module.encoder is not None
    return {
        "batch_size": int(cfg.loader.batch_size),
        "global_batch_size": int(cfg.loader.global_batch_size),
        "accumulate_grad_batches": int(cfg.trainer.accumulate_grad_batches),
        "eval_batch_size": int(cfg.loader.eval_batch_size),
        "sample_batch": args.sample_batch,
        "length": int(cfg.model.length),
        "vocab_size": module.vocab.size,
        "model_vocab_size": module.vocab.model_size,  # + the [MASK] id
        "decoder": net(cfg.model),
        "encoder": net(cfg.decoder) if vae else None,
        "latent_dim": int(cfg.model.latent_dim) if vae else None,
        "latent1d": bool(cfg.model.latent1d) if vae else None,
        "num_particles": int(cfg.training.num_particles) if vae else None,
        "encoder_training_times": int(cfg.training.encoder_training_times) if vae else None,
    }


def params(module: Diffusion) -> dict:
    count = lambda net: 0 if net is None else sum(p.numel() for p in net.parameters())
    return {
        "decoder": figure(count(module.backbone), "parameters"),
        "decoder_non_embedding": figure(non_embedding_params(module.backbone), "parameters"),
        "encoder": figure(count(module.encoder), "parameters"),
        "encoder_non_embedding": figure(non_embedding_params(module.encoder), "parameters"),
    }


def bench_loss_type(args, loss_type: str, tokenizer_cache: dict, peak_tflops: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="vadd-bench-") as workdir:
        cfg = compose_cfg(args, loss_type, workdir)
        key = (str(cfg.data.name), str(cfg.data.tokenizer_name_or_path))  # a BPE is per corpus
        if key not in tokenizer_cache:
            tokenizer_cache[key] = dataloader.get_tokenizer(cfg.data)
        tokenizer = tokenizer_cache[key]
        L.seed_everything(int(cfg.seed), verbose=False)
        module = runner.build_module(cfg, tokenizer)
        timer = BatchTimer(args.device)
        trainer = runner.build_trainer(cfg)
        trainer.callbacks.append(timer)
        flops = flops_per_token(cfg, module)
        report = {
            "shapes": shapes(cfg, module, args),
            "params": params(module),
            "precision": str(trainer.precision),
            "compile": bool(cfg.model.compile),
            "train": bench_train(cfg, module, trainer, timer, args, flops["train"], peak_tflops),
            "ppl_eval": bench_ppl_eval(
                cfg, module, trainer, timer, args, flops["ppl_eval"], peak_tflops
            ),
            "sampling": bench_sampling(cfg, module, args),
        }
        report["samplers"] = {p: bench_sampling(cfg, module, args, p) for p in args.predictors}
        report["anchor"] = compare_with_anchor(report, loss_type, args.device)
        if report["anchor"]["comparable"]:
            report["anchor"]["same_device_kind"] = "H100" in torch.cuda.get_device_name(0)
    del module, trainer
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return report


# ---------------------------------------------------------------- output
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.peak_tflops is not None:
        peak = figure(args.peak_tflops, "TFLOP/s", source="--peak-tflops")
    elif args.device == "cuda":
        peak = figure(H100_BF16_DENSE_TFLOPS, "TFLOP/s", source="default: H100 SXM bf16 dense")
    else:
        peak = figure(
            measure_cpu_peak_tflops(),
            "TFLOP/s",
            source="measured: best float32 2048x2048 torch.matmul",
        )
    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "git": git_commit(),
        "environment": environment(args.device),
        "settings": {
            "overrides": args.overrides,
            "warmup_batches": args.warmup,
            "steps_per_repeat": args.steps_per_repeat,
            "repeats": args.repeats,
            "statistic": "median over repeats",
            "sample_steps": args.sample_steps,
            "sample_repeats": args.sample_repeats,
            "peak": peak,
            "flops_formula": FLOPS_FORMULA,
            "data": DATA_FEED,
            "logger": "none, no checkpoint callbacks",
        },
        "results": {},
    }
    tokenizers: dict = {}
    for loss_type in args.loss_types:
        report["results"][loss_type] = bench_loss_type(args, loss_type, tokenizers, peak["value"])
    report["environment"]["load_average_1min_end"] = os.getloadavg()[0]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ROOT / "outputs" / "bench" / f"bench-{args.device}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"JSON: {out}")
    return report


if __name__ == "__main__":
    main()

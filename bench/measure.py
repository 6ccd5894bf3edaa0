"""Measuring helpers of bench/bench.py: batch timestamps and windowed rates, model FLOPs
per token, peak memory, the CPU's measured peak, and the environment record."""

import math
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]

FLOPS_FORMULA = (
    "model FLOPs per token, forward + backward, per network pass: "
    "6 * N + 12 * n_blocks * hidden * L, where N = the network's parameters minus its token "
    "embedding table (a lookup, not a matmul) and the second term is attention (QK^T and AV). "
    "Every other parameter is counted as a per-token matmul, including the output projection "
    "over all L positions (the code projects masked rows only; MDLM's reference projects all) "
    "and the per-sequence time/latent MLPs and decoder AdaLN layers (a few % overcount at "
    "model=small). Training: mdlm = decoder; vae = encoder_training_times * (num_particles * "
    "decoder + encoder). ppl_eval is forward only (1/3 of the above): mdlm = decoder; vae = "
    "encoder + (eval.num_particles + 1) * decoder (the +1 is the prior-z NELBO it also reports). "
    "MFU = FLOPs per token * tokens/s / peak FLOP/s."
)


def figure(value: float, unit: str, **extra) -> dict:
    """Every number in the report carries its unit."""
    return {"value": value, "unit": unit, **extra}


class BatchTimer(Callback):
    """Timestamps the end of every training / validation batch, after the device is idle."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.stamps: dict[str, list[float]] = {"train": [], "validate": []}

    def _stamp(self, stage: str) -> None:
        self.sync()  # kernels are asynchronous: wait for them, or we time the launch only
        self.stamps[stage].append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._stamp("train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        self._stamp("validate")


def window_rates(stamps: list[float], warmup: int, steps: int, repeats: int, per_batch: float):
    """Rates (per_batch units per second) of `repeats` consecutive windows of `steps` batches
    after `warmup` batches; the end of the last warm-up batch starts the first window."""
    if len(stamps) < warmup + steps * repeats:
        raise RuntimeError(f"only {len(stamps)} batches ran, {warmup + steps * repeats} expected")
    rates = []
    for r in range(repeats):
        start, end = warmup - 1 + r * steps, warmup - 1 + (r + 1) * steps
        rates.append(per_batch * steps / (stamps[end] - stamps[start]))
    return rates


# ---------------------------------------------------------------- FLOPs and memory
def non_embedding_params(net: torch.nn.Module | None) -> int:
    if net is None:
        return 0
    return sum(p.numel() for p in net.parameters()) - net.vocab_embed.embedding.numel()


def pass_flops(non_embedding: int, n_blocks: int, hidden: int, length: int) -> int:
    """Forward + backward FLOPs per token of one network pass (PaLM, appendix B): 2 per weight
    forward and 4 backward; attention QK^T + AV is 4 * hidden * L per block forward, x3."""
    return 6 * non_embedding + 12 * n_blocks * hidden * length


def flops_per_token(cfg: DictConfig, module) -> dict[str, int]:
    """Model FLOPs per data token of a training step and of a ppl_eval step (FLOPS_FORMULA)."""
    length = int(cfg.model.length)
    m = cfg.model
    dec = pass_flops(non_embedding_params(module.backbone), m.n_blocks, m.hidden_size, length)
    if module.encoder is None:
        return {"train": dec, "ppl_eval": dec // 3}
    e = cfg.decoder
    enc = pass_flops(non_embedding_params(module.encoder), e.n_blocks, e.hidden_size, length)
    train = cfg.training.encoder_training_times * (cfg.training.num_particles * dec + enc)
    return {"train": train, "ppl_eval": (enc + (cfg.eval.num_particles + 1) * dec) // 3}


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    if device == "cuda":
        kind = "torch.cuda.max_memory_allocated during this phase"
        return figure(torch.cuda.max_memory_allocated() / 2**20, "MiB", kind=kind)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    kind = "process max RSS so far (includes earlier phases and loss types)"
    return figure(rss_kib / 1024, "MiB", kind=kind)


def measure_cpu_peak_tflops(n: int = 2048, seconds: float = 1.0) -> float:
    """Best rate of a float32 n x n matmul: what this CPU's BLAS reaches on large GEMMs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, allocator
    best, deadline, runs = math.inf, time.perf_counter() + seconds, 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best, runs = min(best, time.perf_counter() - start), runs + 1
    return 2 * n**3 / best / 1e12


# ---------------------------------------------------------------- environment
def git_commit() -> dict:
    def git(*cmd: str) -> str | None:
        try:
            proc = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        except OSError:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": os.getloadavg()[0],  # other jobs on the machine skew CPU figures
    }

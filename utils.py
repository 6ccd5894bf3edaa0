"""Small helpers: LR schedules, RNG state, evaluation summaries, rank-zero printing, fsspec I/O."""

import contextlib
import glob
import hashlib
import json
import math
import os
import random
import socket
import statistics
import uuid
from collections.abc import Callable

import fsspec
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from errors import VaddError


# ---------------------------------------------------------------- learning-rate schedules
def build_lr_scheduler(opt: torch.optim.Optimizer, cfg: DictConfig, max_steps: int):
    """`constant_warmup`: linear warm-up then constant (MDLM's default);
    `cosine_decay_warmup`: linear warm-up then cosine decay to `min_lr_ratio` x lr."""
    warmup = int(cfg.warmup_steps)

    def constant(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        floor = cfg.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedules = {"constant_warmup": constant, "cosine_decay_warmup": cosine}
    return torch.optim.lr_scheduler.LambdaLR(opt, schedules[cfg.name])


def apply_optim_config(
    opt: torch.optim.Optimizer, sched, lrs: list[float], o: DictConfig
) -> list[str]:
    """After a resume: the config's lr (per parameter group, `lrs`), betas, eps and weight
    decay over the values the restored optimiser / scheduler state brought back (which
    would otherwise win silently); the schedule's shape comes from the config already.
    Returns one line per changed value; with nothing changed the state is untouched."""
    changes = []
    wanted = {"betas": (float(o.beta1), float(o.beta2)), "eps": float(o.eps),
              "weight_decay": float(o.weight_decay)}  # fmt: skip
    for i, (group, lr) in enumerate(zip(opt.param_groups, lrs, strict=True)):
        name = "optim.lr" if i == 0 else f"optim.lr x encoder_lr_scale (group {i})"
        if sched.base_lrs[i] != lr:
            changes.append(f"{name}: {sched.base_lrs[i]:g} -> {lr:g}")
            sched.base_lrs[i] = group["initial_lr"] = lr
            group["lr"] = lr * sched.lr_lambdas[i](sched.last_epoch)
        for key, value in wanted.items():
            if tuple(np.atleast_1d(group[key])) != tuple(np.atleast_1d(value)):
                changes.append(f"optim.{key} (group {i}): {group[key]} -> {value}")
                group[key] = value
    if changes:
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    return changes


# ---------------------------------------------------------------- RNG state
def get_rng_state() -> dict:
    """Every RNG a training step draws from, as tensors and plain values (so checkpoints
    load with torch.load(weights_only=True), Lightning's default)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached)
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- evaluation summaries
def summarise_eval(sums: dict[str, torch.Tensor], draws: int) -> dict:
    """Turn summed per-draw statistics into per-token NLL / PPL / BPD with their spread."""
    tokens = float(sums["tokens"])
    seqs = float(sums["sequences"])
    nll_draws = [float(sums[f"nll_{d}"]) / tokens for d in range(draws)]
    nll = statistics.fmean(nll_draws)
    out = {
        "nll": nll,
        "ppl": math.exp(min(nll, 700.0)),
        "bpd": nll / math.log(2.0),
        "tokens": int(tokens),
        "sequences": int(seqs),
        "draws": draws,
        "nll_per_draw": nll_draws,
        "ppl_per_draw": [math.exp(min(v, 700.0)) for v in nll_draws],
    }
    if draws > 1:
        out["ppl_std"] = statistics.stdev(out["ppl_per_draw"])
        out["nll_std"] = statistics.stdev(nll_draws)
    per_token = {"recon", "prior_nelbo"}
    for key in ("recon", "kl", "kl_closed", "mu_std", "prior_nelbo"):
        if f"{key}_0" in sums:
            denom = tokens if key in per_token else seqs
            out[key] = statistics.fmean(float(sums[f"{key}_{d}"]) / denom for d in range(draws))
    if "prior_nelbo" in out:
        out["prior_ppl"] = math.exp(min(out["prior_nelbo"], 700.0))
    if "any_order_nll" in sums:  # exact, one order per sequence: no draws
        out["any_order_nll"] = float(sums["any_order_nll"]) / tokens
        out["any_order_ppl"] = math.exp(min(out["any_order_nll"], 700.0))
    return out


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed for the random stream named by `parts` (e.g. step seed, "z", row):
    a hash, so streams of different names, steps or rows never share a seed, and no
    config seed overflows torch's 64-bit generator seed."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------- processes, I/O
def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without an initialised process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@rank_zero_only
def print0(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


TEMP_MARK = ".partial-"  # temp files: <folder>/.<name>.partial-<host>-<pid>-<random>


def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """Write `path` so that it is either the old file or the complete new one, never a
    part: `write(f)` fills a temp file in the destination folder (a rename is atomic
    only within one filesystem; Lightning's temp file in $TMPDIR becomes a copy when the
    run folder is on another one), which is flushed, fsynced and renamed over `path`.
    Any failure (full disk, an exception in `write`) removes the temp file and leaves
    the old file as it was. Remote fsspec paths (s3://, gs://) upload then move."""
    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    mode = "wb" if binary else "w"
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(fs._parent(p), exist_ok=True)
        tmp = f"{p}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, mode) as f:
            write(f)
        fs.mv(tmp, p)
        return
    folder, name = os.path.split(os.path.abspath(p))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}{TEMP_MARK}{_owner_tag()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _owner_tag() -> str:
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete temp files of atomic_write left in `folder` by processes of this host that
    are gone (a SIGKILL mid-save); another host's or a live process's files are kept."""
    host, removed = socket.gethostname().replace("-", "_"), []
    for path in glob.glob(os.path.join(glob.escape(folder), f".*{TEMP_MARK}*")):
        owner = path.rsplit(TEMP_MARK, 1)[1].split("-")
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
            continue
        if int(owner[1]) != os.getpid() and not _alive(int(owner[1])):
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:  # kill(0 or -1, 0) would ask about whole process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class FolderLockedError(VaddError):
    """Another live run holds the folder (main.py prints the message as one line)."""


@contextlib.contextmanager
def folder_lock(folder: str):
    """Hold `<folder>/.vadd.lock` (host and pid of the holder) for the duration: a second
    run started into a folder that a live run holds is refused; a lock left by a run that
    died on this host is taken over with a message. A lock of another host cannot be
    checked from here: it is refused with the file to delete if that run is gone."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".vadd.lock")
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            host, pid = holder if holder else (socket.gethostname(), -1)
            if host == socket.gethostname() and pid != os.getpid() and not _alive(pid):
                print0(f"[vadd] taking over {path}: its run (pid {pid}) is gone")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            if host == socket.gethostname() and pid == os.getpid():
                break  # this process holds it already (e.g. a second fit in one process)
            where = f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"
            raise FolderLockedError(
                f"{folder} is in use by another run ({where}): wait for it, use another "
                f"checkpointing.save_dir, or delete {path} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    try:
        yield path
    finally:
        if _read_holder(path) == (socket.gethostname(), os.getpid()):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _read_holder(path: str) -> tuple[str, int] | None:
    try:
        host, pid = open(path).read().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj: dict) -> None:
    """Write JSON (indented, a final newline) through fsspec, atomically (atomic_write)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: str, text: str) -> None:
    """Write UTF-8 text through fsspec (local, s3://, gs://...), atomically: a reader
    sees the old file or the whole new one, never a part."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))

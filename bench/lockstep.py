"""A/B of the raw training step of two code trees, in lockstep on one core.

On a shared VM the machine's speed drifts by +-30% over tens of seconds, more than most
changes being measured. Here two worker processes, one per code tree (say a worktree of
an old commit and this checkout), are pinned to the same core and take turns: one
training step of A, one of B, alternating which goes first. Drift hits both alike, and
the median of the per-pair time ratios A/B is the speed-up of B.

A step is the tree's own `Diffusion.training_step`, run by a Lightning Trainer under the
tree's default precision (its `trainer.precision=auto` rule): loss, backward, clipping,
the optimizer and scheduler steps, the EMA update, its logging calls. The time is the
thread time between the batch-start and batch-end hooks. Random token batches as in
bench.py, one optimizer step per batch. CPU only.

    git worktree add /tmp/base c77b3aa
    python bench/lockstep.py /tmp/base . --loss-type vae --steps 30 -- model=cpu
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import os, sys, time, torch
sys.path.insert(0, os.getcwd())
torch.set_num_threads(1)
from pathlib import Path
import lightning as L
from hydra import compose, initialize_config_dir
import dataloader, runner
loss_type, batch, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base=None):
    cfg = compose("config", overrides=[
        "checkpointing.save_dir=/tmp/lockstep", "eval.output_dir=/tmp/lockstep",
        f"training.loss_type={loss_type}", f"loader.global_batch_size={batch}", *overrides])
runner.derive_batch_sizes(cfg, 1)
torch.manual_seed(0)
module = runner.build_module(cfg, dataloader.get_tokenizer(cfg.data))
if hasattr(runner, "resolve_precision"):
    precision = runner.resolve_precision(cfg.trainer.precision, "cpu")
else:  # older trees: auto meant float32 on CPU
    precision = "32-true" if cfg.trainer.precision == "auto" else str(cfg.trainer.precision)
length = int(cfg.model.length)

class Rows(torch.utils.data.IterableDataset):  # random token batches, as bench.py
    def __iter__(self):
        while True:
            x = torch.randint(0, module.vocab.size, (batch, length))
            yield {"input_ids": x, "attention_mask": torch.ones_like(x)}

class Pace(L.Callback):  # one step per line on stdin; its thread time on stdout
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not sys.stdin.readline():
            raise SystemExit(0)
        self.start = time.thread_time()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(time.thread_time() - self.start, flush=True)

trainer = L.Trainer(
    accelerator="cpu", devices=1, precision=precision, max_steps=10**9, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Pace()])
print("ready", precision, length, flush=True)
trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Rows(), batch_size=None))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree_a", help="code tree A (the baseline)")
    p.add_argument("tree_b", help="code tree B (the candidate)")
    p.add_argument("--loss-type", default="mdlm", choices=["mdlm", "vae"])
    p.add_argument("--steps", type=int, default=30, help="timed steps of each tree")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each tree")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--core", default="0", help="the CPU core both workers share")
    p.add_argument("--out", help="JSON path for the per-step times and the summary")
    argv = sys.argv[1:] if argv is None else list(argv)
    # the Hydra overrides follow `--` (argparse would not take them after the two trees)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.overrides = argv[cut + 1 :]
    return args


def start_worker(tree: str, args) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = ["taskset", "-c", args.core, sys.executable, "-c", WORKER]
    proc = subprocess.Popen(
        [*cmd, args.loss_type, str(args.batch), *args.overrides],
        cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    while not (line := proc.stdout.readline()).startswith("ready"):
        if not line:
            raise RuntimeError(f"the worker in {tree} exited before it was ready")
    return proc, line.split()


def main(argv=None) -> dict:
    args = parse_args(argv)
    workers = [start_worker(tree, args) for tree in (args.tree_a, args.tree_b)]
    times: list[list[float]] = [[], []]
    for i in range(args.warmup + args.steps):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            proc = workers[j][0]
            proc.stdin.write("step\n")
            proc.stdin.flush()
            seconds = float(proc.stdout.readline())
            if i >= args.warmup:
                times[j].append(seconds)
    for proc, _ in workers:
        proc.stdin.close()
        proc.wait()
    length = int(workers[1][1][2])
    ratios = sorted(a / b for a, b in zip(*times, strict=True))
    ms = [1e3 * statistics.median(t) for t in times]
    precision = [workers[0][1][1], workers[1][1][1]]
    quartiles = [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]]
    summary = {
        "loss_type": args.loss_type,
        "precision": {"a": precision[0], "b": precision[1]},
        "ms_per_step": {"a": ms[0], "b": ms[1]},
        "tokens_per_s": {k: 1e3 * args.batch * length / m for k, m in zip("ab", ms, strict=True)},
        "speedup_b_over_a": statistics.median(ratios),
        "speedup_p25_p75": quartiles,
    }
    print(
        f"{args.loss_type}: A {ms[0]:.0f} ms/step ({precision[0]}), B {ms[1]:.0f} ms/step"
        f" ({precision[1]}); B is {summary['speedup_b_over_a']:.2f}x A (median of"
        f" {len(ratios)} paired steps, quartiles {quartiles[0]:.2f}-{quartiles[1]:.2f})"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "seconds": times}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()

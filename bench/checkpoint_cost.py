"""Seconds per checkpoint save, through the save path training uses, as JSON.

    python bench/checkpoint_cost.py                          # model=small VADD on CPU, 3 saves
    python bench/checkpoint_cost.py --repeats 5 -- model=cpu # any Hydra override after `--`

Default shapes: model=small decoder=small (GenDIT + InferDIT, ~300M parameters with
untied GPT-2 embeddings), data=bible-gpt2 (GPT-2's 50257 tokens, offline), fp32 on CPU.
The run builds the trainer and module like main.py (runner.build_trainer, build_module),
trains `--steps` optimiser steps on random token ids (so AdamW moments and the EMA
exist), and then, on the last training batch, where ModelCheckpoint saves, calls
`trainer.save_checkpoint` `--repeats` times: what every periodic, last and best
checkpoint does (Lightning collects weights, EMA, optimiser, scheduler, RNG states, then
writes atomically: serialise to memory, one file write). Reported: the median seconds per
save, every repeat, the file size and its parts. The file is written to the OS page
cache; flushing to the disk happens later, in the background.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's modules are top level
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import dataloader  # noqa: E402
import runner  # noqa: E402
from config_check import validate_config  # noqa: E402

DEFAULT_OVERRIDES = [
    "model=small",
    "decoder=small",
    "data=bible-gpt2",
    "training.loss_type=vae",
    "model.length=128",  # the sequence length does not change the checkpoint
    "loader.global_batch_size=2",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="saves timed (the median is reported)")
    p.add_argument("--steps", type=int, default=1, help="optimiser steps before saving")
    p.add_argument("--dir", default=None, help="where the checkpoint is written (default: tmp)")
    p.add_argument("--out", default="outputs/bench/checkpoint_cost.json", help="JSON result")
    args = p.parse_args(argv[:split])
    args.overrides = [*DEFAULT_OVERRIDES, *argv[split + 1 :]]
    return args


def compose_cfg(args: argparse.Namespace, workdir: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=[f"checkpointing.save_dir={workdir}", *args.overrides])
    with open_dict(cfg):
        cfg.mode, cfg.logger, cfg.callbacks = "train", "none", {}  # only our saves
        cfg.eval.output_dir = workdir
        t = cfg.trainer
        t.accelerator, t.devices, t.num_nodes, t.max_steps = "cpu", 1, 1, args.steps
        t.precision = "32-true" if t.precision == "auto" else t.precision
        t.limit_val_batches, t.num_sanity_val_steps = 0, 0
        t.enable_progress_bar, t.enable_model_summary = False, False
    validate_config(cfg)
    runner.derive_batch_sizes(cfg, 1)
    return cfg


class TimedSaves(Callback):
    """On the last training batch, save `repeats` times to `path` and time each save."""

    def __init__(self, path: str, repeats: int):
        self.path, self.repeats = path, repeats
        self.seconds: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step < trainer.max_steps or pl_module._micro != 0:
            return
        for _ in range(self.repeats):
            start = time.perf_counter()
            trainer.save_checkpoint(self.path)
            self.seconds.append(time.perf_counter() - start)


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def random_rows(cfg: DictConfig, vocab: int) -> DataLoader:
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = cfg.loader.global_batch_size * cfg.trainer.max_steps  # exactly the steps run
    ids = torch.randint(0, vocab, (rows, cfg.model.length), generator=gen)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    return DataLoader(data, batch_size=cfg.loader.batch_size)


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        cfg = compose_cfg(args, workdir)
        tokenizer = dataloader.get_tokenizer(cfg.data)
        trainer = runner.build_trainer(cfg)
        saves = TimedSaves(os.path.join(workdir, "timed.ckpt"), args.repeats)
        trainer.callbacks.append(saves)
        module = runner.build_module(cfg, tokenizer)
        trainer.fit(module, random_rows(cfg, module.vocab.size))
        size = os.path.getsize(saves.path)
        ckpt = torch.load(saves.path, map_location="cpu", mmap=True, weights_only=True)
        parts = {k: tensor_bytes(ckpt.get(k)) for k in ("state_dict", "ema", "optimizer_states")}
    params = sum(p.numel() for p in module.trainable_parameters())
    median = statistics.median(saves.seconds)
    return {
        "schema": "vadd-checkpoint-cost/1",
        "seconds_per_save": round(median, 3),
        "repeats": [round(s, 3) for s in saves.seconds],
        "file_bytes": size,
        "file_gb": round(size / 1e9, 3),
        "write_gb_per_s": round(size / 1e9 / median, 3),
        "bytes_by_part": parts,
        "trainable_parameters": params,
        "path": "trainer.save_checkpoint (Lightning: dump_checkpoint + atomic torch.save)",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "overrides": args.overrides,
        "config": {"model": cfg.model.name, "decoder": cfg.decoder.name, "data": cfg.data.name},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_per_save", "repeats", "file_gb")}))
    return result


if __name__ == "__main__":
    main()

"""Sample quality vs number of sampling steps, several models side by side.

For every run and step count T, runs `main.py mode=sample_eval sampling.steps=T
eval.checkpoint_path=<CHECKPOINT>` in its own process (`hydra.run.dir=<out>/<run>/T<T>`),
reads the samples JSON it wrote and collects gen-PPL (when the samples were scored:
eval.compute_generative_perplexity=True), unigram entropy, NFE per sequence and seconds.

  python scripts/steps_sweep.py --out outputs/steps --steps 16 32 64 128 \\
      --run "VADD fixz=True" vadd.ckpt sampling.fixz=True sampling.predictor=vae_cache \\
      --run "VADD fixz=False" vadd.ckpt sampling.fixz=False \\
      --run MDLM mdlm.ckpt training.loss_type=mdlm sampling.predictor=ddpm_cache \\
      -- model=small model.length=1024 eval.compute_generative_perplexity=True

A run is `--run NAME CHECKPOINT [OVERRIDE ...]`: a display name (its folder is the name
with other characters than letters, digits and ._+- replaced by _), a checkpoint, and
Hydra overrides for this run only. Overrides after `--` go to every run; a run's own
overrides come after them and win. Hydra print flags after `--` (`--cfg job`) print each
call's config instead of sampling.

Writes <out>/steps_sweep.json (per run and T: gen_ppl or null, unigram_entropy,
nfe_per_sequence, seconds, or the error) and <out>/steps_sweep.png (gen-PPL and unigram
entropy vs steps, one curve per run; entropy only when no gen-PPL was computed). Exits 1
if any (run, T) failed, after writing both files.
"""

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from zero_shot_sweep import (
    hydra_value,
    prints_only,
    run_main,
    run_parallel,
    split_at_double_dash,
    write_json,
)

STEPS = [16, 32, 64, 128, 256, 512, 1024]
COLLECTED = ["unigram_entropy", "nfe_per_sequence", "seconds", "num_samples", "predictor", "fixz"]


@dataclass
class Run:
    name: str
    checkpoint: str
    overrides: list[str]

    @property
    def folder(self) -> str:
        return re.sub(r"[^\w.+-]", "_", self.name)


@dataclass
class Job:
    run: Run
    steps: int

    def overrides(self, common: list[str]) -> list[str]:
        return [
            "mode=sample_eval",
            *common,
            f"eval.checkpoint_path={hydra_value(self.run.checkpoint)}",
            *self.run.overrides,
            f"sampling.steps={self.steps}",
        ]

    def dir(self, out: Path) -> Path:
        return out / self.run.folder / f"T{self.steps}"


def sample(job: Job, out: Path, common: list[str]) -> dict:
    """One sample_eval run -> its numbers, or its error."""
    run_dir = job.dir(out)
    for stale in run_dir.glob("samples_*.json"):  # never report a previous run's samples
        stale.unlink()
    done = run_main(job.overrides(common), run_dir)
    found = sorted(run_dir.glob("samples_*.json"), key=lambda p: p.stat().st_mtime)
    error = done.error or (None if found else f"main.py finished but wrote no samples in {run_dir}")
    record = {"steps": job.steps, "returncode": done.returncode, "wall_seconds": done.wall_seconds}
    tag = f"[steps_sweep] {job.run.name} T={job.steps}"
    if error is not None:
        print(f"{tag}: FAILED: {error}", flush=True)
        return {**record, "status": "failed", "error": error}
    saved = json.loads(found[-1].read_text())
    numbers = {key: saved.get(key) for key in COLLECTED}
    gen_ppl = {k: v for k, v in saved.items() if k.startswith("gen_ppl") and _scalar(v)}
    print(
        f"{tag}: entropy {_num(numbers['unigram_entropy'])}, gen-PPL {_num(gen_ppl.get('gen_ppl'))}"
    )
    return {
        **record,
        "status": "ok",
        "gen_ppl": None,
        **gen_ppl,
        **numbers,
        "judge": _judge(saved) if gen_ppl else None,
        "samples_file": str(found[-1]),
    }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _judge(saved: dict) -> str | None:
    return saved.get("config", {}).get("eval", {}).get("gen_ppl_eval_model_name_or_path")


def plot(summary: dict, path: Path) -> None:
    """gen-PPL (when computed) and unigram entropy vs steps, one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    has_ppl = any(r.get("gen_ppl") is not None for run in runs.values() for r in run["results"])
    judge = summary.get("judge")
    panels = [("unigram_entropy", "unigram entropy (nats)")]
    if has_ppl:
        panels.insert(0, ("gen_ppl", "gen-PPL" + (f" (judge: {judge})" if judge else "")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for name, run in runs.items():
            points = [(r["steps"], r[key]) for r in run["results"] if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(summary["steps"], [str(t) for t in summary["steps"]])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if not has_ppl:
        axes[0][0].set_title(
            "gen-PPL not computed: set eval.compute_generative_perplexity=True", fontsize=9
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        usage="%(prog)s --run NAME CHECKPOINT [OVERRIDE ...] [--run ...] [--steps T [T ...]]"
        " [--out DIR] [--jobs N] [-- OVERRIDE ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=STEPS,
        metavar="T",
        help="sampling step counts (default: %(default)s)",
    )
    parser.add_argument(
        "--run",
        nargs="+",
        action="append",
        required=True,
        metavar="ARG",
        help="a model to sample: NAME CHECKPOINT [OVERRIDE ...] (repeat for each model)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/steps_sweep"),
        metavar="DIR",
        help="results folder",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="(run, T) pairs sampled at once (default 1; >1 shares devices and skews `seconds`)",
    )
    args = parser.parse_args(argv)
    if any(len(r) < 2 for r in args.run):
        parser.error("--run needs NAME CHECKPOINT [OVERRIDE ...]")
    if any(t < 1 for t in args.steps):
        parser.error(f"--steps must be positive, got {args.steps}")
    args.steps = sorted(set(args.steps))
    args.runs = [Run(r[0], r[1], r[2:]) for r in args.run]
    folders = [run.folder for run in args.runs]
    if len(set(folders)) != len(folders):
        parser.error(f"--run names must differ (as folders: {folders})")
    return args


def main() -> int:
    argv, common = split_at_double_dash(sys.argv[1:])
    args = parse_args(argv)
    out = args.out.resolve()
    jobs = [Job(run, t) for run in args.runs for t in args.steps]
    if prints_only(common):
        return max(run_main(job.overrides(common), job.dir(out)).returncode for job in jobs)
    records = run_parallel(lambda job: sample(job, out, common), jobs, args.jobs)
    runs = {
        run.name: {
            "checkpoint": run.checkpoint,
            "overrides": run.overrides,
            "folder": run.folder,
            "results": [r for job, r in zip(jobs, records, strict=True) if job.run is run],
        }
        for run in args.runs
    }
    judges = {r["judge"] for r in records if r.get("judge")}
    summary = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "steps": args.steps,
        "overrides": common,
        "judge": ", ".join(sorted(judges)) or None,
        "runs": runs,
        "failed": [
            f"{job.run.name} T={job.steps}"
            for job, r in zip(jobs, records, strict=True)
            if r["status"] != "ok"
        ],
    }
    write_json(out / "steps_sweep.json", summary)
    plot(summary, out / "steps_sweep.png")
    ok = len(jobs) - len(summary["failed"])
    print(f"[steps_sweep] {ok}/{len(jobs)} ok -> {out}/steps_sweep.json, steps_sweep.png")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Sample quality vs number of sampling steps, several models side by side.

For every run, one `main.py mode=sample_eval sampling.steps=[T1,T2,...]
eval.checkpoint_path=<CHECKPOINT>` process (`hydra.run.dir=<out>/<run>`) samples at every
step count: the checkpoint and the judge load once. The sweep reads the samples JSON of
each T and collects gen-PPL (when the samples were scored:
eval.compute_generative_perplexity=True), unigram entropy, NFE per sequence and seconds.
Step counts whose samples the same command wrote before are not sampled again (`--force`
redoes them); each T's result line is echoed as it comes.

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
    Finished,
    hydra_value,
    prints_only,
    reuse_results,
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


def overrides(run: Run, common: list[str]) -> list[str]:
    """main.py's overrides for `run`, without the step counts."""
    checkpoint = f"eval.checkpoint_path={hydra_value(run.checkpoint)}"
    return ["mode=sample_eval", *common, checkpoint, *run.overrides]


def samples_file(run_dir: Path, steps: int) -> Path | None:
    """The newest samples JSON main.py wrote for `steps` (samples_<predictor>_T<steps>...)."""
    mine = re.compile(rf"^samples_.+_T{steps}(_.+)?\.json$")
    found = [p for p in run_dir.glob("samples_*.json") if mine.match(p.name)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def sample_run(run: Run, steps: list[int], out: Path, common: list[str], force: bool) -> list:
    """All step counts of one run in one main.py process (`sampling.steps=[...]`: the
    checkpoint and the judge load once); step counts whose samples the same command wrote
    before are not sampled again (unless `force`). One record per step count."""
    run_dir, command = out / run.folder, overrides(run, common)
    reuse_results(run_dir, command, list(run_dir.glob("samples_*")), force, run.checkpoint)
    todo = [t for t in steps if samples_file(run_dir, t) is None]
    tag = f"[steps_sweep] {run.name}"
    done = Finished(0, 0.0, None)
    if todo:
        print(f"{tag}: sampling at T = {todo} ({len(steps) - len(todo)} done before)", flush=True)
        done = run_main([*command, f"sampling.steps=[{','.join(map(str, todo))}]"], run_dir, tag)
    else:
        print(f"{tag}: all {len(steps)} step counts done before (--force to redo)", flush=True)
    return [collect(run, t, run_dir, done, reused=t not in todo) for t in steps]


def collect(run: Run, steps: int, run_dir: Path, done: Finished, reused: bool) -> dict:
    """The numbers of one step count's samples file, or why there is none."""
    found = samples_file(run_dir, steps)
    record = {"steps": steps, "returncode": done.returncode, "process_seconds": done.wall_seconds}
    record["reused"] = reused
    tag = f"[steps_sweep] {run.name} T={steps}"
    if found is None:
        error = done.error or f"main.py finished but wrote no samples for T={steps} in {run_dir}"
        print(f"{tag}: FAILED: {error}", flush=True)
        return {**record, "status": "failed", "error": error}
    saved = json.loads(found.read_text())
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
        "samples_file": str(found),
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
        help="runs sampled at once (default 1; >1 shares devices and skews `seconds`)",
    )
    parser.add_argument(
        "--force", action="store_true", help="sample again what an earlier run finished"
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
    if prints_only(common):
        steps = f"sampling.steps=[{','.join(map(str, args.steps))}]"
        return max(
            run_main([*overrides(run, common), steps], out / run.folder).returncode
            for run in args.runs
        )
    per_run = run_parallel(
        lambda run: sample_run(run, args.steps, out, common, args.force), args.runs, args.jobs
    )
    runs = {
        run.name: {
            "checkpoint": run.checkpoint,
            "overrides": run.overrides,
            "folder": run.folder,
            "results": results,
        }
        for run, results in zip(args.runs, per_run, strict=True)
    }
    records = [r for results in per_run for r in results]
    judges = {r["judge"] for r in records if r.get("judge")}
    summary = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "steps": args.steps,
        "overrides": common,
        "judge": ", ".join(sorted(judges)) or None,
        "runs": runs,
        "failed": [
            f"{name} T={r['steps']}"
            for name, run in runs.items()
            for r in run["results"]
            if r["status"] != "ok"
        ],
    }
    write_json(out / "steps_sweep.json", summary)
    plot(summary, out / "steps_sweep.png")
    ok = len(records) - len(summary["failed"])
    print(f"[steps_sweep] {ok}/{len(records)} ok -> {out}/steps_sweep.json, steps_sweep.png")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

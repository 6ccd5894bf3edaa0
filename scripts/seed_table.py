"""Mean and spread over seeds of several steps_sweep.json files (one per seed).

  python scripts/seed_table.py outputs/steps_seed1/steps_sweep.json \\
      outputs/steps_seed2/steps_sweep.json outputs/steps_seed3/steps_sweep.json

Prints a markdown table per metric (gen-PPL, unigram entropy): one row per run name, one
column per step count, each cell mean ± standard deviation over the files (the seeds),
and writes the same numbers as JSON next to the first file (seed_table.json) or to --out.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = ("gen_ppl", "unigram_entropy")


def collect(paths: list[Path]) -> dict:
    """{run: {T: {metric: [value per file]}}} over the files that have the value."""
    table: dict = {}
    for path in paths:
        sweep = json.loads(path.read_text())
        for name, run in sweep["runs"].items():
            for result in run["results"]:
                if result.get("status") != "ok":
                    continue
                cell = table.setdefault(name, {}).setdefault(result["steps"], {})
                for metric in METRICS:
                    if result.get(metric) is not None:
                        cell.setdefault(metric, []).append(float(result[metric]))
    return table


def summarise(table: dict) -> dict:
    out = {}
    for name, by_steps in table.items():
        for steps, metrics in by_steps.items():
            for metric, values in metrics.items():
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                out.setdefault(metric, {}).setdefault(name, {})[steps] = {
                    "mean": statistics.fmean(values),
                    "std": spread,
                    "per_seed": values,
                }
    return out


def markdown(summary: dict) -> str:
    lines = []
    for metric, runs in summary.items():
        steps = sorted({t for cells in runs.values() for t in cells})
        lines += [f"{metric}:", "", "| run | " + " | ".join(f"T={t}" for t in steps) + " |"]
        lines.append("|---|" + "---|" * len(steps))
        for name, cells in runs.items():
            row = [
                f"{cells[t]['mean']:.2f} ± {cells[t]['std']:.2f}" if t in cells else "-"
                for t in steps
            ]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("sweeps", type=Path, nargs="+", help="steps_sweep.json, one per seed")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: beside the first)")
    args = p.parse_args(argv)
    missing = [str(s) for s in args.sweeps if not s.is_file()]
    if missing:
        print(f"error: {missing[0]} does not exist: pass steps_sweep.json files", file=sys.stderr)
        return 2
    summary = summarise(collect(args.sweeps))
    out = args.out or args.sweeps[0].parent / "seed_table.json"
    out.write_text(json.dumps({"files": [str(s) for s in args.sweeps], **summary}, indent=2))
    print(markdown(summary))
    print(f"[seed_table] {len(args.sweeps)} file(s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Interleaved before/after runs of bench.py in two code trees, and their summary.

Runs `bench.py` (each tree's own) alternately in tree A and tree B, `--pairs` times,
swapping which goes first each pair, so slow spells of a shared machine hit both. Writes
`a<i>.json` / `b<i>.json` to `--out-dir` and prints, per loss type and phase, both
medians, their ratio and the per-pair ratios.

    git worktree add /tmp/base c77b3aa
    python bench/pairs.py /tmp/base . --out-dir bench/results/x --pairs 6 \
        --bench-args "--loss-types vae --repeats 5 --steps-per-repeat 6 --sample-steps 16"
    python bench/pairs.py --summarize bench/results/x          # summary only
"""

import argparse
import glob
import json
import os
import shlex
import statistics
import subprocess
import sys


def run_pairs(tree_a: str, tree_b: str, out_dir: str, pairs: int, bench_args: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for i in range(pairs):
        order = (("a", tree_a), ("b", tree_b))
        for name, tree in order if i % 2 == 0 else order[::-1]:
            out = os.path.abspath(os.path.join(out_dir, f"{name}{i}.json"))
            cmd = [sys.executable, "bench/bench.py", *shlex.split(bench_args), "--out", out]
            subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
            print(f"pair {i}: {name} done", flush=True)


def summarize(out_dir: str) -> dict:
    runs = {name: {} for name in "ab"}
    for path in glob.glob(os.path.join(out_dir, "[ab]*.json")):
        name, index = os.path.basename(path)[0], int(os.path.basename(path)[1:-5])
        with open(path) as f:
            runs[name][index] = json.load(f)["results"]
    both = sorted(set(runs["a"]) & set(runs["b"]))
    summary = {}
    for loss in runs["b"][both[0]]:
        for phase in ("train", "ppl_eval"):
            a = [runs["a"][i][loss][phase]["tokens_per_s"]["value"] for i in both]
            b = [runs["b"][i][loss][phase]["tokens_per_s"]["value"] for i in both]
            ratios = sorted(y / x for x, y in zip(a, b, strict=True))
            row = {
                "a_median": statistics.median(a),
                "b_median": statistics.median(b),
                "ratio_of_medians": statistics.median(b) / statistics.median(a),
                "pair_ratios": ratios,
            }
            summary[f"{loss}/{phase}"] = row
            print(
                f"{loss:5s} {phase:8s} tok/s A {row['a_median'] / 1e3:.1f}k -> B"
                f" {row['b_median'] / 1e3:.1f}k = {row['ratio_of_medians']:.2f}x;"
                f" per-pair {' '.join(f'{r:.2f}' for r in ratios)} ({len(both)} pairs)"
            )
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree_a", nargs="?")
    p.add_argument("tree_b", nargs="?")
    p.add_argument("--out-dir", required=False)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--bench-args", default="--repeats 5 --steps-per-repeat 6 --sample-steps 16")
    p.add_argument("--summarize", metavar="DIR", help="only print the summary of DIR")
    args = p.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return
    if not (args.tree_a and args.tree_b and args.out_dir):
        p.error("give TREE_A TREE_B and --out-dir (or --summarize DIR)")
    run_pairs(args.tree_a, args.tree_b, args.out_dir, args.pairs, args.bench_args)
    summarize(args.out_dir)


if __name__ == "__main__":
    main()

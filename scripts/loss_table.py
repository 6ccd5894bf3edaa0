"""The validation bound of each loss on the embedded default at equal steps (issue 16).

  python scripts/loss_table.py --out outputs/loss_table --steps 300

Trains each run with `python main.py` (data=bible, model=cpu, recipe=cpu: the embedded
default) for the same number of steps, then evaluates it with `mode=ppl_eval`: its own
bound (named as ppl_eval.json names it, over `--ppl-times` Monte-Carlo draws) and, for
models without a latent, the exact any-order AR NLL in the forward order
(`eval.any_order=forward`), a number every such model has. Writes <out>/loss_table.json
and prints a markdown table. Extra arguments after `--` go to every command. A rerun into
the same --out reuses each trained checkpoint (--force retrains).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "t-DCE = MDLM (DiT)": ["training.loss_type=mdlm"],
    "t-DCE (RADD net)": ["training.loss_type=t_DCE", "backbone=radd"],
    "lambda-DCE (RADD net)": ["training.loss_type=lambda_DCE", "backbone=radd"],
    "k-DCE (RADD net)": ["training.loss_type=k_DCE", "backbone=radd"],
    "t-DSE (RADD net)": ["training.loss_type=t_DSE", "backbone=radd"],
    "SEDD score entropy (DiT, time-conditioned)": [
        "parameterization=sedd", "training.loss_type=t_DSE", "time_conditioning=True",
    ],
    "VADD (DiT decoder + encoder)": ["training.loss_type=vae"],
}  # fmt: skip


def run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"[loss_table] failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - start


def one_run(name: str, args: list[str], opts, extra: list[str]) -> dict:
    folder = opts.out / name.split(" (")[0].replace(" ", "_").replace("=", "")
    folder.mkdir(parents=True, exist_ok=True)
    common = [f"seed={opts.seed}", *args, *extra]
    ckpt = folder / "checkpoints" / "last.ckpt"
    summary = folder / "train_summary.json"
    if summary.exists() and ckpt.exists() and not opts.force:  # a rerun reuses the training
        train_s = json.loads(summary.read_text()).get("wall_seconds", float("nan"))
    else:
        train_s = run(
            [sys.executable, "main.py", f"hydra.run.dir={folder}", *common,
             f"trainer.max_steps={opts.steps}", "sampling.num_sample_batches=0"],
            folder / "train.log",
        )  # fmt: skip
    latent = any(a.endswith("loss_type=vae") for a in args)
    order = [] if latent else ["eval.any_order=forward"]
    eval_s = run([sys.executable, "main.py", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}",
                  f"hydra.run.dir={folder / 'eval'}", f"+eval.ppl_times={opts.ppl_times}",
                  f"eval.limit_batches={opts.eval_batches}", *order, *common],
                 folder / "eval.log")  # fmt: skip
    result = json.loads((folder / "eval" / "ppl_eval.json").read_text())
    return {
        "name": name,
        "overrides": args,
        "bound": result["bound"],
        "nll": result["nll"],
        "ppl": result["ppl"],
        "nll_std_over_draws": result.get("nll_std"),
        "any_order_nll": result.get("any_order_nll"),
        "any_order_ppl": result.get("any_order_ppl"),
        "tokens": result["tokens"],
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
    }


def markdown(rows: list[dict], steps: int) -> str:
    lines = [
        f"| run ({steps} steps) | bound | nll/token ± sd over draws | ppl | exact forward AO nll "
        "(ppl) | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        sd = f" ± {r['nll_std_over_draws']:.3f}" if r["nll_std_over_draws"] else ""
        ao = (
            "-"
            if r["any_order_nll"] is None
            else f"{r['any_order_nll']:.3f} ({r['any_order_ppl']:.1f})"
        )
        lines.append(f"| {r['name']} | {r['bound']} | {r['nll']:.3f}{sd} | {r['ppl']:.1f} | {ao} "
                     f"| {r['train_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    else:
        extra = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/loss_table"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ppl-times", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="run names (substrings) to run")
    parser.add_argument("--force", action="store_true", help="retrain runs trained already")
    opts = parser.parse_args(argv)
    runs = {k: v for k, v in RUNS.items() if not opts.only or any(s in k for s in opts.only)}
    rows = []
    for name, args in runs.items():
        rows.append(one_run(name, args, opts, extra))
        print(f"[loss_table] {name}: {rows[-1]['bound']} nll {rows[-1]['nll']:.4f}", flush=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    table = {"steps": opts.steps, "ppl_times": opts.ppl_times, "eval_batches": opts.eval_batches,
             "extra": extra, "rows": rows}  # fmt: skip
    (opts.out / "loss_table.json").write_text(json.dumps(table, indent=2))
    print(markdown(rows, opts.steps))


if __name__ == "__main__":
    main(sys.argv[1:])

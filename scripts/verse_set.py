"""Few-step sampling on text whose distribution is known: MDLM vs VADD (data=verse_set).

The text analogue of scripts/checkerboard.py, through the real code path: main.py's
training job (GenDIT / InferDIT / DiT, the embedded default's BPE, `recipe=verse_set`),
then sampling.generation.generate (`ddpm_cache` for MDLM, `vae_cache` with fixz True and
False for VADD), from BOS given. The data are N distinct rows of BOS + 15 verse-opening
tokens, uniformly (data/text_set.py), so every sample is scored exactly: precision (a
member or not) and coverage (members found), beside what exact draws reach; the judge's
gen-PPL (of the first --judge-samples of each cell) and the unigram entropy beside them.

Equal training compute: MDLM gets more steps, in the ratio of the two models' matmul
parameters per training step (decoder vs decoder + encoder; embedding tables excluded,
they are a lookup). Per seed: MDLM and VADD trained, then --num-samples samples at each
T of --sample-steps. Writes <out>/verse_set.json (mean +- std over seeds, settings, wall
time per phase) and <out>/verse_set.png.

  python scripts/verse_set.py --out outputs/verse_set          # 3 seeds, ~13 min on 2 CPUs
  python scripts/verse_set.py --seeds 1 --steps 200 --out /tmp/vs --judge none  # a quick look
"""

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

from data import text_set  # noqa: E402
from utils import write_json  # noqa: E402

ALGOS = ("mdlm", "vae")
# The cache variants skip the network for rows with nothing to reveal and draw the same
# samples as `ddpm` / `vae` for the same seed (sampling/samplers.py): at T = 64 most steps
# reveal nothing in a 15-token row (13.5 network calls per sample instead of 64).
SAMPLERS = {  # name in the tables -> (algorithm, predictor, fixz)
    "MDLM": ("mdlm", "ddpm_cache", None),
    "VADD fixz=True": ("vae", "vae_cache", True),
    "VADD fixz=False": ("vae", "vae_cache", False),
}


# VADD trained with the fixed-z bound (training.kl_weighting=once, algorithms/losses.py) of a 2-step
# sampler: each nat z carries costs one nat once, and a 2-step chain cannot model the
# set without z, so z learns to name the member. (With kl_weighting=time the z-free bound
# already reaches log N at the optimum and z carries ~0.3 nats here; README.)
DEFAULT_VADD = ["T=2", "training.kl_weighting=once", "decoder.mask_struc=none",
                "decoder.fade_to_prior=False"]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/verse_set"))
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (1, 2, ...)")
    p.add_argument("--steps", type=int, default=None, help="VADD training steps (recipe's)")
    p.add_argument("--sample-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--num-samples", type=int, default=256, help="samples per (model, T)")
    p.add_argument("--judge", default="smollm2", help="gen-PPL judge, or 'none'")
    p.add_argument("--judge-samples", type=int, default=64,
                   help="gen-PPL of the first K samples of each cell (precision, coverage, "
                   "entropy: all); the judge is most of the wall otherwise")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one job = model, seed)")
    p.add_argument("--vadd", action="append", default=None, metavar="KEY=VALUE",
                   help="a Hydra override for the VADD model only (repeatable); given once "
                   f"or more, it replaces the default {' '.join(DEFAULT_VADD)}")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both models")
    args = p.parse_args(argv)
    for flag in ("judge_samples", "num_samples"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    args.vadd = DEFAULT_VADD if args.vadd is None else args.vadd
    return args


def compose(out: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return hydra_compose(
            "config",
            overrides=[
                "data=verse_set",
                "recipe=verse_set",
                "trainer.enable_progress_bar=False",
                "trainer.enable_model_summary=False",
                f"checkpointing.save_dir={out}",
                f"eval.output_dir={out}",
                *overrides,
            ],
        )


def matmul_params(module) -> int:
    """Parameters a training step multiplies by (embedding tables are lookups)."""
    return sum(
        p.numel()
        for net in module.networks()
        for name, p in net.named_parameters()
        if "vocab_embed" not in name
    )


def train_and_sample(job: dict) -> dict:
    """One worker job: train one model with one seed, then sample it at every T."""
    import torch

    torch.set_num_threads(1)
    import main
    import runner
    from checkpointing.checkpoints import load_for_eval, read_checkpoint
    from config_check import validate_config
    from data import text_set
    from dataloader import get_tokenizer
    from sampling.generation import generate

    out = Path(job["out"])
    cfg = compose(out, job["overrides"])
    validate_config(cfg)
    start = time.time()
    main.run(cfg)  # the training job of `python main.py`
    train_seconds = time.time() - start
    ckpt = read_checkpoint(str(out / "checkpoints" / "last.ckpt"))
    tokenizer = get_tokenizer(cfg.data)
    module = runner.build_module(cfg, tokenizer)  # cfg's batch sizes were derived by main.run
    load_for_eval(module, ckpt, "last.ckpt")
    member_rows = text_set.members(cfg.data, tokenizer, int(cfg.model.length))
    frame = text_set.sampling_frame(tokenizer, int(cfg.model.length), module.vocab.mask_id)
    results, texts = {}, {}
    for name, (algo, predictor, fixz) in SAMPLERS.items():
        if algo != job["algo"]:
            continue
        for steps in job["sample_steps"]:
            gen = torch.Generator().manual_seed(1000 + job["seed"])
            x, stats = generate(
                module,
                num_samples=job["num_samples"],
                x_init=frame.expand(job["num_samples"], -1).clone(),  # BOS given
                predictor=predictor,
                steps=steps,
                fixz=bool(fixz),
                generator=gen,
            )
            key = f"{name}|{steps}"
            results[key] = {**text_set.set_scores(x, member_rows), "nfe": stats["nfe_per_sequence"]}
            texts[key] = tokenizer.batch_decode(x.tolist())
    return {
        "algo": job["algo"],
        "seed": job["seed"],
        "train_steps": int(cfg.trainer.max_steps),
        "train_seconds": round(train_seconds, 1),
        "final_validation": {k: v for k, v in module.results.items() if isinstance(v, float)}
        or _last_validation(out),
        "scores": results,
        "texts": texts,
        "members": tokenizer.batch_decode(member_rows.tolist()),
        "params": matmul_params(module),
    }


def _last_validation(out: Path) -> dict:
    """The last row of validation metrics the training run logged (logs/metrics.csv)."""
    import csv

    path = out / "logs" / "metrics.csv"
    if not path.exists():
        return {}
    rows = [r for r in csv.DictReader(path.open()) if r.get("val/nll")] or [{}]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def compute_matched_steps(vadd_steps: int, overrides: list[str]) -> tuple[int, float]:
    """MDLM's step count for the compute of `vadd_steps` VADD steps, and the ratio."""
    import torch

    import runner
    from dataloader import get_tokenizer

    cfgs = [compose(Path("/tmp"), [f"training.loss_type={a}", *overrides]) for a in ALGOS]
    for cfg in cfgs:
        runner.derive_batch_sizes(cfg, 1)
    tokenizer = get_tokenizer(cfgs[0].data)
    torch.manual_seed(0)
    mdlm, vadd = (matmul_params(runner.build_module(c, tokenizer)) for c in cfgs)
    ratio = vadd / mdlm
    return round(vadd_steps * ratio), ratio


def summarise(runs: list[dict], judge_scores: dict) -> dict:
    table = {}
    for name in SAMPLERS:
        rows = {}
        for key in sorted({k for r in runs for k in r["scores"] if k.startswith(name + "|")}):
            steps = int(key.split("|")[1])
            per_seed = [r["scores"][key] for r in runs if key in r["scores"]]
            row = {}
            for metric in ("precision", "coverage", "coverage_of_exact_draws", "nfe"):
                values = [s[metric] for s in per_seed]
                row[metric] = _mean_std(values)
            for metric in ("gen_ppl", "unigram_entropy"):
                values = [
                    judge_scores[(r["seed"], key)][metric]
                    for r in runs
                    if key in r["scores"]
                    if (r["seed"], key) in judge_scores and metric in judge_scores[(r["seed"], key)]
                ]
                if values:
                    row[metric] = _mean_std(values)
            rows[steps] = row
        table[name] = rows
    return table


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def judge_all(runs: list[dict], judge_name: str, judge_samples: int) -> tuple[dict, dict]:
    """gen-PPL (one judge load) of the first `judge_samples` of every sample set and of
    the truth; unigram entropy of every sample.

    Each distinct text is scored once: a trained model repeats the set's members, so
    most cells share their texts (gen_ppl.corpus_gen_ppl counts the repeats). The rest
    are distinct (a few-step MDLM, VADD with a new z per step): a 135M-parameter judge
    at ~0.1 s a text on one core, which the subsample keeps to a few minutes."""
    from evaluation import gen_ppl

    scores, truth = {}, {}
    members = runs[0]["members"]
    judged = {}
    if judge_name != "none":
        judge = gen_ppl.load_judge(judge_name)
        distinct = sorted(
            {t for r in runs for texts in r["texts"].values() for t in texts[:judge_samples]}
        )
        judged = gen_ppl.distinct_text_scores([*distinct, *members], judge, batch_size=64)
    for r in runs:
        for key, texts in r["texts"].items():
            entry = {"unigram_entropy": _word_entropy(texts)}
            if judged:
                entry["gen_ppl"] = gen_ppl.corpus_gen_ppl(texts[:judge_samples], judged)
            scores[(r["seed"], key)] = entry
    truth["unigram_entropy"] = _word_entropy(members)
    if judged:
        truth["gen_ppl"] = gen_ppl.corpus_gen_ppl(members, judged)
    return scores, truth


def _word_entropy(texts: list[str]) -> float:
    from evaluation import gen_ppl

    return gen_ppl.unigram_entropy([t.split() for t in texts])  # of words: any tokenizer


def plot(path: Path, table: dict, truth: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in table.items():
        steps = sorted(rows)
        for ax, metric in zip(axes, ("precision", "coverage"), strict=True):
            mean = [rows[s][metric]["mean"] for s in steps]
            std = [rows[s][metric]["std"] for s in steps]
            ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=name)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--", label="exact draws")
    axes[1].axhline(truth["coverage_of_exact_draws"], color="grey", lw=0.8, ls="--",
                    label="exact draws")  # fmt: skip
    exact = sorted((int(k), v) for k, v in truth["exact_mdlm_precision"].items())
    axes[0].plot([k for k, _ in exact], [v for _, v in exact], color="grey", lw=0.8, ls=":",
                 marker=".", label="MDLM sampler, exact p(x0 | xt)")  # fmt: skip
    for ax, title in zip(
        axes, ("precision (samples in the set)", "coverage (members found)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps T")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_jobs(args, vadd_steps: int, mdlm_steps: int) -> list[dict]:
    """One job per (seed, algorithm): its folder and its main.py overrides."""
    jobs = []
    for seed in range(1, args.seeds + 1):
        for algo, steps in (("vae", vadd_steps), ("mdlm", mdlm_steps)):
            overrides = [
                *args.overrides,
                *(args.vadd if algo == "vae" else []),
                f"training.loss_type={algo}",
                f"seed={seed}",
                f"trainer.max_steps={steps}",
                f"trainer.val_check_interval={steps}",
                f"callbacks.checkpoint_every_n_steps.every_n_train_steps={steps}",
            ]
            jobs.append(dict(algo=algo, seed=seed, out=str(args.out / f"{algo}_seed{seed}"),
                             overrides=overrides, sample_steps=args.sample_steps,
                             num_samples=args.num_samples))  # fmt: skip
    return jobs


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no shared torch state
    runs = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for run in pool.map(train_and_sample, jobs):
            secs = run["train_seconds"]
            print(f"[verse_set] trained {run['algo']} seed {run['seed']} in {secs} s", flush=True)
            runs.append(run)
    return runs


def measure(args, runs: list[dict], train_seconds: float) -> tuple[dict, dict, dict]:
    """The table over seeds, the truth (exact draws, members' gen-PPL), seconds per phase."""
    phases, start = {"train_and_sample": train_seconds}, time.time()
    judge_scores, truth = judge_all(runs, args.judge, args.judge_samples)
    phases["judge"] = time.time() - start
    exact_samples = 16 * args.num_samples  # the bound's own sampling error is small
    exact = text_set.exact_mdlm_scores(
        compose(args.out, args.overrides), args.sample_steps, exact_samples
    )
    phases["exact_draws"] = time.time() - start - phases["judge"]
    n = len(runs[0]["members"])
    truth.update(
        num_members=n,
        true_entropy_nats_per_sequence=math.log(n),
        coverage_of_exact_draws=text_set.expected_coverage(n, args.num_samples),
        exact_mdlm_precision={k: v["precision"] for k, v in exact.items()},
    )
    return summarise(runs, judge_scores), truth, phases


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    vadd_steps = args.steps or int(compose(args.out, args.overrides).trainer.max_steps)
    mdlm_steps, ratio = compute_matched_steps(vadd_steps, args.overrides)
    jobs = make_jobs(args, vadd_steps, mdlm_steps)
    print(f"[verse_set] {len(jobs)} jobs (VADD {vadd_steps} steps, MDLM {mdlm_steps} = "
          f"x{ratio:.2f} for equal compute), {args.jobs} at a time", flush=True)  # fmt: skip
    runs = run_jobs(jobs, args.jobs)
    table, truth, phases = measure(args, runs, time.time() - start)
    settings = {"vadd_train_steps": vadd_steps, "mdlm_train_steps": mdlm_steps,
                "compute_ratio": ratio, "vadd_overrides": args.vadd,
                **{k: getattr(args, k) for k in ("seeds", "num_samples", "judge",
                                                 "judge_samples", "overrides")}}  # fmt: skip
    first = {"vae": "VADD fixz=True|1", "mdlm": "MDLM|1"}
    result = {
        "experiment": "verse_set: few-step sampling of a known set of BOS + verse openings",
        "table": {name: {str(k): v for k, v in rows.items()} for name, rows in table.items()},
        "truth": truth,
        "settings": settings,
        "final_validation": {f"{r['algo']}_seed{r['seed']}": r["final_validation"] for r in runs},
        "samples_T1": {
            f"{r['algo']}_seed{r['seed']}": r["texts"].get(first[r["algo"]], [])[:5] for r in runs
        },
        "wall_seconds": round(time.time() - start, 1),
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
    }
    write_json(str(args.out / "verse_set.json"), result)  # atomic: a kill leaves no half file
    plot(args.out / "verse_set.png", table, truth)
    print(_markdown(table, truth), flush=True)
    print(f"[verse_set] {result['wall_seconds']} s -> {args.out}/verse_set.json, .png")
    return 0


def _markdown(table: dict, truth: dict) -> str:
    steps = sorted({s for rows in table.values() for s in rows})
    lines = ["| sampler | metric | " + " | ".join(f"T={s}" for s in steps) + " |"]
    lines.append("|---|---|" + "---|" * len(steps))
    for name, rows in table.items():
        for metric in ("precision", "coverage", "gen_ppl"):
            if metric not in rows[steps[0]]:
                continue
            cells = [f"{rows[s][metric]['mean']:.3f}±{rows[s][metric]['std']:.3f}" for s in steps]
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    exact = truth["exact_mdlm_precision"]
    cells = [f"{exact[str(s)]:.3f}" for s in steps]
    lines.append("| MDLM sampler, exact p(x0 given xt) | precision | " + " | ".join(cells) + " |")
    lines.append(f"truth: {json.dumps(truth)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

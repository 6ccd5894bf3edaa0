"""The 2-D checkerboard experiment: few-step sampling of MDM vs VADD (spec sections 2-4).

A sample is a pair of bin ids (x, y) (data/toy.py). With T = 1 step masked diffusion (MDM)
reveals both coordinates at once from p(x0^l | all masked), independently: it can only
produce the product of the marginals, which for the checkerboard is the uniform square.
VADD's decoder is also factorised, but given a latent z; drawing z from the prior mixes
factorised distributions, and two of them (one per parity of the square) make the board.

Trains, per seed:
  mdm         objectives.mdlm_loss, continuous time
  vadd_time   objectives.vae_loss, kl_weighting=time (the reference implementation's form)
  vadd_steps  objectives.vae_loss, kl_weighting=steps with --steps-T steps (a bound on
              -log p for a T-step sampler that redraws z every step; T = 1 is a VAE ELBO)
then draws --num-samples points at each T of --sample-steps with samplers.sample_masked
(noise removal on; VADD with fixz True and False) and scores the Jensen-Shannon divergence
(nats) of the sample histogram to the exact grid distribution. Writes
<out>/checkerboard.json (mean +- std over seeds per model, T, fixz; settings; wall time)
and <out>/checkerboard.png (true density, then a sample histogram per model and T).

  python scripts/checkerboard.py --out outputs/checkerboard            # defaults: < 15 min, 2 CPUs
  python scripts/checkerboard.py --steps 500 --seeds 1 --out /tmp/cb   # a quick look
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import utils  # noqa: E402
from algorithms import (
    losses,  # noqa: E402
    objectives,  # noqa: E402
)
from data import toy as toy_data  # noqa: E402
from models.toy_mlp import ToyEncoder, ToyMLP  # noqa: E402
from noise_schedule import LogLinear  # noqa: E402
from sampling import samplers  # noqa: E402

MODELS = ("mdm", "vadd_time", "vadd_steps")
# recipe=checkerboard's schedule: warm-up, then cosine decay to 10% (a quiet end keeps the
# samples sharp), built by the same function as the Lightning module's
LR_SCHEDULE = OmegaConf.create(
    {"name": "cosine_decay_warmup", "warmup_steps": 100, "min_lr_ratio": 0.1}
)
TRAIN_EPS = 1e-3  # smallest training time (MDLM's sampling_eps)


@dataclass
class Trained:
    name: str
    backbone: ToyMLP
    spec: objectives.DiffusionSpec
    stats: dict  # final training numbers, for the JSON


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/checkerboard"))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--bins", type=int, default=32, help="bins per coordinate = vocabulary size")
    p.add_argument("--steps", type=int, default=3000, help="training steps per model and seed")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--steps-T", type=int, default=2, help="T of kl_weighting=steps")
    p.add_argument("--init-kl-weight", type=float, default=0.0, help="KL annealing start")
    p.add_argument("--kl-hold", type=int, default=300, help="steps at init_kl_weight first")
    p.add_argument("--kl-interval", type=int, default=700, help="KL annealing length (steps)")
    p.add_argument("--time-conditioning", action="store_true")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--sample-steps", type=int, nargs="+", default=[1, 2, 5, 10, 100])
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one job = model, seed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ training


def make_spec(name: str, args) -> objectives.DiffusionSpec:
    steps_T = args.steps_T if name == "vadd_steps" else 0
    return objectives.DiffusionSpec(
        noise=LogLinear(),
        mask_id=args.bins,
        vocab_size=args.bins,
        num_steps=steps_T,
        kl_weighting="steps" if name == "vadd_steps" else "time",
        time_conditioning=args.time_conditioning,
    )


def build(name: str, args) -> tuple[ToyMLP, ToyEncoder | None]:
    latent = 0 if name == "mdm" else args.latent_dim
    net = dict(hidden=args.hidden, time_conditioning=args.time_conditioning)
    backbone = ToyMLP(args.bins + 1, n_blocks=args.blocks, latent_dim=latent, **net)
    encoder = None if name == "mdm" else ToyEncoder(args.bins + 1, latent, **net)
    return backbone, encoder


def train(name: str, seed: int, args, log_every: int = 0) -> Trained:
    """Train one model on fresh data every step (the data distribution is known exactly)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    spec = make_spec(name, args)
    backbone, encoder = build(name, args)
    params = [*backbone.parameters(), *(encoder.parameters() if encoder else [])]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = utils.build_lr_scheduler(opt, LR_SCHEDULE, args.steps)  # the module's schedule
    start, history = time.perf_counter(), []
    for step in range(args.steps):
        out, beta = loss_step(name, backbone, encoder, spec, step, args, gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(summarize(out, beta))
        if log_every and (step % log_every == 0 or step == args.steps - 1):
            print(f"  {name} seed {seed} step {step}: {history[-1]}", flush=True)
    stats = average(history[-200:])  # the last steps, for the JSON (noisy per step)
    stats["train_seconds"] = round(time.perf_counter() - start, 1)
    return Trained(name, backbone.eval(), spec, stats)


def loss_step(name, backbone, encoder, spec, step, args, gen):
    x0 = toy_data.sample_tokens(args.batch, args.bins, gen)
    t = losses.sample_t(args.batch, eps=TRAIN_EPS, antithetic=True, generator=gen)
    if name == "mdm":
        return objectives.mdlm_loss(backbone, x0, None, t, spec), 1.0
    a = args  # beta held at init_kl_weight for kl_hold steps, then the linear ramp
    beta = losses.kl_beta(step, "klweight", a.init_kl_weight, a.kl_interval, hold=a.kl_hold)
    return objectives.vae_loss(backbone, encoder, x0, None, t, spec, beta=beta), beta


def summarize(out: objectives.LossOutput, beta: float) -> dict:
    row = {"loss": out.loss.item(), "beta": beta}
    row.update({k: v.float().mean().item() for k, v in out.stats.items()})
    return row


def average(rows: list[dict]) -> dict:
    return {k: round(statistics.fmean(r[k] for r in rows), 4) for k in rows[0]}


# ------------------------------------------------------------------------------ sampling


def sample(model: Trained, steps: int, fixz: bool, n: int, seed: int) -> torch.Tensor:
    """n token pairs from `steps` reverse steps (z ~ N(0, I) for VADD)."""
    gen = torch.Generator().manual_seed(seed)
    bins = model.spec.vocab_size
    d = model.backbone.latent_dim
    latent = (lambda m: torch.randn(m, d, generator=gen)) if d > 0 else None
    denoise = lambda xt, sigma, z, out_mask: model.backbone(xt, sigma, z=z, out_mask=out_mask)
    x, _ = samplers.sample_masked(
        denoise,
        torch.full((n, 2), bins, dtype=torch.long),
        mask_id=bins,
        vocab_size=bins,
        noise=model.spec.noise,
        steps=steps,
        latent=latent,
        fixz=fixz,
        cache=True,  # rows with nothing to reveal skip the network; same samples
        time_conditioning=model.spec.time_conditioning,
        noise_removal=True,
        generator=gen,
    )
    return x


def variants(name: str) -> list[bool | None]:
    """fixz settings to sample: MDM has no latent (None)."""
    return [None] if name == "mdm" else [True, False]


def evaluate(model: Trained, seed: int, args, target: torch.Tensor) -> dict:
    """{(T, fixz): (js, histogram)} for one trained model."""
    results = {}
    for T in args.sample_steps:
        for fixz in variants(model.name):
            x = sample(model, T, bool(fixz), args.num_samples, seed=20_000 + seed)
            hist = toy_data.histogram(x, args.bins)
            results[(T, fixz)] = (toy_data.js_divergence(hist, target), hist)
    return results


# ------------------------------------------------------------------------------ reporting


def mean_std(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "per_seed": values}


def table(js: dict) -> list[dict]:
    """js {(model, T, fixz): [per seed]} -> rows with mean/std (sample std over seeds)."""
    rows = []
    for (name, T, fixz), values in js.items():
        rows.append({"model": name, "T": T, "fixz": fixz, **mean_std(values)})
    return rows


def print_table(rows: list[dict], floor: dict) -> None:
    print(f"\nJS divergence (nats) to the exact distribution; sample-noise floor {fmt(floor)}")
    for r in rows:
        fixz = "" if r["fixz"] is None else f" fixz={r['fixz']}"
        print(f"  {r['model'] + fixz:<24} T={r['T']:<4} {fmt(r)}")


def fmt(r: dict) -> str:
    return f"{r['mean']:.4f} +- {r['std']:.4f}"


def plot(path: Path, target, truth_hist, hists: dict, js: dict, args) -> None:
    """Row 0: exact density and a sample of the truth; then one row per (model, fixz)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((name, fixz) for name, _, fixz in hists))
    rows, cols = 1 + len(configs), max(2, len(args.sample_steps))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    extent = (toy_data.LOW, toy_data.HIGH, toy_data.LOW, toy_data.HIGH)
    show = lambda ax, h: ax.imshow(h.T.numpy(), origin="lower", extent=extent, cmap="viridis")
    for ax in axes.flat:  # panels left empty stay blank
        ax.axis("off")
    show(axes[0, 0], target)
    axes[0, 0].set_title("exact density", fontsize=8)
    show(axes[0, 1], truth_hist)
    axes[0, 1].set_title(f"true samples\nJS {js['truth'][0]:.4f}", fontsize=8)
    for row, (name, fixz) in enumerate(configs, start=1):
        label = name if fixz is None else f"{name}\nfixz={fixz}"
        for col, T in enumerate(args.sample_steps):
            ax = axes[row, col]
            show(ax, hists[(name, T, fixz)])
            ax.set_title(f"T={T}  JS {js[(name, T, fixz)][0]:.3f}", fontsize=8)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"checkerboard, {args.bins} bins, seed 0 (JS in nats)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings(args) -> dict:
    s = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    s.update(
        js_units="nats (natural log); JS <= log 2 = 0.6931",
        noise="loglinear, eps 1e-3",
        train_time_eps=TRAIN_EPS,
        optimizer="AdamW, weight_decay 0, grad clip 1.0, warm-up 100 then cosine to 10%",
        kl_annealing=(
            f"beta = init_kl_weight for kl_hold={args.kl_hold} steps, then losses.kl_beta"
            f"(strategy=klweight) over kl_interval={args.kl_interval} steps; sampling uses"
            " z ~ N(0, I)"
        ),
        networks="models/toy_mlp.py: ToyMLP decoder (AdaLN z), ToyEncoder (visibility input)",
        parallelism=f"{args.jobs} worker processes x {args.threads} torch thread(s)",
        sampler="samplers.sample_masked, loglinear grid 1 -> 1e-5, noise_removal, cache",
        mdm="objectives.mdlm_loss, continuous time",
        vadd_time="objectives.vae_loss, kl_weighting=time, continuous time, K=1",
        vadd_steps=f"objectives.vae_loss, kl_weighting=steps, T={args.steps_T}, K=1",
    )
    return s


def run_job(name: str, seed: int, args) -> dict:
    """Train and evaluate one (model, seed); runs in a worker process with one thread."""
    torch.set_num_threads(args.threads)
    model = train(name, seed, args)
    results = evaluate(model, seed, args, toy_data.exact_distribution(args.bins))
    print(f"seed {seed} {name}: {model.stats}", flush=True)
    return {
        "name": name,
        "seed": seed,
        "stats": model.stats,
        "js": {key: value for key, (value, _) in results.items()},
        "hists": {key: hist for key, (_, hist) in results.items()} if seed == 0 else {},
    }


def run_all(args) -> list[dict]:
    """All (model, seed) jobs, `--jobs` at a time (VADD, the slower, first)."""
    jobs = [(name, seed) for name in args.models for seed in range(args.seeds)]
    jobs.sort(key=lambda job: job[0] == "mdm")
    if args.jobs <= 1:
        return [run_job(name, seed, args) for name, seed in jobs]
    ctx = multiprocessing.get_context("spawn")  # no forked OpenMP / torch state
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_job, name, seed, args) for name, seed in jobs]
        return [f.result() for f in futures]


def truth_js(args, target: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """JS of num_samples exact draws per seed (the sampling-noise floor); seed 0's histogram."""
    values, first = [], None
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        x = toy_data.sample_tokens(args.num_samples, args.bins, gen)
        hist = toy_data.histogram(x, args.bins)
        values.append(toy_data.js_divergence(hist, target))
        first = hist if first is None else first
    return values, first


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    target = toy_data.exact_distribution(args.bins)
    outputs = run_all(args)
    js, hists, train_stats = {}, {}, {}
    for out in sorted(outputs, key=lambda o: (MODELS.index(o["name"]), o["seed"])):
        train_stats.setdefault(out["name"], []).append(out["stats"])
        for (T, fixz), value in sorted(out["js"].items(), key=lambda kv: (kv[0][0], not kv[0][1])):
            js.setdefault((out["name"], T, fixz), []).append(value)
        hists.update({(out["name"], *key): h for key, h in out["hists"].items()})
    truth, truth_hist = truth_js(args, target)
    floor = mean_std(truth)
    rows = table(js)
    print_table(rows, floor)
    plot(args.out / "checkerboard.png", target, truth_hist, hists, {**js, "truth": truth}, args)
    wall = time.perf_counter() - start
    report = {
        "results": rows,
        "truth_sample_js": floor,  # JS of num_samples true samples: the sampling-noise floor
        "mdm_independent_js": product_js(target),
        "training": train_stats,
        "settings": settings(args),
        "wall_seconds": round(wall, 1),
    }
    (args.out / "checkerboard.json").write_text(json.dumps(report, indent=2))
    print(f"wall time {wall:.0f} s -> {args.out / 'checkerboard.json'}")
    return report


def product_js(target: torch.Tensor) -> float:
    """JS of the product of the true marginals: what an exact MDM gives at T = 1."""
    return toy_data.js_divergence(toy_data.product_of_marginals(target), target)


if __name__ == "__main__":
    main()

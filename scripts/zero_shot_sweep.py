"""Zero-shot perplexity of one checkpoint on many datasets, collected into one table.

Runs `main.py -m mode=ppl_eval data=<a>,<b>,...` once for the named datasets (Hydra
multirun in one process: start-up and the checkpoint read once; each writes
<out>/<name>/), and a process of its own for an aliased dataset or one with a path;
everything after `--` is passed to every run. A dataset that fails (not downloadable
offline, a bad path) is recorded with its one-line error and the sweep goes on.

  python scripts/zero_shot_sweep.py --out outputs/zero_shot -- \\
      eval.checkpoint_path=/path/to/last.ckpt model=small model.length=1024 \\
      +eval.ppl_times=5 eval.num_particles=4

  # a subset, plus your own text (a .txt/.jsonl file or a folder) reported as "books":
  python scripts/zero_shot_sweep.py --datasets lambada ptb books=local_text:/data/books -- ...

Dataset entries: NAME (data=NAME), NAME=CONFIG (data=CONFIG, reported as NAME) or
NAME=CONFIG:PATH (data=CONFIG data.path=PATH). Hydra print flags after `--` (`--cfg job`)
print each run's config instead of evaluating.

Writes <out>/zero_shot.json (per dataset: ppl, nll, ppl_std, ppl_per_draw, bound, weights,
ppl_times, num_particles, tokens, seconds, or the error) and <out>/zero_shot.md (a table).
Exits 1 if any dataset failed, after writing both files. Re-running into the same --out
reuses each result its same command wrote (no process is started; `--force` redoes them);
a job's result lines are echoed while it runs. This file also holds the helpers
steps_sweep.py uses.
"""

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MAIN = Path(__file__).resolve().parents[1] / "main.py"
DATASETS = (
    "lambada wikitext2 wikitext103 ptb ag_news scientific_papers_arxiv scientific_papers_pubmed"
    " text8 lm1b"
).split()
FIELDS = "ppl nll ppl_std ppl_per_draw bound weights ppl_times num_particles tokens seconds".split()
HYDRA_PRINT_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help"}
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
NAME = re.compile(r"^[\w.+-]+$")
# the lines of a job's output echoed while it runs
PROGRESS = ("[ppl_eval]", "[sample_eval]", "[gen_ppl]", "[vadd] architecture")


# ---------------------------------------------------------------- running main.py (shared)
@dataclass
class Finished:
    """How one `main.py` process ended."""

    returncode: int
    wall_seconds: float
    error: str | None  # one line; None when the process succeeded


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """(script arguments, Hydra overrides for every main.py call) split at the first `--`."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def hydra_value(value: str) -> str:
    """A value as a Hydra override writes it: quoted unless it is a plain path or word."""
    if re.fullmatch(r"[\w/.+@:~-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def hydra_flags_last(args: list[str]) -> list[str]:
    """Overrides first, then Hydra's flags (`--cfg job`): its parser wants them that way.

    A flag keeps the word after it as its value unless that word is an override or a flag.
    """
    plain, flags, i = [], [], 0
    while i < len(args):
        if not args[i].startswith("-"):
            plain.append(args[i])
            i += 1
            continue
        has_value = i + 1 < len(args) and not re.match(r"[-~]|.*=", args[i + 1])
        flags += args[i : i + 1 + has_value]
        i += 1 + has_value
    return plain + flags


def prints_only(overrides: list[str]) -> bool:
    """Whether the overrides ask Hydra to print something (e.g. `--cfg job`) instead of run."""
    return any(arg in HYDRA_PRINT_FLAGS for arg in overrides)


def error_line(stderr: str, returncode: int) -> str:
    """The line of a failed run's stderr that says what went wrong.

    main.py's own `error: ...` line, else the exception that ended a traceback, else the
    first line (Hydra's composition errors, printed before anything else).
    """
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error:")]
    raised = [ln for ln in lines if EXCEPTION_LINE.match(ln)]
    line = (ours or raised)[-1] if ours or raised else (lines or [f"exit status {returncode}"])[0]
    return line[:500]


def run_main(overrides: list[str], run_dir: Path, tag: str = "") -> Finished:
    """Run `main.py <overrides> hydra.run.dir=<run_dir>`; its output goes to run_dir/*.log,
    and its result lines ([ppl_eval] ..., [sample_eval] ...) are echoed as they come."""
    args = [*overrides, f"hydra.run.dir={hydra_value(str(run_dir))}"]
    cmd = [sys.executable, str(MAIN), *hydra_flags_last(args)]
    if prints_only(overrides):  # nothing to collect: let the printout through
        return Finished(subprocess.run(cmd).returncode, 0.0, None)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    start = time.time()
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            out.write(line)
            if line.startswith(PROGRESS):
                print(f"{tag}  {line.rstrip()}" if tag else line.rstrip(), flush=True)
        proc.wait()
    wall = round(time.time() - start, 2)
    stderr = (run_dir / "stderr.log").read_text()
    error = None if proc.returncode == 0 else error_line(stderr, proc.returncode)
    return Finished(proc.returncode, wall, error)


def file_state(path: str | None) -> list | None:
    """(size, mtime) of a checkpoint file, or of an exported folder's weights: a retrained
    last.ckpt is another input than the one a result was computed from."""
    if not path or "://" in path:
        return None
    target = Path(path)
    if target.is_dir():
        target = target / "model.safetensors"
    if not target.exists():
        return None
    stat = target.stat()
    return [stat.st_size, stat.st_mtime_ns]


def reuse_results(
    run_dir: Path, command: list[str], results: list[Path], force: bool, checkpoint=None
) -> None:
    """Skip finished work: the result files in run_dir stay when the same command made
    them from the same checkpoint file (run_dir/sweep_command.json); with --force,
    another command or a changed checkpoint they are removed."""
    marker = run_dir / "sweep_command.json"
    key = {"command": command, "checkpoint": file_state(checkpoint)}
    same = marker.exists() and json.loads(marker.read_text()) == key
    if force or not same:
        for path in results:
            path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(key) + "\n")


def run_parallel(fn: Callable, items: Iterable, jobs: int) -> list:
    """fn over items, `jobs` at a time, results in the items' order."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(fn, items))


def md_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- the zero-shot sweep
@dataclass
class Dataset:
    name: str  # what the results call it; also the run folder
    overrides: list[str]  # how main.py gets it


def parse_dataset(spec: str) -> Dataset:
    """NAME | NAME=CONFIG | NAME=CONFIG:PATH (see the module docstring)."""
    name, has_config, rest = spec.partition("=")
    config, has_path, path = rest.partition(":")
    if not NAME.match(name) or (has_config and not config) or (has_path and not path):
        raise argparse.ArgumentTypeError(
            f"{spec!r}: use NAME, NAME=CONFIG or NAME=CONFIG:PATH (NAME of letters, digits, ._+-)"
        )
    overrides = [f"data={config if has_config else name}"]
    if has_path:
        overrides.append(f"data.path={hydra_value(path)}")
    return Dataset(name, overrides)


def prepare(dataset: Dataset, out: Path, common: list[str], force: bool) -> bool:
    """Whether `dataset` needs evaluating: a result of the same command from the same
    checkpoint file is reused (no process started) unless `force`."""
    run_dir = out / dataset.name
    overrides = ["mode=ppl_eval", *common, *dataset.overrides]
    reuse_results(run_dir, overrides, [run_dir / "ppl_eval.json", run_dir / "error.txt"],
                  force, checkpoint_of(common))  # fmt: skip
    if (run_dir / "ppl_eval.json").exists():
        print(f"[zero_shot] {dataset.name}: done before (--force to redo)", flush=True)
        return False
    return True


def evaluate_together(datasets: list[Dataset], out: Path, common: list[str]) -> Finished:
    """Hub / named datasets in one main.py process (Hydra multirun, `-m data=a,b,c`): the
    interpreter starts and the checkpoint is read once; each job writes <out>/<name>/
    (ppl_eval.json, or error.txt with its one-line error) and the next job runs."""
    names = ",".join(d.name for d in datasets)
    print(f"[zero_shot] evaluating {names} in one process ...", flush=True)
    overrides = ["-m", "mode=ppl_eval", *common, f"data={names}",
                 f"hydra.sweep.dir={hydra_value(str(out))}",
                 "hydra.sweep.subdir=${hydra.runtime.choices.data}"]  # fmt: skip
    return run_main(overrides, out / ".together", "[zero_shot]")


def collect(dataset: Dataset, out: Path, done: Finished, reused: bool) -> dict:
    """The numbers of one dataset's ppl_eval.json, or its error."""
    run_dir, record = out / dataset.name, {"data_overrides": dataset.overrides}
    result_file, error_file = run_dir / "ppl_eval.json", run_dir / "error.txt"
    record.update(returncode=done.returncode, wall_seconds=done.wall_seconds, reused=reused)
    error = None
    if not result_file.exists():
        own = error_file.read_text().strip() if error_file.exists() else None
        error = own or done.error or f"main.py finished but wrote no {result_file}"
    if error is not None:
        print(f"[zero_shot] {dataset.name}: FAILED: {error}", flush=True)
        return {"status": "failed", "error": error, **record}
    saved = json.loads(result_file.read_text())
    print(f"[zero_shot] {dataset.name}: ppl {saved['ppl']:.3f}", flush=True)
    numbers = {key: saved[key] for key in FIELDS if key in saved}
    return {"status": "ok", **numbers, "result_file": str(result_file), **record}


def evaluate_all(datasets: list[Dataset], out: Path, common: list[str], args) -> list[dict]:
    """Every dataset's record, in order: the named ones together in one process, a
    dataset with a path (NAME=local_text:PATH) or an alias in a process of its own."""
    todo = [d for d in datasets if prepare(d, out, common, args.force)]
    together = [d for d in todo if d.overrides == [f"data={d.name}"]]
    alone = [d for d in todo if d not in together]
    finished = {d.name: Finished(0, 0.0, None) for d in datasets}
    if together:
        done = evaluate_together(together, out, common)
        finished.update({d.name: done for d in together})

    def single(d: Dataset) -> Finished:
        overrides = ["mode=ppl_eval", *common, *d.overrides]
        return run_main(overrides, out / d.name, f"[zero_shot] {d.name}")

    finished.update(
        zip([d.name for d in alone], run_parallel(single, alone, args.jobs), strict=True)
    )
    return [collect(d, out, finished[d.name], d not in todo) for d in datasets]


def checkpoint_of(overrides: list[str]) -> str | None:
    paths = [o.split("=", 1)[1] for o in overrides if o.startswith("eval.checkpoint_path=")]
    return paths[-1] if paths else None


def markdown(summary: dict) -> str:
    results = summary["datasets"]
    bounds = sorted(
        {f"{r['bound']} ({r['weights']} weights)" for r in results.values() if "bound" in r}
    )
    lines = [
        "# Zero-shot perplexity",
        "",
        f"Checkpoint: `{summary['checkpoint']}`  ",
        f"Bound: {'; '.join(bounds) or 'n/a (no dataset succeeded)'}",
        "",
        "| dataset | PPL | ± std | draws | K | tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if r["status"] != "ok":
            lines.append(f"| {md_cell(name)} | failed | | | | |")
            continue
        std = f"{r['ppl_std']:.2f}" if "ppl_std" in r else "–"
        lines.append(
            f"| {md_cell(name)} | {r['ppl']:.2f} | {std} | {r.get('ppl_times', 1)} | "
            f"{r.get('num_particles', 1)} | {r.get('tokens', 0):,} |"
        )
    failed = [(n, r["error"]) for n, r in results.items() if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- **{md_cell(n)}**: `{md_cell(e)}`" for n, e in failed]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--datasets DATASET [DATASET ...]] [--out DIR] [--jobs N]"
        " [-- OVERRIDE ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        type=parse_dataset,
        default=[parse_dataset(name) for name in DATASETS],
        metavar="DATASET",
        help=f"NAME, NAME=CONFIG or NAME=CONFIG:PATH (default: {' '.join(DATASETS)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/zero_shot"),
        metavar="DIR",
        help="results folder (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="datasets evaluated at once (default 1; >1 shares devices and skews `seconds`)",
    )
    parser.add_argument(
        "--force", action="store_true", help="evaluate again what an earlier run finished"
    )
    args = parser.parse_args(argv)
    names = [d.name for d in args.datasets]
    if len(set(names)) != len(names):
        parser.error(f"--datasets: each NAME once, got {names}")
    return args


def main() -> int:
    argv, common = split_at_double_dash(sys.argv[1:])
    args = parse_args(argv)
    out = args.out.resolve()
    if prints_only(common):
        done = [
            run_main(["mode=ppl_eval", *common, *d.overrides], out / d.name) for d in args.datasets
        ]
        return max(d.returncode for d in done)
    records = evaluate_all(args.datasets, out, common, args)
    summary = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "checkpoint": checkpoint_of(common),
        "overrides": common,
        "datasets": {d.name: r for d, r in zip(args.datasets, records, strict=True)},
        "failed": [
            d.name for d, r in zip(args.datasets, records, strict=True) if r["status"] != "ok"
        ],
    }
    write_json(out / "zero_shot.json", summary)
    (out / "zero_shot.md").write_text(markdown(summary))
    ok = len(records) - len(summary["failed"])
    print(f"[zero_shot] {ok}/{len(records)} ok -> {out}/zero_shot.json, zero_shot.md")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

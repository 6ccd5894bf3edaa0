"""The sweep scripts: zero-shot perplexity over datasets, sample quality over step counts.

Two tiny checkpoints (VADD and MDLM, 5 steps each) are trained once through main.py; the
sweeps then run main.py in subprocesses, three at a time (`--jobs 3`) to keep the file fast.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import steps_sweep  # noqa: E402
import zero_shot_sweep  # noqa: E402
from tiny import TINY  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
ENV = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}  # processes run side by side
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{'vae': ..., 'mdlm': ...}: tiny checkpoints trained for 5 steps, both at once."""
    root = tmp_path_factory.mktemp("train")
    procs = {
        loss: subprocess.Popen(
            [
                sys.executable,
                "main.py",
                f"hydra.run.dir={root / loss}",
                *TINY,
                f"training.loss_type={loss}",
                "trainer.max_steps=5",
                "callbacks.checkpoint_every_n_steps.every_n_train_steps=5",  # save at the end
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for loss in ("vae", "mdlm")
    }
    for loss, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{loss}: {stderr[-3000:]}"
    paths = {loss: root / loss / "checkpoints" / "last.ckpt" for loss in procs}
    assert all(p.exists() for p in paths.values()), paths
    return paths


def sweep(script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, f"scripts/{script}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def write_corpus(folder: Path, seed: int) -> Path:
    """60 paragraphs of made-up sentences: every 20th is validation, a few 64-token rows."""
    rng = random.Random(seed)
    nouns = "shepherd river city king vineyard lamp mountain servant field temple".split()
    verbs = "blessed crossed built found remembered kept watched".split()
    places = "the gate|the valley|the sea|the wilderness|Jerusalem".split("|")
    folder.mkdir()
    for part in range(3):
        paragraphs = [
            " ".join(
                f"The {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)} "
                f"by {rng.choice(places)}."
                for _ in range(6)
            )
            for _ in range(20)
        ]
        (folder / f"part{part}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return folder


def test_zero_shot_sweep_collects_datasets_and_records_failures(checkpoints, tmp_path):
    out = tmp_path / "zs"
    proc = sweep(
        "zero_shot_sweep.py",
        "--jobs=3",
        "--out",
        str(out),
        "--datasets",
        f"fields=local_text:{write_corpus(tmp_path / 'fields', seed=0)}",
        f"rivers=local_text:{write_corpus(tmp_path / 'rivers', seed=1)}",
        f"missing=local_text:{tmp_path / 'no_such_folder'}",
        "--",
        *TINY,
        f"eval.checkpoint_path={checkpoints['vae']}",
        "+eval.ppl_times=2",
        "eval.num_particles=2",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((out / "zero_shot.json").read_text())
    results = summary["datasets"]
    assert list(results) == ["fields", "rivers", "missing"]
    assert summary["failed"] == ["missing"]
    assert summary["checkpoint"] == str(checkpoints["vae"])
    for name in ("fields", "rivers"):
        r = results[name]
        assert r["status"] == "ok", r
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert math.isclose(r["nll"], math.log(r["ppl"]), rel_tol=1e-6)
        assert len(r["ppl_per_draw"]) == r["ppl_times"] == 2 and r["ppl_std"] >= 0
        assert r["num_particles"] == 2 and "IWAE-DELBO (K=2)" in r["bound"]
        assert r["weights"] == "EMA" and r["tokens"] >= 64 and r["seconds"] > 0
        assert (out / name / "ppl_eval.json").exists()
    missing = results["missing"]
    assert missing["status"] == "failed" and missing["returncode"] == 2
    assert missing["error"].startswith("error: data.path=") and "does not exist" in missing["error"]

    table = (out / "zero_shot.md").read_text()
    assert "Bound: negative IWAE-DELBO (K=2)" in table
    for name in ("fields", "rivers"):
        r = results[name]
        row = f"| {name} | {r['ppl']:.2f} | {r['ppl_std']:.2f} | 2 | 2 | {r['tokens']:,} |"
        assert row in table, table
    assert "| missing | failed |" in table and "does not exist" in table


def test_zero_shot_sweep_evaluates_named_datasets_in_one_process(checkpoints, tmp_path):
    """bible (embedded) and wikitext2 (not cached offline) through one multirun process:
    one result, one recorded one-line error; a rerun reuses the result."""
    out = tmp_path / "zs"
    args = [
        "--out",
        str(out),
        "--datasets",
        "bible",
        "wikitext2",
        "--",
        f"eval.checkpoint_path={checkpoints['mdlm']}",
        "eval.limit_batches=2",
        "loader.eval_batch_size=8",
    ]  # fmt: skip  (no sizes: the checkpoint has them)
    proc = sweep("zero_shot_sweep.py", *args)
    assert proc.returncode == 1, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "zero_shot.json").read_text())
    bible, wikitext = summary["datasets"]["bible"], summary["datasets"]["wikitext2"]
    assert bible["status"] == "ok" and bible["ppl"] > 1 and "MDLM NELBO" in bible["bound"]
    assert wikitext["status"] == "failed" and "'wikitext2' is not cached" in wikitext["error"]
    assert "evaluating bible,wikitext2 in one process" in proc.stdout
    assert (out / ".together" / "command.txt").exists()  # the one main.py process
    assert not (out / "bible" / "command.txt").exists()
    again = sweep("zero_shot_sweep.py", *args)
    assert "bible: done before (--force to redo)" in again.stdout
    assert json.loads((out / "zero_shot.json").read_text())["datasets"]["bible"]["reused"]


def test_steps_sweep_three_runs_two_step_counts(checkpoints, tmp_path):
    out = tmp_path / "steps"
    vae, mdlm = str(checkpoints["vae"]), str(checkpoints["mdlm"])
    proc = sweep(
        "steps_sweep.py",
        "--jobs=3",
        "--out",
        str(out),
        "--steps",
        "2",
        "4",
        *["--run", "VADD fixz=True", vae, "sampling.fixz=True", "sampling.predictor=vae_cache"],
        *["--run", "VADD fixz=False", vae, "sampling.fixz=False"],
        *["--run", "MDLM", mdlm, "training.loss_type=mdlm"],
        "--",
        *TINY,
        "loader.eval_batch_size=2",
        "sampling.num_sample_batches=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "steps_sweep.json").read_text())
    assert summary["steps"] == [2, 4] and summary["failed"] == []
    for folder in ("VADD_fixz_True", "VADD_fixz_False", "MDLM"):  # one process per run
        assert "sampling.steps=[2,4]" in (out / folder / "command.txt").read_text()
    runs = summary["runs"]
    assert list(runs) == ["VADD fixz=True", "VADD fixz=False", "MDLM"]
    expected = {
        "VADD fixz=True": ("vae_cache", True),
        "VADD fixz=False": ("vae", False),
        "MDLM": ("ddpm_cache", None),
    }
    for name, run in runs.items():
        assert [r["steps"] for r in run["results"]] == [2, 4]
        for r in run["results"]:
            assert r["status"] == "ok" and r["gen_ppl"] is None, r
            assert (r["predictor"], r["fixz"]) == expected[name]
            assert 0 < r["unigram_entropy"] <= math.log(64) + 1e-9
            assert 0 < r["nfe_per_sequence"] <= r["steps"] + 1 and r["seconds"] >= 0
            assert r["num_samples"] == 2
            assert Path(r["samples_file"]).parent == out / run["folder"]
            assert f"_T{r['steps']}" in Path(r["samples_file"]).name and not r["reused"]
    png = (out / "steps_sweep.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_steps_sweep_two_runs_four_step_counts_one_judge_each_and_a_rerun_does_nothing(
    checkpoints, tmp_path
):
    out = tmp_path / "steps"
    args = [
        "--out", str(out), "--steps", "1", "2", "4", "8",
        *["--run", "VADD", str(checkpoints["vae"])],
        *["--run", "MDLM", str(checkpoints["mdlm"]), "training.loss_type=mdlm"],
        "--", *TINY, "loader.eval_batch_size=2", "sampling.num_sample_batches=1",
        "eval.compute_generative_perplexity=True", "eval.gen_ppl_eval_model_name_or_path=smollm2",
    ]  # fmt: skip
    first = sweep("steps_sweep.py", *args)
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    summary = json.loads((out / "steps_sweep.json").read_text())
    for folder in ("VADD", "MDLM"):
        log = (out / folder / "stdout.log").read_text()
        assert log.count("[gen_ppl] judge smollm2 loaded") == 1  # one judge for 4 step counts
        assert log.count("[sample_eval]") == 4
    results = [r for run in summary["runs"].values() for r in run["results"]]
    assert len(results) == 8 and all(r["gen_ppl"] > 1 and not r["reused"] for r in results)
    assert "[steps_sweep] VADD T=1" in first.stdout and "[gen_ppl] judge" in first.stdout
    commands = {f: (out / f / "command.txt").stat().st_mtime_ns for f in ("VADD", "MDLM")}
    again = sweep("steps_sweep.py", *args)  # the same sweep again: every result is reused
    assert again.returncode == 0 and again.stdout.count("done before (--force to redo)") == 2
    assert {f: (out / f / "command.txt").stat().st_mtime_ns for f in commands} == commands
    rerun = json.loads((out / "steps_sweep.json").read_text())
    for name, run in rerun["runs"].items():
        for old, new in zip(summary["runs"][name]["results"], run["results"], strict=True):
            assert new["reused"] and new["gen_ppl"] == old["gen_ppl"]
    more = sweep("steps_sweep.py", *[a if a != "8" else "16" for a in args])  # T=16 only is new
    assert more.returncode == 0 and "sampling at T = [16] (3 done before)" in more.stdout
    stat = checkpoints["vae"].stat()  # a retrained checkpoint (same path): sampled again
    os.utime(checkpoints["vae"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    retrained = sweep("steps_sweep.py", *args)
    assert "VADD: sampling at T = [1, 2, 4, 8] (0 done before)" in retrained.stdout
    assert "MDLM: all 4 step counts done before" in retrained.stdout


def test_steps_sweep_records_a_failing_run_and_still_writes_its_files(tmp_path):
    out = tmp_path / "steps"
    proc = sweep(
        "steps_sweep.py", "--out", str(out), "--steps", "2", "--run", "gone", "/no/such.ckpt"
    )
    assert proc.returncode == 1
    summary = json.loads((out / "steps_sweep.json").read_text())
    (result,) = summary["runs"]["gone"]["results"]
    assert result["status"] == "failed" and "/no/such.ckpt" in result["error"]
    assert summary["failed"] == ["gone T=2"]
    assert (out / "steps_sweep.png").read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- the scripts' pieces
def test_dataset_entries():
    assert zero_shot_sweep.parse_dataset("ptb").overrides == ["data=ptb"]
    assert zero_shot_sweep.parse_dataset("wt=wikitext2").overrides == ["data=wikitext2"]
    books = zero_shot_sweep.parse_dataset("books=local_text:/data/my books")
    assert books.name == "books"
    assert books.overrides == ["data=local_text", "data.path='/data/my books'"]
    for bad in ("a/b", "x=", "x=local_text:", ""):
        with pytest.raises(Exception, match="NAME=CONFIG:PATH"):
            zero_shot_sweep.parse_dataset(bad)


def test_error_line_picks_the_cause():
    ours = "warning: slow\nerror: data.path=/x does not exist: fix it\n"
    assert zero_shot_sweep.error_line(ours, 2) == "error: data.path=/x does not exist: fix it"
    trace = (
        "Error executing job with overrides: [...]\nTraceback (most recent call last):\n"
        '  File "x.py", line 1\ntorch.OutOfMemoryError: CUDA out of memory.\n\n'
        "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
    )
    assert zero_shot_sweep.error_line(trace, 1) == "torch.OutOfMemoryError: CUDA out of memory."
    hydra = "Could not override 'training.foo'.\nTo append use +training.foo=1\n\nSet the..."
    assert zero_shot_sweep.error_line(hydra, 1) == "Could not override 'training.foo'."
    assert zero_shot_sweep.error_line("", -9) == "killed by signal SIGKILL"
    assert zero_shot_sweep.error_line("", 3) == "exit status 3"


def test_hydra_flags_go_after_the_overrides():
    args = ["a=1", "--cfg", "job", "b=2", "--resolve", "~c"]
    assert zero_shot_sweep.hydra_flags_last(args) == [
        "a=1",
        "b=2",
        "~c",
        "--cfg",
        "job",
        "--resolve",
    ]


def test_plot_adds_a_gen_ppl_panel_when_samples_were_scored(tmp_path):
    import matplotlib.pyplot as plt

    def summary(gen_ppl: bool) -> dict:
        results = [
            {"steps": t, "gen_ppl": 100.0 / t if gen_ppl else None, "unigram_entropy": 5.0}
            for t in (16, 32, 64)
        ]
        runs = {"VADD": {"results": results}, "MDLM": {"results": results}}
        return {"steps": [16, 32, 64], "judge": "gpt2-large", "runs": runs}

    widths = []
    for gen_ppl in (False, True):
        path = tmp_path / f"plot_{gen_ppl}.png"
        steps_sweep.plot(summary(gen_ppl), path)
        widths.append(plt.imread(path).shape[1])
    assert widths[1] == 2 * widths[0]  # one panel each, side by side

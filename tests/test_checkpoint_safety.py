"""Faults that must never destroy a good checkpoint: failed writes, kills mid-save, failed
restores, NaN stops, Ctrl-C; and resumes that are exact or refused."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume import ENV, ROOT, command, losses
from tiny import wait_for

import utils


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(run_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(run_dir, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 6-step run (last.ckpt at step 6), copied per test."""
    run_dir = tmp_path_factory.mktemp("trained")
    proc = run(run_dir, "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(trained, dest)
    return dest


# ---------------------------------------------------------------- the write itself
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"the good checkpoint")

    def disk_full(f):
        f.write(b"half of a new one")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        utils.atomic_write(str(path), disk_full)
    assert path.read_bytes() == b"the good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    utils.atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
import utils
def slow(f):
    f.write(b"x" * 1000)
    f.flush()
    open({ready!r}, "w").close()
    time.sleep(120)
utils.atomic_write({path!r}, slow)
"""


def _other_filesystem(tmp_path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        return shm
    return None


def test_sigkill_mid_save_into_a_folder_on_another_filesystem_keeps_the_old_file(tmp_path):
    """The usual cluster layout: $TMPDIR local, the run folder elsewhere (here /dev/shm, a
    tmpfs). The temp file is written beside the destination, so a kill mid-save leaves
    the old file whole, and the next start removes the dead process's temp file."""
    other = _other_filesystem(tmp_path)
    if other is None:
        pytest.skip("no writable tmpfs on another device than tmp_path (/dev/shm)")
    folder = Path(other) / f"vadd-test-{os.getpid()}-{time.time_ns()}"
    folder.mkdir()
    try:
        path, ready = folder / "last.ckpt", tmp_path / "ready"
        path.write_bytes(b"the good checkpoint")
        code = WRITER.format(root=str(ROOT), ready=str(ready), path=str(path))
        env = {**ENV, "TMPDIR": str(tmp_path)}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        wait_for(ready, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert path.read_bytes() == b"the good checkpoint"
        leftovers = [p for p in folder.iterdir() if p.name != "last.ckpt"]
        assert len(leftovers) == 1 and utils.TEMP_MARK in leftovers[0].name
        assert utils.remove_stale_temp_files(str(folder)) == [str(leftovers[0])]
        assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_stale_temp_files_of_live_processes_and_other_hosts_are_kept(tmp_path):
    host = utils._owner_tag().rsplit("-", 1)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".last.ckpt{utils.TEMP_MARK}{host}-{dead.pid}-abcd1234": False,  # removed
        f".last.ckpt{utils.TEMP_MARK}{host}-{os.getpid()}-abcd1234": True,  # this process
        f".last.ckpt{utils.TEMP_MARK}otherhost-{dead.pid}-abcd1234": True,  # not ours to judge
        "notes.txt": True,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    utils.remove_stale_temp_files(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}


def test_every_trainer_checkpoint_goes_through_the_atomic_writer(tmp_path):
    from test_end_to_end import make_cfg

    import runner
    from checkpointing.checkpoints import AtomicCheckpointIO

    cfg = make_cfg(tmp_path, "trainer.accelerator=cpu", "trainer.devices=1")
    assert isinstance(runner.build_trainer(cfg).strategy.checkpoint_io, AtomicCheckpointIO)


# ---------------------------------------------------------------- exception paths
@pytest.mark.parametrize(
    "change,named",
    [
        ("model.hidden_size=48", "model.hidden_size=32 in the checkpoint, 48 now"),
        ("training.loss_type=mdlm", "training.loss_type=vae in the checkpoint, mdlm now"),
        ("optim.beta1=1.5", "optim.beta1=1.5"),
    ],
)
def test_a_refused_resume_writes_nothing(trained, tmp_path, change, named):
    run_dir = copy_run(trained, tmp_path)
    ckpts = run_dir / "checkpoints"
    before = {p.name: digest(p) for p in ckpts.iterdir()}
    proc = run(run_dir, "trainer.max_steps=12", change)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: digest(p) for p in ckpts.iterdir()} == before


@pytest.mark.parametrize("key", ["seed", "keep_frame"])
def test_a_resume_with_another_seed_or_frame_is_refused_naming_both(trained, key):
    """Another seed reads the epoch's rows in another order, another keep_frame diffuses
    and counts other tokens: the resume could not be exact (rows read twice, others
    skipped; another objective), so it is refused before anything is written."""
    from omegaconf import OmegaConf

    from checkpointing.checkpoints import CheckpointError, check_resume

    cfg = OmegaConf.load(trained / "config.yaml")
    last = trained / "checkpoints" / "last.ckpt"
    vocab = torch.load(last, map_location="cpu", weights_only=False)["vadd"]["vocab"]["size"]
    check_resume(cfg, vocab, str(last))  # the same config resumes
    before = cfg[key]
    cfg[key] = (not before) if isinstance(before, bool) else int(before) + 1
    with pytest.raises(CheckpointError, match=rf"{key}={before} in the checkpoint, {cfg[key]} now"):
        check_resume(cfg, vocab, str(last))


def test_an_explicit_resume_path_that_does_not_exist_is_an_error(tmp_path):
    proc = run(tmp_path / "run", f"checkpointing.resume_ckpt_path={tmp_path}/typo.ckpt")
    assert proc.returncode == 2 and "typo.ckpt does not exist" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failure_before_training_starts_writes_nothing(trained, tmp_path, monkeypatch):
    """Anything raised while restoring (here: the optimiser state) leaves last.ckpt alone."""
    from checkpointing.callbacks import SafetyCheckpoint

    run_dir = copy_run(trained, tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = digest(last)
    cb = SafetyCheckpoint(str(run_dir / "checkpoints"))

    class Trainer:
        global_step = 0

        def save_checkpoint(self, path):
            raise AssertionError(f"wrote {path}")

    cb.on_exception(Trainer(), torch.nn.Linear(1, 1), RuntimeError("bad optimizer state"))
    assert digest(last) == before


def test_an_exception_does_not_write_a_state_behind_the_file(trained, tmp_path):
    from checkpointing.callbacks import SafetyCheckpoint, saved_step

    run_dir = copy_run(trained, tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert saved_step(str(last)) == 6
    written = []

    class Trainer:
        def __init__(self, step):
            self.global_step = step

        def save_checkpoint(self, path):
            written.append((path, self.global_step))

    cb = SafetyCheckpoint(str(run_dir / "checkpoints"))
    cb.started = True
    net = torch.nn.Linear(1, 1)
    cb.on_exception(Trainer(4), net, RuntimeError("crash"))  # a fresh run into the folder
    cb.on_exception(Trainer(6), net, RuntimeError("crash"))  # not past it either
    assert written == []
    cb.on_exception(Trainer(7), net, RuntimeError("crash"))
    assert written == [(str(last), 7)]
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    cb.on_exception(Trainer(8), net, RuntimeError("crash"))
    assert len(written) == 1  # non-finite weights are never written


@pytest.mark.parametrize("where", ["inside a window", "in a validation"])
def test_a_crash_inside_a_window_or_a_validation_keeps_last_ckpt(trained, tmp_path, where):
    """There the state is no step boundary (a partial window's rows and Lightning's
    counters) or the EMA weights are swapped in: a crash past last.ckpt's step writes
    nothing, although it would write at a step boundary outside a validation."""
    from checkpointing.callbacks import SafetyCheckpoint

    run_dir = copy_run(trained, tmp_path)
    written = []

    class Trainer:
        global_step, validating = 9, where == "in a validation"

        def save_checkpoint(self, path):
            written.append(path)

    net = torch.nn.Linear(1, 1)
    net._micro = 2 if where == "inside a window" else 0
    cb = SafetyCheckpoint(str(run_dir / "checkpoints"))
    cb.started = True
    cb.on_exception(Trainer(), net, RuntimeError("crash"))
    assert written == []
    net._micro, Trainer.validating = 0, False  # the same crash at a step boundary
    cb.on_exception(Trainer(), net, RuntimeError("crash"))
    assert written == [str(run_dir / "checkpoints" / "last.ckpt")]


def test_a_nan_stop_keeps_last_ckpt_and_saves_the_last_finite_state_apart(tmp_path, monkeypatch):
    from test_end_to_end import build, dataloader, make_cfg

    from checkpointing.callbacks import SafetyCheckpoint
    from diffusion import NonFiniteLossError

    cfg = make_cfg(tmp_path, "trainer.max_steps=5")
    trainer, module, tokenizer = build(cfg)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"the good checkpoint")
    cb = SafetyCheckpoint(str(folder))
    trainer.callbacks.append(cb)
    original = module.compute_loss

    def poisoned(batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        out = original(batch, t, beta, num_particles, draws, train)
        if module.global_step == 2:
            out.per_seq = out.per_seq * float("nan")
        return out

    monkeypatch.setattr(module, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 2") as err:
        trainer.fit(module, dataloader.get_dataloaders(cfg, tokenizer)[0])
    assert (folder / "last.ckpt").read_bytes() == b"the good checkpoint"
    saved = torch.load(folder / "nonfinite-step=2.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    batch = torch.load(tmp_path / "nonfinite_batch_step2.pt")  # the offending batch
    assert batch["input_ids"].shape == (8, 64) and str(tmp_path) in str(err.value)


# ---------------------------------------------------------------- Ctrl-C and resume
def test_ctrl_c_is_python_s_own_again_after_training(tmp_path):
    from checkpointing.callbacks import SafetyCheckpoint

    class Trainer:
        is_global_zero, global_step, checkpoint_callbacks = True, 1, []

        def save_checkpoint(self, path):
            pass

    before = signal.getsignal(signal.SIGINT)
    for end in ("on_train_end", "on_exception"):
        cb = SafetyCheckpoint(str(tmp_path))
        cb.on_train_start(Trainer(), None)
        assert signal.getsignal(signal.SIGINT) == cb._to_sigterm
        args = (Trainer(), torch.nn.Linear(1, 1)) + (
            (KeyError("x"),) if end == "on_exception" else ()
        )
        getattr(cb, end)(*args)
        assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_saves_exits_130_and_the_resume_equals_the_uninterrupted_run(tmp_path):
    steps = "trainer.max_steps=24"
    full = tmp_path / "full"
    assert run(full, steps).returncode == 0
    reference = losses(full)

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        command(stopped, steps), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for(stopped / "checkpoints" / "step=6.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stderr.read().decode()[-2000:]
    last = stopped / "checkpoints" / "last.ckpt"
    at = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
    assert 6 <= at < 24, "the run finished before it could be interrupted"
    assert not list((stopped / "checkpoints").glob("last-v*.ckpt"))

    proc = run(stopped, steps)  # the same command again continues the run
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 24
    history = losses(stopped)  # the interrupted run's rows are kept, the resumed appended
    assert sorted(history) == sorted(reference)
    after = {s: v for s, v in history.items() if s > at}
    assert after and all(after[s] == reference[s] for s in after), (after, reference)


def test_a_resume_applies_a_changed_learning_rate_and_says_so(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    proc = run(run_dir, "trainer.max_steps=8", "optim.lr=1e-4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resume applies optim.lr: 0.002 -> 0.0001" in proc.stdout  # recipe=cpu's 2e-3
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    decoder, encoder = ckpt["optimizer_states"][0]["param_groups"]  # encoder_lr_scale 0.15
    assert decoder["initial_lr"] == pytest.approx(1e-4)
    assert encoder["initial_lr"] == pytest.approx(1.5e-5)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-4), pytest.approx(1.5e-5)]


# ---------------------------------------------------------------- one run per folder
def test_a_second_run_into_a_live_runs_folder_is_refused_and_a_dead_runs_lock_taken_over(
    tmp_path,
):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        command(run_dir, "trainer.max_steps=100000"), cwd=ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(run_dir / "checkpoints" / "step=3.ckpt", first)
        config_written = (run_dir / "config.yaml").stat().st_mtime_ns
        second = run(run_dir, "trainer.max_steps=100000", timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another run (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config_written  # not rewritten
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / ".vadd.lock").exists()  # SIGKILL leaves it behind
    held = int(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"])
    third = run(run_dir, f"trainer.max_steps={held + 2}")
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"(pid {first.pid}) is gone" in third.stdout
    assert not (run_dir / ".vadd.lock").exists()  # released at the end


# ---------------------------------------------------------------- wandb across resumes
def test_a_resume_continues_the_same_wandb_run_and_a_fresh_run_starts_a_new_one(tmp_path):
    from omegaconf import OmegaConf

    import runner

    def logger(resume: bool, run_id=None):
        cfg = OmegaConf.create({
            "logger": "wandb",
            "wandb": {"project": "p", "name": None, "mode": "disabled", "tags": [], "id": run_id},
            "checkpointing": {"save_dir": str(tmp_path), "resume_from_ckpt": resume,
                              "resume_ckpt_path": str(tmp_path / "checkpoints" / "last.ckpt")},
        })  # fmt: skip
        return runner._logger(cfg)

    first = logger(resume=True).version  # no checkpoint yet: a fresh run
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    assert logger(resume=True).version == first  # the resume logs into the same run
    assert (tmp_path / runner.WANDB_ID_FILE).read_text() == first
    fresh = logger(resume=False).version
    assert fresh != first and logger(resume=True).version == fresh
    assert logger(resume=True, run_id="mine").version == "mine"

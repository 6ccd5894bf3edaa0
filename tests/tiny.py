"""Hydra overrides for the tiny models the end-to-end tests train in seconds."""

# An untrained encoder that is the prior (recipe=cpu starts it informative, README
# "Posterior collapse"): the invariants the tests check (untrained PPL = V, KL = 0, an
# untrained GenDIT is an MDLM) are stated for it. tests/test_collapse_remedies.py covers
# the informative start.
PRIOR_ENCODER = ["decoder.mu_init_std=0", "decoder.init_log_sigma=0"]

SMALL_MODEL = [  # ~0.5 M parameters, 64 tokens
    "model.length=64",
    "model.hidden_size=64",
    "model.cond_dim=32",
    "model.n_blocks=2",
    "model.latent_dim=16",
    "decoder.hidden_size=32",
    "decoder.cond_dim=32",
    "decoder.n_heads=2",
    "decoder.n_blocks=1",
    *PRIOR_ENCODER,
]
MICRO_MODEL = [  # a few thousand parameters, 32 tokens
    "model.length=32",
    "model.hidden_size=32",
    "model.cond_dim=16",
    "model.n_heads=2",
    "model.n_blocks=1",
    "model.latent_dim=8",
    "decoder.hidden_size=32",
    "decoder.cond_dim=16",
    "decoder.n_heads=2",
    "decoder.n_blocks=1",
    *PRIOR_ENCODER,
]
QUIET = ["trainer.enable_progress_bar=False", "trainer.enable_model_summary=False"]
TINY = [
    *SMALL_MODEL,
    "loader.global_batch_size=8",
    "loader.eval_batch_size=16",
    "trainer.limit_val_batches=2",
    *QUIET,
]


def wait_for(path, proc, hang_guard_s: float = 600.0) -> None:
    """Block until `path` exists while `proc` runs; fail at once when proc exits first.

    Not a speed claim: the guard only turns a hung child into a failure instead of a
    hung suite, far beyond any run's time on a slow machine."""
    import time

    end = time.monotonic() + hang_guard_s
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            raise AssertionError(f"the process exited ({proc.returncode}) before {path}: {err}")
        if time.monotonic() > end:
            raise AssertionError(f"the process hung: no {path} after {hang_guard_s} s")
        time.sleep(0.02)

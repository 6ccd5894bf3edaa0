"""Hydra overrides for the tiny models the end-to-end tests train in seconds."""

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
]
QUIET = ["trainer.enable_progress_bar=False", "trainer.enable_model_summary=False"]
TINY = [
    *SMALL_MODEL,
    "loader.global_batch_size=8",
    "loader.eval_batch_size=16",
    "trainer.limit_val_batches=2",
    *QUIET,
]

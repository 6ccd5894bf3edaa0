"""Checkpoints: atomic writes and guarded reads (checkpoints), warm start and model
folders (interchange), and the callbacks that save on pre-emption / crash and keep the
metric history (callbacks)."""

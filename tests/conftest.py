"""Shared tiny configurations for the unit tests (fixtures only, no side effects but env)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

TINY_VOCAB = 7  # real tokens 0..6; the [MASK] id is 7, so networks get vocab_size=8


@pytest.fixture
def vocab() -> int:
    """Number of real tokens; the [MASK] id equals this number."""
    return TINY_VOCAB


@pytest.fixture
def model_cfg():
    """Factory of a tiny GenDIT / DIT config; keyword arguments override entries."""

    def make(**overrides):
        cfg = dict(
            hidden_size=16,
            cond_dim=8,
            n_heads=2,
            n_blocks=2,
            length=8,
            dropout=0.0,
            latent_dim=4,
            latentMLP=True,
            latent1d=True,
            latent_struc="adaln",
            vocab_multiple=1,
            gelu="auto",
        )
        cfg.update(overrides)
        return OmegaConf.create(cfg)

    return make


@pytest.fixture
def encoder_cfg():
    """Factory of a tiny InferDIT (`decoder=` group) config."""

    def make(mask_struc="adaln", **overrides):
        cfg = dict(
            hidden_size=16,
            cond_dim=8,
            n_heads=2,
            n_blocks=1,
            dropout=0.0,
            mask_struc=mask_struc,
            mu_init_std=0.0,
            init_log_sigma=0.0,
        )
        cfg.update(overrides)
        return OmegaConf.create(cfg)

    return make


@pytest.fixture
def randomize():
    """randomize(module, only=None, skip=None, std=0.3): Gaussian re-init of parameters.

    `only` / `skip` are substrings of parameter names; LayerNorm weights (names containing
    "norm") are drawn around 1 so activations keep their scale.
    """

    @torch.no_grad()
    def _randomize(module, only=None, skip=None, std=0.3):
        for name, p in module.named_parameters():
            if only is not None and only not in name:
                continue
            if skip is not None and skip in name:
                continue
            if "norm" in name:
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))

    return _randomize


@pytest.fixture
def no_network(monkeypatch):
    """Records every attempt to open a network connection (and refuses it): a test that
    must fail "fast" offline asserts the list is empty instead of timing itself."""
    import socket

    attempts = []

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"no network in this test (tried {address})")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, a: refuse(self, a))
    return attempts

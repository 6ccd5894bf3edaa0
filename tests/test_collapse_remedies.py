"""The posterior-collapse remedies change training, never a reported bound; ppl_eval.json
carries the collapse diagnostics."""

import json

import pytest
import torch
from test_end_to_end import build, make_cfg, validate

import dataloader
from evaluation.jobs import run_ppl_eval

REMEDIES = [
    ["training.free_bits=0.5"],
    ["training.free_bits=0.25", "training.free_bits_group=16"],
    ["training.loss_strategy=cyclical", "training.kl_weight_interval=4"],
    ["optim.encoder_lr_scale=0.1"],
    ["training.kl_hold_steps=50"],
]


def first_batch(cfg, tokenizer):
    train_dl, _ = dataloader.get_dataloaders(cfg, tokenizer)
    return next(iter(train_dl))


@pytest.mark.parametrize("remedy", REMEDIES, ids=[" ".join(r) for r in REMEDIES])
def test_remedy_leaves_the_reported_bound_unchanged(tmp_path, remedy):
    """Same weights with and without the remedy: identical validation numbers. The plain
    run has beta = 1 (loss_strategy=none) and the others beta = 0 at step 0 (annealing from
    init_kl_weight=0), so a training beta that reached validation would show too."""
    plain_cfg = make_cfg(
        tmp_path / "a", "trainer.limit_val_batches=1", "training.loss_strategy=none"
    )
    trainer, plain, tokenizer = build(plain_cfg)
    with torch.no_grad():
        for p in plain.encoder.output_layer.parameters():  # an encoder that says something
            p.normal_(0.0, 0.3)
    want = validate(trainer, plain, plain_cfg, tokenizer)
    cfg = make_cfg(tmp_path / "b", "trainer.limit_val_batches=1", *remedy)
    trainer, module, _ = build(cfg)
    module.load_state_dict(plain.state_dict())
    module.ema.load_state_dict(plain.ema.state_dict())
    got = validate(trainer, module, cfg, tokenizer)
    for key in ("nll", "kl", "kl_closed", "recon", "active_units", "mutual_information"):
        assert got[key] == want[key], key


def beta_from_the_readme(step, strategy, init, interval, hold, cycles=1, ramp=1.0) -> float:
    """beta at optimiser step `step`, written from the README's description (not kl_beta):
    `hold` steps at init, then a linear rise to 1 over `interval` steps (cyclical: over
    the first `ramp` of each of `cycles` cycles, 1 after the last)."""
    s = step - hold
    if s < 0:
        return init
    if strategy == "cyclical":
        if s >= cycles * interval:
            return 1.0
        s, interval = s % interval, ramp * interval
    return min(1.0, init + (1.0 - init) * s / interval)


SCHEDULES = [  # (strategy, init, interval, hold, cycles, ramp) over 10 steps
    ("klweight", 0.2, 4, 3, 1, 1.0),
    ("cyclical", 0.0, 4, 1, 2, 0.5),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_the_training_loss_uses_beta_and_the_kl_hold_as_configured(tmp_path, schedule):
    """At every training step, before / during / after the hold and the ramp, the loss the
    optimiser gets is L(beta) = L(0) + beta (L(1) - L(0)) with the README's beta: beta
    reaches the loss, and the hold, the ramp and the cycles count optimiser steps."""
    strategy, init, interval, hold, cycles, ramp = schedule
    cfg = make_cfg(
        tmp_path,
        "trainer.max_steps=10",
        "trainer.val_check_interval=1000",
        "model.dropout=0",  # the three evaluations of a step see the same network
        "decoder.mu_init_std=3",  # an informative encoder: the KL term is visible
        f"training.loss_strategy={strategy}",
        f"training.init_kl_weight={init}",
        f"training.kl_weight_interval={interval}",
        f"training.kl_hold_steps={hold}",
        f"training.kl_cycles={cycles}",
        f"training.kl_cycle_ramp={ramp}",
    )
    trainer, module, tokenizer = build(cfg)
    train_dl, _ = dataloader.get_dataloaders(cfg, tokenizer)
    seen, original = {}, module.compute_loss

    def spy(batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        out = original(batch, t, beta, num_particles, draws, train)
        with torch.no_grad():
            at = [original(batch, t, b, num_particles, draws, train).loss for b in (0.0, 1.0)]
        seen[module.global_step] = (out.loss.item(), at[0].item(), at[1].item())
        return out

    module.compute_loss = spy
    trainer.fit(module, train_dl)
    assert sorted(seen) == list(range(10))
    for step, (loss, at0, at1) in seen.items():
        beta = beta_from_the_readme(step, strategy, init, interval, hold, cycles, ramp)
        assert abs(at1 - at0) > 1e-2, "the KL term must be visible"  # (one-sample KL: any sign)
        assert loss == pytest.approx(at0 + beta * (at1 - at0), rel=1e-5, abs=1e-6), (step, beta)


def test_free_bits_changes_the_training_loss_only(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "training.free_bits=0.5",
        "training.free_bits_group=1",
        "decoder.mu_init_std=0",
        "decoder.init_log_sigma=0",
    )
    _, module, tokenizer = build(cfg)
    batch = first_batch(cfg, tokenizer)
    t = module.draw_t(len(batch["input_ids"]), seed=3)
    draws = module.global_draws(len(batch["input_ids"]), batch["input_ids"].shape[1], 3, 0)
    train = module.compute_loss(batch, t, beta=1.0, draws=draws, train=True)
    bound = module.compute_loss(batch, t, beta=1.0, draws=draws)
    # untrained encoder = the prior: KL 0 < 0.5 nats x 16 dims, so every sequence pays the floor
    # weighted by the KL's weight w(t) = -alpha'_t / (1 - alpha_t) = 1 / t (loglinear, T = 0)
    assert cfg.noise.type == "loglinear" and cfg.T == 0 and cfg.training.kl_weighting == "time"
    lam = 1.0 / t.double()
    floor = (lam * 0.5 * cfg.model.latent_dim).sum() / (len(t) * cfg.model.length)
    assert float(train.loss - bound.loss) == pytest.approx(float(floor), rel=1e-5)
    assert "free_bits" in train.stats and "free_bits" not in bound.stats


def test_encoder_lr_scale_slows_the_encoder_alone(tmp_path):
    def one_step(scale):
        torch.manual_seed(0)
        cfg = make_cfg(
            tmp_path / str(scale),
            "trainer.max_steps=1",
            "training.ema=0",
            "training.loss_strategy=none",
            f"optim.encoder_lr_scale={scale}",
        )
        trainer, module, tokenizer = build(cfg)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        train_dl, _ = dataloader.get_dataloaders(cfg, tokenizer)
        trainer.fit(module, train_dl)
        after = module.state_dict()
        moved = {k: float((after[k] - before[k]).abs().max()) for k in before}
        groups = trainer.optimizers[0].param_groups
        return moved, groups

    full, groups_full = one_step(1.0)
    frozen, groups = one_step(0.0)
    assert len(groups_full) == 1  # scale 1: the single group checkpoints always had
    assert [g["lr"] for g in groups][1] == 0.0
    assert all(v == 0.0 for k, v in frozen.items() if k.startswith("encoder."))
    assert any(v > 0.0 for k, v in full.items() if k.startswith("encoder."))
    dec = [k for k in full if k.startswith("backbone.")]
    assert all(frozen[k] == pytest.approx(full[k]) for k in dec)  # the decoder steps alike


def test_ppl_eval_json_reports_the_collapse_diagnostics(tmp_path, capsys):
    prior = ["decoder.mu_init_std=0", "decoder.init_log_sigma=0"]  # untrained r = the prior
    cfg = make_cfg(tmp_path, "trainer.limit_val_batches=2", *prior)
    trainer, module, tokenizer = build(cfg)
    _, valid = dataloader.get_dataloaders(cfg, tokenizer, skip_train=True)
    run_ppl_eval(cfg, module, trainer, valid, "untrained")
    saved = json.loads((tmp_path / "ppl_eval.json").read_text())
    d = cfg.model.latent_dim
    assert len(saved["kl_per_dim"]) == d and saved["latent_dims"] == d
    assert saved["active_units"] == 0
    assert abs(saved["mutual_information"]) < 1e-6
    assert set(saved["kl_by_t"]) == {f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)}
    assert saved["mi_rows"] == saved["sequences"]
    assert "beta=1" in saved["bound"] and "kl_weighting=time" in saved["bound"]
    out = capsys.readouterr().out
    assert "the latent z has collapsed" in out and "decoder.fade_to_prior=True" in out

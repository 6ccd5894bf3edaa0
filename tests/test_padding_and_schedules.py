"""Padded rows (data.wrap=False) and every noise schedule, through a real training step and
a real validation, against a float64 re-implementation of the objectives written here
from the maths (no call into losses.py, objectives.py or noise_schedule.py).

The module is composed from the Hydra configs and trained / validated by Lightning; a
spy around `compute_loss` records what the code computed and, with the same networks
and the same noise (the step's mask uniforms and latent normals, or the masked tokens
and z the networks were given), recomputes the per-sequence loss independently:

    per_seq = lam_rec(t) * sum_{masked real l} -log p(x0^l | xt, z) + lam_kl(t) * KL(z)

where padding is never masked, never a token of the normaliser and (per-position
latents) never part of the KL.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny import MICRO_MODEL, QUIET

import config_check
import dataloader
import runner
from data.sources import bible_verses

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ["loglinear", "linear", "cosine", "geometric"]
RTOL, ATOL = 1e-3, 1e-3  # float32 code vs float64 reference (geometric: 1 - alpha ~ 1e-4)


# ------------------------------------------------------------------ the reference maths


def alpha_and_slope(noise, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t and d alpha_t / dt of configs/noise/<type>.yaml, in float64, by hand."""
    if noise.type == "loglinear":  # alpha = 1 - (1 - eps) t
        return 1 - (1 - noise.eps) * t, torch.full_like(t, -(1 - noise.eps))
    if noise.type == "linear":  # alpha = exp(-(s_min + t (s_max - s_min)))
        rate = noise.sigma_max - noise.sigma_min
        alpha = torch.exp(-(noise.sigma_min + t * rate))
        return alpha, -rate * alpha
    if noise.type == "cosine":  # alpha = eps + (1 - eps) cos(pi t / 2)
        alpha = noise.eps + (1 - noise.eps) * torch.cos(math.pi * t / 2)
        return alpha, -(1 - noise.eps) * (math.pi / 2) * torch.sin(math.pi * t / 2)
    assert noise.type == "geometric"  # alpha = exp(-s_min^(1 - t) s_max^t)
    total = noise.sigma_min ** (1 - t) * noise.sigma_max**t
    alpha = torch.exp(-total)
    return alpha, -alpha * total * math.log(noise.sigma_max / noise.sigma_min)


def reference_weights(cfg, t: torch.Tensor, weighting: str | None = None):
    """(t used for masking, lam_rec, lam_kl) of the NELBO / DELBO, each (B,) float64.

    T = 0: the continuous-time weight w(t) = -alpha'_t / (1 - alpha_t) on both terms.
    T > 0: t is rounded up onto {1/T, ..., 1}; a masked token at t is revealed at
    s = t - 1/T with probability (alpha_s - alpha_t) / (1 - alpha_t), and a uniformly
    drawn step of T counts T times: lam_rec = T (alpha_s - alpha_t) / (1 - alpha_t), with
    alpha_s = 1 at the last step (the chain ends at the data). The KL: the same weight
    (kl_weighting=time) or once per step, T (kl_weighting=steps).
    """
    steps, weighting = cfg.T, weighting or cfg.training.kl_weighting
    if steps == 0:
        alpha, slope = alpha_and_slope(cfg.noise, t)
        w = -slope / (1 - alpha)
        return t, w, w
    t = torch.clamp(torch.ceil(t * steps), min=1) / steps
    s = t - 1 / steps
    a_t = alpha_and_slope(cfg.noise, t)[0]
    a_s = torch.where(s < 0.5 / steps, 1.0, alpha_and_slope(cfg.noise, s.clamp_min(0))[0])
    lam_rec = steps * (a_s - a_t) / (1 - a_t)
    return t, lam_rec, (torch.full_like(t, float(steps)) if weighting == "steps" else lam_rec)


def normal_logpdf(z, mean, log_std):
    return -0.5 * ((z - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)


@torch.no_grad()
def reference_loss(module, batch, t, beta=1.0, mask_u=None, z_eps=None, xt_seen=None, z_seen=None):
    """The loss of `batch` recomputed in float64 from the networks' logits and r's moments.

    Training passes the step's noise (mask_u, z_eps); evaluation draws its own, so there
    the masked positions come from the xt the decoder saw and z from its input (xt_seen,
    z_seen); which of those positions are padding is checked by the callers.
    """
    cfg, vocab = module.cfg, module.vocab.size  # [MASK] = vocab; ids >= vocab never compete
    assert not cfg.time_conditioning and cfg.training.num_particles == 1
    x0, real = batch["input_ids"], batch["attention_mask"].bool()
    scored = real.clone()  # keep_frame=True: BOS (and, wrapped, EOS at L-1) are given
    if cfg.keep_frame:
        scored[:, 0] = False
        if cfg.data.wrap:
            scored[:, -1] = False
    t, lam_rec, lam_kl = reference_weights(cfg, t.double())
    p_mask = 1 - alpha_and_slope(cfg.noise, t)[0]
    if mask_u is not None:
        masked = (mask_u.double() < p_mask[:, None]) & scored
    else:
        masked = xt_seen == vocab
    xt = torch.where(masked, vocab, x0)
    sigma, out = torch.zeros(len(x0)), {"kl": None, "kl_padding": None}
    kwargs = {}
    per_seq = torch.zeros(len(x0), dtype=torch.float64)
    if module.encoder is not None:
        mu, log_sigma = (v.double() for v in module.encoder(x0, ~masked, sigma, real))
        if cfg.decoder.fade_to_prior:  # r_t = N(sqrt(p) mu, 1 - p + p sigma^2)
            p = p_mask.view(-1, *[1] * (mu.dim() - 1))
            mu, log_sigma = p.sqrt() * mu, 0.5 * torch.log(1 - p + p * torch.exp(2 * log_sigma))
        z = z_seen.double() if z_eps is None else mu + log_sigma.exp() * z_eps[:, 0].double()
        kl = normal_logpdf(z, mu, log_sigma) - normal_logpdf(z, 0.0, torch.zeros(()))
        closed = 0.5 * (mu**2 + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma)
        keep = real[..., None].double() if mu.dim() == 3 else torch.ones_like(mu)
        out["kl"] = (kl * keep).flatten(1).sum(1)
        out["kl_closed"] = (closed * keep).flatten(1).sum(1)
        out["kl_padding"] = (kl * (1 - keep)).flatten(1).sum(1)
        per_seq = per_seq + lam_kl * beta * out["kl"]
        kwargs["z"], out["z"] = z.float(), z
    logits = module.backbone(xt, sigma, key_mask=real, **kwargs).double()[..., :vocab]
    logp = torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    out["nll"] = -(logp * masked).sum(1)
    out["per_seq"] = per_seq + lam_rec * out["nll"]
    out.update(xt=xt, masked=masked, tokens=int(scored.sum()), lam_rec=lam_rec, lam_kl=lam_kl)
    return out


# --------------------------------------------------------------- the module and its spy


@dataclass
class Call:
    batch: dict
    t: torch.Tensor
    train: bool
    out: object  # objectives.LossOutput as the code computed it
    xt_seen: torch.Tensor  # the decoder's input tokens
    ref: dict  # reference_loss with the same noise


def spy_on_losses(module) -> list[Call]:
    """Record every compute_loss of the module with the reference loss of the same call
    (computed at once, with the weights the call used)."""
    calls, seen, original = [], {}, module.compute_loss

    def decoder_input(net, args, kwargs):
        seen.setdefault("xt", args[0].detach().clone())
        if kwargs.get("z") is not None:
            seen.setdefault("z", kwargs["z"].detach().clone())

    def compute_loss(batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        seen.clear()
        hook = module.backbone.register_forward_pre_hook(decoder_input, with_kwargs=True)
        try:
            out = original(batch, t, beta, num_particles, draws, train)
        finally:
            hook.remove()
        mask_u, z_eps = (None, None) if draws is None else (draws.mask_u, draws.z_eps)
        # beta = 1: training.loss_strategy=none, and evaluation's bound is at beta = 1
        ref = reference_loss(module, batch, t, 1.0, mask_u, z_eps, seen["xt"], seen.get("z"))
        calls.append(Call(batch, t.detach().clone(), train, out, seen["xt"], ref))
        return out

    module.compute_loss = compute_loss
    return calls


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3000 KJV verses, one document each: at 32 tokens most unwrapped rows end in padding.
    One cache for the module, so the BPE of data=local_text is trained once."""
    root = tmp_path_factory.mktemp("verses")
    (root / "verses.txt").write_text("\n\n".join(v["text"] for v in bible_verses()[:3000]))
    return root


def build(corpus: Path, tmp_path: Path, *overrides: str):
    """The module, trainer and loaders of data=local_text with data.wrap=False (padded)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                *MICRO_MODEL,
                *QUIET,
                "data=local_text",
                f"data.path={corpus / 'verses.txt'}",
                "data.wrap=False",
                f"data.cache_dir={corpus / 'cache'}",
                "loader.global_batch_size=8",
                "loader.eval_batch_size=16",
                "trainer.limit_val_batches=1",
                "trainer.max_steps=1",
                "training.loss_strategy=none",  # beta = 1 from the first step
                "training.ema=0",  # validation sees the (randomised) live weights
                "decoder.mu_init_std=0.3",
                "decoder.init_log_sigma=-1",
                f"checkpointing.save_dir={tmp_path}",
                f"eval.output_dir={tmp_path}",
                *overrides,
            ],
        )
    config_check.validate_config(cfg)
    runner.derive_batch_sizes(cfg, 1)
    tokenizer = dataloader.get_tokenizer(cfg.data)
    module = runner.build_module(cfg, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():  # informative networks: every position's log p and z matter
        for name, p in module.named_parameters():  # r's head: decoder.* (KL ~ the recon)
            if not name.startswith("encoder.output_layer.linear"):
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    train_dl, valid_dl = dataloader.get_dataloaders(cfg, tokenizer)
    return cfg, module, trainer, train_dl, valid_dl


def train_and_validate(corpus, tmp_path, *overrides):
    """One real training step and one validation (one batch of 16 rows), spied on."""
    cfg, module, trainer, train_dl, valid_dl = build(corpus, tmp_path, *overrides)
    calls = spy_on_losses(module)
    trainer.fit(module, train_dl)
    (train,) = [c for c in calls if c.train]
    trainer.validate(module, dataloaders=valid_dl, verbose=False)
    evals = [c for c in calls if not c.train]
    assert len(evals) == 1 and len(calls) == 2
    return cfg, module, train, evals[0], dict(module.results)


def assert_matches_reference(call: Call):
    close = torch.testing.assert_close
    close(call.out.per_seq.detach().double(), call.ref["per_seq"], rtol=RTOL, atol=ATOL)
    close(call.out.loss.detach().double(), call.ref["per_seq"].sum() / call.ref["tokens"],
          rtol=RTOL, atol=ATOL)  # fmt: skip


# ------------------------------------------------------------------------------ padding

PADDING_CASES = {
    "mdlm": ["training.loss_type=mdlm"],
    "vae-one-z": ["training.loss_type=vae", "model.latent1d=True"],
    "vae-z-per-position": ["training.loss_type=vae", "model.latent1d=False"],
}


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_padding_is_never_masked_counted_or_in_the_kl(corpus, tmp_path, case):
    """Unwrapped rows end in padding (attention_mask 0). In a training step and in a
    validation: no padding position is masked (the decoder sees the pad id there), the
    normaliser is the real tokens only, per-position latents of padding are not in the KL,
    and the per-sequence loss equals the reference that skips padding. Validation's
    reported nll / tokens / kl are those of the reference."""
    cfg, module, train, val, results = train_and_validate(corpus, tmp_path, *PADDING_CASES[case])
    for call in (train, val):
        x0, real = call.batch["input_ids"], call.batch["attention_mask"].bool()
        assert (~real).any(1).sum() >= 2  # the rows really are padded
        assert ((x0 == module.vocab.pad_id) == ~real).all()  # the unwrapped framing
        assert torch.equal(call.xt_seen[~real], x0[~real])  # padding never masked
        assert call.ref["masked"].any()
        assert int(call.out.num_tokens) == call.ref["tokens"] == int(real.sum())
        if call.train:  # the step's own mask uniforms: the same masks exactly
            assert torch.equal(call.xt_seen, call.ref["xt"])
        assert_matches_reference(call)
        if case == "vae-z-per-position":  # the padding KL would show if it were counted
            assert (call.ref["kl_padding"].abs() > 100 * ATOL).any()
    real = val.batch["attention_mask"].bool()
    assert results["tokens"] == int(real.sum()) and results["sequences"] == len(real)
    nll = float(val.ref["per_seq"].sum()) / int(real.sum())
    assert results["nll"] == pytest.approx(nll, rel=RTOL)
    if module.encoder is not None:
        kl, closed = val.ref["kl"].mean(), val.ref["kl_closed"].mean()
        assert results["kl"] == pytest.approx(float(kl), rel=RTOL, abs=ATOL)
        assert results["kl_closed"] == pytest.approx(float(closed), rel=RTOL, abs=ATOL)


@pytest.mark.parametrize(
    "case",
    [
        ["training.loss_type=mdlm"],
        ["training.loss_type=vae", "model.latent1d=False"],
        ["training.loss_type=mdlm", "data.wrap=True"],
    ],
    ids=["mdlm-padded", "vae-z-per-position-padded", "mdlm-wrapped"],
)
def test_keep_frame_never_masks_the_frame_and_counts_only_the_rest(corpus, tmp_path, case):
    """keep_frame=True: BOS at 0 (and EOS at L-1 of wrapped rows) is never masked, in a
    training step and in a validation; the bound's tokens are the real tokens outside the
    frame, and the per-sequence loss equals the reference that scores only those."""
    cfg, module, train, val, results = train_and_validate(
        corpus, tmp_path, *case, "keep_frame=True"
    )
    frame = [0, cfg.model.length - 1] if cfg.data.wrap else [0]
    for call in (train, val):
        x0, real = call.batch["input_ids"], call.batch["attention_mask"].bool()
        assert (x0[:, 0] == module.vocab.bos_id).all()
        if cfg.data.wrap:
            assert (x0[:, -1] == module.vocab.eos_id).all()
        assert torch.equal(call.xt_seen[:, frame], x0[:, frame])  # the frame never masked
        assert call.ref["masked"][:, 1:].any()
        assert (
            int(call.out.num_tokens) == call.ref["tokens"] == int(real.sum()) - len(frame) * len(x0)
        )
        assert_matches_reference(call)
    assert results["tokens"] == val.ref["tokens"]
    nll = float(val.ref["per_seq"].sum()) / val.ref["tokens"]
    assert results["nll"] == pytest.approx(nll, rel=RTOL)


# ---------------------------------------------------------------------------- schedules

WEIGHTINGS = [(0, "time"), (4, "time"), (4, "steps")]


@pytest.mark.parametrize("steps,weighting", WEIGHTINGS, ids=[f"T{s}-{w}" for s, w in WEIGHTINGS])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_weights_training_and_evaluation_losses(
    corpus, tmp_path, schedule, steps, weighting
):
    """noise=<schedule>, T and training.kl_weighting: the per-sequence DELBO of a training
    step and of a validation equals the reference's lam_rec (-recon) + lam_kl KL, whose
    weights come from the schedule's closed form above (discretised t for T > 0)."""
    cfg, module, train, val, results = train_and_validate(
        corpus, tmp_path, f"noise={schedule}", f"T={steps}", f"training.kl_weighting={weighting}",
        "training.loss_type=vae",
    )  # fmt: skip
    assert module.spec.noise.__class__.__name__.lower() == schedule
    for call in (train, val):
        assert_matches_reference(call)
        if steps:  # the KL's weight matters here: the other weighting would be told apart
            other = "steps" if weighting == "time" else "time"
            lam_kl = reference_weights(cfg, call.t.double(), other)[2]
            assert ((lam_kl - call.ref["lam_kl"]) * call.ref["kl"]).abs().max() > 100 * ATOL
    nll = float(val.ref["per_seq"].sum()) / val.ref["tokens"]
    assert results["nll"] == pytest.approx(nll, rel=RTOL)

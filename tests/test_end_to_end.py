"""Whole jobs on the embedded corpus: train -> ppl_eval -> sample_eval, and the module's loops."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny import TINY

import dataloader
import main
import runner
from algorithms import objectives
from checkpointing.checkpoints import CheckpointError, load_for_eval, read_checkpoint
from evaluation.jobs import run_ppl_eval, run_sample_eval
from models.dit import round_up

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                *TINY,
                f"checkpointing.save_dir={tmp_path}",
                f"eval.output_dir={tmp_path}",
                f"data.cache_dir={os.environ.get('VADD_CACHE_DIR', tmp_path / 'cache')}",
                *overrides,
            ],
        )
    return cfg


def build(cfg, logger=False):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.trainer.max_steps,
        limit_val_batches=cfg.trainer.limit_val_batches,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=cfg.trainer.val_check_interval,
    )
    runner.derive_batch_sizes(cfg, 1)
    tokenizer = dataloader.get_tokenizer(cfg.data)
    return trainer, runner.build_module(cfg, tokenizer), tokenizer


def validate(trainer, module, cfg, tokenizer, draws=1):
    _, valid = dataloader.get_dataloaders(cfg, tokenizer, skip_train=True)
    module.eval_draws = draws
    trainer.validate(module, dataloaders=valid, verbose=False)
    return dict(module.results)


@pytest.mark.parametrize("loss_type", ["vae", "mdlm"])
def test_untrained_perplexity_is_vocabulary_size(tmp_path, loss_type):
    """Uniform predictions: NELBO per token = (1 - eps) log V, so PPL = V^(1 - eps) ~ V.

    The estimate's only noise is the number of masked tokens weighted by 1/t (relative
    variance ~ log(1/eps) / tokens); 12 draws over the whole validation split (~58k
    tokens) put 5% at more than 3 standard deviations.
    """
    cfg = make_cfg(
        tmp_path,
        f"training.loss_type={loss_type}",
        "model.length=128",
        "trainer.limit_val_batches=1.0",
        "loader.eval_batch_size=64",
    )
    trainer, module, tokenizer = build(cfg)
    results = validate(trainer, module, cfg, tokenizer, draws=12)
    vocab = module.vocab.size
    assert abs(results["ppl"] - vocab) / vocab < 0.05, (results["ppl"], vocab)
    if loss_type == "vae":  # the zero-init encoder equals the prior: KL is exactly 0
        assert abs(results["kl"]) < 1e-6
        assert abs(results["prior_ppl"] - vocab) / vocab < 0.05


def test_short_training_lowers_validation_nll(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_steps=40", "trainer.val_check_interval=1000")
    trainer, module, tokenizer = build(cfg)
    before = validate(trainer, module, cfg, tokenizer)["nll"]
    train_dl, valid_dl = dataloader.get_dataloaders(cfg, tokenizer)
    trainer.fit(module, train_dl)
    after = validate(trainer, module, cfg, tokenizer)["nll"]
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize("loss_type", ["vae", "mdlm"])
def test_ema_is_swapped_in_for_validation_and_restored(tmp_path, loss_type):
    cfg = make_cfg(tmp_path, f"training.loss_type={loss_type}", "trainer.max_steps=3")
    trainer, module, tokenizer = build(cfg)
    train_dl, _ = dataloader.get_dataloaders(cfg, tokenizer)
    trainer.fit(module, train_dl)
    live = [p.detach().clone() for p in module.trainable_parameters()]
    assert any(not torch.equal(a, s) for a, s in zip(live, module.ema.shadow, strict=True))
    ema_nll = validate(trainer, module, cfg, tokenizer)["nll"]
    assert all(torch.equal(a, p) for a, p in zip(live, module.trainable_parameters(), strict=True))
    module.cfg.eval.disable_ema = True
    raw_nll = validate(trainer, module, cfg, tokenizer)["nll"]
    assert ema_nll != raw_nll


def test_encoder_training_times_updates_only_the_encoder(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "training.encoder_training_times=3",
        "trainer.max_steps=1",
        "training.ema=0",
        "training.loss_strategy=none",  # beta = 1: the KL term gives the encoder a gradient
    )
    trainer, module, tokenizer = build(cfg)
    train_dl, _ = dataloader.get_dataloaders(cfg, tokenizer)
    calls = []
    original = module._encoder_only_step

    def spy(batch, t, beta, draws=None):
        dec = [p.detach().clone() for p in module.backbone.parameters()]
        enc = [p.detach().clone() for p in module.encoder.parameters()]
        original(batch, t, beta, draws)
        dec_same = all(
            torch.equal(a, p) for a, p in zip(dec, module.backbone.parameters(), strict=True)
        )
        enc_moved = any(
            not torch.equal(a, p) for a, p in zip(enc, module.encoder.parameters(), strict=True)
        )
        calls.append((dec_same, enc_moved))

    module._encoder_only_step = spy
    trainer.fit(module, train_dl)
    assert len(calls) == 2  # n - 1 extra steps
    assert all(dec_same and enc_moved for dec_same, enc_moved in calls), calls
    assert trainer.global_step == 1  # extra steps do not count as training steps


def test_ppl_eval_iwae_reports_bound_and_particles(tmp_path):
    cfg = make_cfg(tmp_path, "eval.num_particles=4")
    trainer, module, tokenizer = build(cfg)
    _, valid = dataloader.get_dataloaders(cfg, tokenizer, skip_train=True)
    results = run_ppl_eval(cfg, module, trainer, valid, "untrained")
    saved = json.loads((tmp_path / "ppl_eval.json").read_text())
    assert saved["num_particles"] == 4 and "IWAE-DELBO (K=4)" in saved["bound"]
    assert math.isclose(saved["ppl"], results["ppl"])


def test_ppl_eval_of_a_local_corpus_records_its_held_out_share(tmp_path):
    from data.sources import bible_chapters

    corpus = tmp_path / "corpus.txt"  # 120 chapters as paragraphs: ~430,000 characters
    corpus.write_text("\n\n".join(bible_chapters()[:120]))
    cfg = make_cfg(tmp_path, "data=local_text", f"data.path={corpus}",
                   f"data.cache_dir={tmp_path / 'cache'}", "model.length=32",
                   "trainer.limit_val_batches=1.0")  # fmt: skip
    trainer, module, tokenizer = build(cfg)
    _, valid = dataloader.get_dataloaders(cfg, tokenizer, skip_train=True)
    run_ppl_eval(cfg, module, trainer, valid, "untrained")
    saved = json.loads((tmp_path / "ppl_eval.json").read_text())
    split = saved["split"]
    assert split["documents"] == 120 and 3 <= split["validation_documents"] <= 12
    assert 0.045 < split["validation_share"] < 0.055  # data.valid_fraction=0.05
    assert split["validation_characters"] > cfg.data.valid_min_chars
    assert saved["sequences"] == saved["rows_in_split"] == len(valid.dataset)


def _run(args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "main.py", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_then_ppl_eval_then_sample_eval_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    common = [
        *TINY,
        "training.kl_hold_steps=0",
        "training.kl_weight_interval=10",
        "training.init_kl_weight=0.2",
    ]
    _run(
        [
            f"hydra.run.dir={run_dir}",
            *common,
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "trainer.log_every_n_steps=1",
        ]
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    betas = [float(r["train/beta"]) for r in rows if r.get("train/beta")]
    assert betas[0] == pytest.approx(0.2) and betas[-1] == 1.0
    assert all(b2 >= b1 for b1, b2 in zip(betas, betas[1:], strict=False))
    assert betas.count(1.0) >= 9  # reached 1 at step 10 and stayed there
    val_nll = [float(r["val/nll"]) for r in rows if r.get("val/nll")]
    assert len(val_nll) == 2 and val_nll[1] < val_nll[0] - 0.1, val_nll  # the same masks each time

    eval_dir = tmp_path / "eval"
    _run(
        [
            f"hydra.run.dir={eval_dir}",
            *common,
            "mode=ppl_eval",
            f"eval.checkpoint_path={ckpt}",
            "+eval.ppl_times=2",
        ]
    )
    ppl = json.loads((eval_dir / "ppl_eval.json").read_text())
    assert ppl["bound"].startswith("negative DELBO") and ppl["weights"] == "EMA"
    assert len(ppl["ppl_per_draw"]) == 2 and ppl["ppl"] == pytest.approx(math.exp(ppl["nll"]))
    # An untrained model scores (1 - eps) log V nats per token (PPL 2032 here, see
    # test_untrained_perplexity_is_vocabulary_size), +- 0.06 over two draws of the split.
    # These 20 steps reach 7.16 nats, 0.45 below it: 0.2 keeps both > 3 standard errors away.
    untrained = (1 - ppl["config"]["training"]["sampling_eps"]) * math.log(2048)
    assert ppl["nll"] < untrained - 0.2, (ppl["nll"], untrained)
    # the whole split, although TINY limits training's validations to 2 batches
    assert ppl["sequences"] == ppl["rows_in_split"] > 2 * 16 and ppl["limit_batches"] is None

    for fixz in ("True", "False"):
        _run(
            [
                f"hydra.run.dir={eval_dir}",
                *common,
                "mode=sample_eval",
                f"eval.checkpoint_path={ckpt}",
                f"sampling.fixz={fixz}",
                "sampling.steps=8",
                "loader.eval_batch_size=3",
            ]
        )
        out = json.loads((eval_dir / f"samples_vae_T8_fixz{fixz}_seed1.json").read_text())
        assert out["num_samples"] == 3 and out["fixz"] == (fixz == "True")
        assert all(len(ids) == 64 for ids in out["token_ids"])
        assert all(max(ids) < 2048 for ids in out["token_ids"])  # no [MASK] left
        assert (eval_dir / f"samples_vae_T8_fixz{fixz}_seed1.txt").exists()


@pytest.mark.parametrize("limit,expected", [(None, 1.0), (3, 3), (0.5, 0.5)])
def test_ppl_eval_limits_batches_only_when_asked_for_that_mode(tmp_path, limit, expected):
    cfg = make_cfg(tmp_path, "mode=ppl_eval", "eval.checkpoint_path=x.ckpt",
                   f"eval.limit_batches={'null' if limit is None else limit}",
                   "trainer.accelerator=cpu", "trainer.devices=1")  # fmt: skip
    assert cfg.trainer.limit_val_batches == 2  # training's limit (TINY)
    assert runner.build_trainer(cfg).limit_val_batches == expected


def test_checkpoint_for_another_vocabulary_or_size_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_steps=1")
    trainer, module, tokenizer = build(cfg)
    trainer.fit(module, dataloader.get_dataloaders(cfg, tokenizer)[0])
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = read_checkpoint(str(path))
    assert ckpt["vadd"]["tokenizer"]["fingerprint"] == dataloader.tokenizer_fingerprint(tokenizer)

    other = build(make_cfg(tmp_path, "data=bible-gpt2"))[1]
    with pytest.raises(CheckpointError, match="2048 tokens.*gives 50257"):
        load_for_eval(other, ckpt, str(path))
    narrow = build(make_cfg(tmp_path, "model.hidden_size=32"))[1]
    rows = round_up(2049, 128)  # 2048 tokens + [MASK], padded to model.vocab_multiple
    shapes = rf"\({rows}, 64\) in the checkpoint but \({rows}, 32\)"
    with pytest.raises(CheckpointError, match=shapes):
        load_for_eval(narrow, ckpt, str(path))
    mdlm = build(make_cfg(tmp_path, "training.loss_type=mdlm"))[1]
    with pytest.raises(CheckpointError, match="set training.loss_type=vae"):
        load_for_eval(mdlm, ckpt, str(path))


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(str(path))


def test_evaluation_uses_the_checkpoints_tokenizer(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_steps=1")
    trainer, module, tokenizer = build(cfg)
    ckpt = {"vadd": {"tokenizer": dataloader.tokenizer_state(tokenizer)}}
    gpt2 = dataloader.get_tokenizer(make_cfg(tmp_path, "data=bible-gpt2").data)
    chosen = runner.eval_tokenizer(ckpt, gpt2)
    text = "In the beginning God created the heaven and the earth."
    assert len(chosen) == len(tokenizer) == 2048
    assert chosen.encode(text) == tokenizer.encode(text) != gpt2.encode(text)


@pytest.mark.parametrize(
    "overrides,predictor",
    [(["training.loss_type=mdlm"], "ddpm_cache"), (["backbone=ar", "parameterization=ar"], "ar")],
)
def test_baselines_train_and_sample(tmp_path, overrides, predictor):
    cfg = make_cfg(tmp_path, *overrides, "trainer.max_steps=3")
    trainer, module, tokenizer = build(cfg)
    train_dl, _ = dataloader.get_dataloaders(cfg, tokenizer)
    trainer.fit(module, train_dl)
    assert module.encoder is None
    from sampling.generation import generate

    x, stats = generate(module, num_samples=2, predictor=predictor, steps=4, length=16)
    assert x.shape == (2, 16) and int(x.max()) < module.vocab.size


def test_steps_weighting_with_one_step_is_recon_plus_kl(tmp_path):
    """kl_weighting=steps, T=1: the loss is exactly -log p(x0 | x1, z) + KL (a VAE ELBO),
    both recomputed here from the module's networks: every t becomes 1, where each token is
    masked w.p. p = 1 - alpha_1 = 0.999, and the cpu recipe's r_1 is r faded by p
    (mean sqrt(p) mu, variance 1 - p + p sigma^2)."""
    cfg = make_cfg(tmp_path, "training.kl_weighting=steps", "T=1")
    _, module, _ = build(cfg)
    torch.manual_seed(0)
    for p in module.parameters():  # leave the zero-init start so KL and recon are non-trivial
        torch.nn.init.normal_(p, std=0.05)
    module.eval()
    vocab, d, p_mask = module.vocab.size, cfg.model.latent_dim, 1 - 1e-3
    x0 = torch.randint(0, vocab, (4, 64))
    draws = objectives.Draws(mask_u=torch.rand(4, 64), z_eps=torch.randn(4, 1, d))
    out = module.compute_loss({"input_ids": x0}, torch.rand(4), 1.0, 1, draws)
    masked = draws.mask_u < p_mask
    xt = torch.where(masked, module.vocab.mask_id, x0)
    with torch.no_grad():
        mu, log_sigma = (v.double() for v in module.encoder(x0, ~masked, torch.zeros(4)))
        sigma = log_sigma.exp()
        if cfg.decoder.fade_to_prior:
            mu, sigma = mu * p_mask**0.5, (1 - p_mask + p_mask * sigma**2).sqrt()
        z = mu + sigma * draws.z_eps[:, 0].double()
        logits = module.backbone(xt, torch.zeros(4), z=z.float())[..., :vocab]
    logp = torch.log_softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
    recon = -(logp * masked).sum(-1)
    r, prior = torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    kl = (r.log_prob(z) - prior.log_prob(z)).sum(-1)
    assert (kl.abs() > 1e-3).all()
    torch.testing.assert_close(out.per_seq.detach().double(), recon + kl, rtol=1e-5, atol=1e-4)


def test_wandb_logger_is_optional_and_offline_safe(tmp_path):
    cfg = make_cfg(
        tmp_path, "logger=wandb", "wandb.mode=disabled", "trainer.max_steps=2", "trainer.devices=1"
    )
    trainer = runner.build_trainer(cfg)
    assert type(trainer.logger).__name__ == "WandbLogger"
    runner.derive_batch_sizes(cfg, 1)
    tokenizer = dataloader.get_tokenizer(cfg.data)
    module = runner.build_module(cfg, tokenizer)
    trainer.fit(module, dataloader.get_dataloaders(cfg, tokenizer)[0])
    assert trainer.global_step == 2
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_sample_eval_scores_every_sample_with_the_judge(tmp_path):
    """gen-PPL of 5 samples with judge batch 2: all 5 scored; text after EOS is not."""
    cfg = make_cfg(
        tmp_path,
        "eval.compute_generative_perplexity=True",
        "eval.gen_ppl_eval_model_name_or_path=smollm2",
        "eval.perplexity_batch_size=2",
        "loader.eval_batch_size=5",
        "sampling.num_sample_batches=1",
        "sampling.steps=4",
        "model.length=32",
    )
    _, module, tokenizer = build(cfg)
    results = run_sample_eval(cfg, module, tokenizer, "untrained")
    assert results["gen_ppl_details"]["num_samples"] + results["gen_ppl_details"]["num_empty"] == 5
    assert results["unigram_entropy"] > 0
    saved = json.loads((tmp_path / "samples_vae_T4_fixzTrue_seed1.json").read_text())
    assert saved["gen_ppl"] == results["gen_ppl"]
    # Two samples rescored here, one forward each (a CPU forward of the judge is the cost):
    # the sample without its BOS and cut before its first EOS, decoded, re-tokenised for the
    # judge and scored after its document separator: -sum log p(token j | tokens < j).
    from evaluation.gen_ppl import load_judge

    judge = load_judge("smollm2")  # the one sample_eval loaded (cached in the process)
    start = judge.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    texts = []
    for row in saved["token_ids"]:
        row = row[1:] if row[0] == bos else row
        texts.append(tokenizer.decode(row[: row.index(eos)] if eos in row else row))
    details = results["gen_ppl_details"]
    scored = [text for text in texts if text]  # the details list the scored samples in order
    assert len(scored) == details["num_samples"]
    for i in range(2):
        ids = judge.tokenizer(scored[i], add_special_tokens=False)["input_ids"]
        x = torch.tensor([[start, *ids]])
        with torch.no_grad():
            logits = judge.model(input_ids=x).logits[0, :-1].float()
        want = float((logits.logsumexp(-1) - logits.gather(1, x[0, 1:, None])[:, 0]).sum())
        assert details["per_sample_tokens"][i] == len(ids)
        # rel 1e-4 of ~350 nats: 10x the float32 gap to sample_eval's padded judge batches
        assert details["per_sample_nll"][i] == pytest.approx(want, rel=1e-4)
    total = sum(details["per_sample_nll"]) / sum(details["per_sample_tokens"])
    assert results["gen_ppl"] == pytest.approx(math.exp(total), rel=1e-9)


def test_eval_without_ema_and_with_another_noise_process(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_steps=1", "training.ema=0")
    trainer, module, tokenizer = build(cfg)
    trainer.fit(module, dataloader.get_dataloaders(cfg, tokenizer)[0])
    path = tmp_path / "raw.ckpt"
    trainer.save_checkpoint(path)
    ckpt = read_checkpoint(str(path))
    evaluator = build(make_cfg(tmp_path))[1]  # the default config keeps an EMA
    load_for_eval(evaluator, ckpt, str(path))
    assert evaluator.ema is None  # never the untrained EMA initialisation
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            evaluator.trainable_parameters(), module.trainable_parameters(), strict=True
        )
    )
    other = build(make_cfg(tmp_path, "time_conditioning=True"))[1]
    with pytest.raises(CheckpointError, match="time_conditioning=False"):
        load_for_eval(other, ckpt, str(path))
    faded = build(make_cfg(tmp_path, "decoder.fade_to_prior=False"))[1]
    with pytest.raises(CheckpointError, match="decoder.fade_to_prior=True"):
        load_for_eval(faded, ckpt, str(path))


def test_validation_t_covers_the_whole_interval_when_training_accumulates(tmp_path, monkeypatch):
    """With 4 accumulation steps a training micro-batch holds 1/4 of the strata; a
    validation batch must hold them all (it used to get t in one quarter of [eps, 1])."""
    cfg = make_cfg(tmp_path, "loader.global_batch_size=8", "loader.batch_size=2")
    _, module, _ = build(cfg)
    assert module.accumulate == 4
    train_t = module.draw_t(16, seed=3, micro=0)
    assert train_t.max() - train_t.min() < 0.25  # one quarter: the window has 4 parts
    seen = []
    original = module.compute_loss
    monkeypatch.setattr(
        module, "compute_loss", lambda batch, t, **kw: seen.append(t) or original(batch, t, **kw)
    )
    batch = {"input_ids": torch.randint(0, 100, (16, 64))}
    module.on_validation_epoch_start()
    module.validation_step(batch, 0)
    (t,) = seen
    strata = torch.floor(t.double() * 16).long()  # one t per 1/16 of [0, 1]
    assert sorted(strata.tolist()) == list(range(16))


def _tensorboard_hparams(path: Path) -> dict:
    """The hparams of a TensorBoard event file, read with the protobuf classes (records:
    8-byte length, 4-byte crc, the Event, 4-byte crc)."""
    from tensorboardX.proto import event_pb2, plugin_hparams_pb2

    data, hparams, at = path.read_bytes(), {}, 0
    while at < len(data):
        n = int.from_bytes(data[at : at + 8], "little")
        event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
        at += 12 + n + 4
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "hparams":
                info = plugin_hparams_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content
                )
                for key, v in info.session_start_info.hparams.items():
                    hparams[key] = v.number_value if v.HasField("number_value") else v.string_value
    return hparams


def _wandb_config(path: Path) -> dict:
    """The config of an offline wandb run from its .wandb file: a LevelDB-style log (a
    7-byte file header, then in 32 KiB blocks records of crc32, 2-byte length, type:
    1 full, 2 first, 3 middle, 4 last) of wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, at, parts, config = path.read_bytes(), 7, b"", {}
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        length, kind = int.from_bytes(data[at + 4 : at + 6], "little"), data[at + 6]
        parts, at = parts + data[at + 7 : at + 7 + length], at + 7 + length
        if kind in (1, 4):
            record = pb.Record.FromString(parts)
            parts = b""
            updates = record.run.config.update if record.HasField("run") else []
            updates = record.config.update if record.HasField("config") else updates
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return config


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_every_logger_gets_the_resolved_config(tmp_path, logger):
    overrides = [f"logger={logger}", "wandb.mode=offline", "trainer.max_steps=2",
                 "model.latent_dim=12", "training.kl_weighting=steps", "T=7"]  # fmt: skip
    if logger == "wandb":  # its own process: the suite's runs have wandb disabled
        cache = os.environ.get("VADD_CACHE_DIR", tmp_path / "cache")
        args = [*TINY, f"hydra.run.dir={tmp_path}", f"data.cache_dir={cache}", *overrides]
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        main.run(make_cfg(tmp_path, *overrides))
    if logger == "tensorboard":
        (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
        hparams = _tensorboard_hparams(events)
        assert hparams["model/latent_dim"] == 12 and hparams["T"] == 7
        assert hparams["training/kl_weighting"] == "steps"
        return
    from omegaconf import OmegaConf

    if logger == "csv":
        saved = OmegaConf.load(tmp_path / "logs" / "hparams.yaml")
    else:  # the offline run's transaction log
        (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
        saved = OmegaConf.create(_wandb_config(path))
    assert saved.model.latent_dim == 12 and saved.T == 7
    assert saved.training.kl_weighting == "steps" and saved.data.name == "bible"


def test_a_training_run_ends_with_a_summary(tmp_path, capsys):
    main.run(make_cfg(tmp_path, "trainer.max_steps=3", "trainer.val_check_interval=3",
                      "logger=none"))  # fmt: skip
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["global_step"] == summary["steps_this_run"] == 3
    assert summary["tokens_this_run"] == 3 * 8 * 64  # steps x global batch x length
    assert summary["last_validation"]["val/nll"] == pytest.approx(summary["best_val_nll"])
    assert Path(summary["best_checkpoint"]).exists() and Path(summary["last_checkpoint"]).exists()
    captured = capsys.readouterr()
    assert "[vadd] trained 3 steps (1,536 tokens)" in captured.out
    assert "💡" not in captured.out + captured.err
    # the same folder again, to step 5: it resumes from last.ckpt at step 3
    main.run(
        make_cfg(tmp_path, "trainer.max_steps=5", "trainer.val_check_interval=3", "logger=none")
    )
    resumed = json.loads((tmp_path / "train_summary.json").read_text())
    assert resumed["global_step"] == 5 and resumed["steps_this_run"] == 2

"""Interchange: warm start from MDLM checkpoints (model.init_from), the decoder-trunk freeze,
and export -> import of Hugging Face-style folders (scripts/export.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mdlm_reference import MDLMReferenceDiT, mdlm_checkpoint, randomize
from safetensors.torch import save_file
from tiny import QUIET, SMALL_MODEL, TINY

import dataloader
import main
import runner
from algorithms import objectives
from checkpointing import folders, interchange
from checkpointing.checkpoints import CheckpointError
from config_check import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # float32: GenDIT vs the reference, same weights, different kernels
REF = dict(vocab=2049, dim=64, heads=4, cond=32, blocks=2)  # = TINY's model on bpe-2048 + mask


def make_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(
            "config",
            overrides=[
                *TINY,
                f"checkpointing.save_dir={tmp_path}",
                f"eval.output_dir={tmp_path}",
                f"data.cache_dir={os.environ.get('VADD_CACHE_DIR', tmp_path / 'cache')}",
                "trainer.val_check_interval=1000",
                "trainer.accelerator=cpu",
                "trainer.devices=1",
                "logger=none",
                *overrides,
            ],
        )


def build_module(cfg):
    runner.derive_batch_sizes(cfg, 1)
    tokenizer = dataloader.get_tokenizer(cfg.data)
    return runner.build_module(cfg, tokenizer), tokenizer


def reference(seed=0, **sizes) -> MDLMReferenceDiT:
    args = {**REF, **sizes}
    net = MDLMReferenceDiT(args["vocab"], args["dim"], args["heads"], args["cond"], args["blocks"])
    return randomize(net, seed)


def with_ema(net: MDLMReferenceDiT, ckpt: dict) -> MDLMReferenceDiT:
    """A copy of the reference holding the checkpoint's EMA shadows."""
    copy = reference()
    with torch.no_grad():
        for p, s in zip(copy.parameters(), ckpt["ema"]["shadow_params"], strict=True):
            p.copy_(s)
    return copy


def save_mdlm_ckpt(path: Path, net: MDLMReferenceDiT) -> dict:
    ckpt = mdlm_checkpoint(net)
    torch.save(ckpt, path)
    return ckpt


def assert_same_log_probs(module, ref: MDLMReferenceDiT, draws: int = 4) -> None:
    """GenDIT(xt, z) = the reference's SUBS log-probabilities on masked positions, any z."""
    gen = torch.Generator().manual_seed(7)
    vocab, mask_id = module.vocab.size, module.vocab.mask_id
    for _ in range(draws):
        x0 = torch.randint(0, vocab, (3, 64), generator=gen)
        masked = torch.rand(x0.shape, generator=gen) < 0.5
        xt = torch.where(masked, mask_id, x0)
        sigma = torch.zeros(3)
        z = 3.0 * torch.randn(3, module.cfg.model.latent_dim, generator=gen)
        with torch.no_grad():
            logits = module.backbone(xt, sigma, z=z)[..., :vocab]  # drop [MASK] and padding
            ours = torch.log_softmax(logits.float(), dim=-1)
            theirs = ref.subs_log_probs(xt, sigma)[..., :vocab]
            recon = objectives._recon(module.backbone, x0, xt, masked, sigma, module.spec, z=z)
        torch.testing.assert_close(ours[masked], theirs[masked], atol=ATOL, rtol=0)
        ref_recon = theirs.gather(-1, x0[..., None])[..., 0].where(masked, 0.0).sum(-1)
        torch.testing.assert_close(recon, ref_recon, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- warm start
@pytest.mark.parametrize("use_ema", [True, False])
def test_mdlm_checkpoint_warm_starts_gendit_exactly(tmp_path, use_ema, capsys):
    net = reference()
    ckpt = save_mdlm_ckpt(tmp_path / "mdlm.ckpt", net)
    expected = with_ema(net, ckpt) if use_ema else net
    module, _ = build_module(make_cfg(tmp_path))
    encoder_before = [p.detach().clone() for p in module.encoder.parameters()]

    loaded = interchange.warm_start(module, str(tmp_path / "mdlm.ckpt"), use_ema)

    assert loaded == len(list(net.parameters()))  # every weight; the rotary buffer skipped
    own = module.backbone.state_dict()
    for name, tensor in expected.named_parameters():  # [:rows]: the model may pad its vocabulary
        assert torch.equal(own[name][: len(tensor)], tensor.detach()), name
    assert_same_log_probs(module, expected)
    if use_ema:  # raw and EMA differ, so loading the other set would fail the check above
        assert not torch.allclose(own["blocks.0.attn_qkv.weight"], net.blocks[0].attn_qkv.weight)
    # the encoder keeps its initialisation; the EMA restarts from the loaded weights
    assert all(
        torch.equal(a, b) for a, b in zip(encoder_before, module.encoder.parameters(), strict=True)
    )
    assert all(
        torch.equal(s, p)
        for s, p in zip(module.ema.shadow, module.trainable_parameters(), strict=True)
    )
    out = capsys.readouterr().out
    assert f"loaded {loaded} tensors ({'EMA' if use_ema else 'raw'} weights)" in out


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_mdlm_folder_warm_starts_gendit_exactly(tmp_path, weights_file):
    net = reference(seed=3)
    folder = tmp_path / "mdlm-hf"
    folder.mkdir()
    config = {"model_type": "mdlm", "vocab_size": 2049, "hidden_dim": 64, "n_blocks": 2}
    (folder / "config.json").write_text(json.dumps(config))
    state = {f"backbone.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    if weights_file == "model.safetensors":
        save_file(state, folder / weights_file)
    else:  # bare DiT names are accepted too
        torch.save(
            {k.removeprefix("backbone."): v for k, v in state.items()}, folder / weights_file
        )
    module, _ = build_module(make_cfg(tmp_path))
    interchange.warm_start(module, str(folder), use_ema=True)  # one set of weights: used as is
    assert_same_log_probs(module, net)


def test_warm_start_into_a_padded_vocabulary(tmp_path):
    """Embedding / output rows past the real vocabulary (padding) are zero-filled."""
    net = reference(seed=5)
    save_mdlm_ckpt(tmp_path / "mdlm.ckpt", net)
    module, _ = build_module(make_cfg(tmp_path))
    rows, backbone = 2176, module.backbone  # round_up(2049, 128)
    backbone.vocab_embed.embedding = torch.nn.Parameter(torch.randn(rows, 64))
    backbone.output_layer.linear = torch.nn.Linear(64, rows)
    module.ema = None
    interchange.warm_start(module, str(tmp_path / "mdlm.ckpt"), use_ema=False)
    assert torch.equal(backbone.vocab_embed.embedding[:2049], net.vocab_embed.embedding)
    assert backbone.vocab_embed.embedding[2049:].abs().sum() == 0
    assert backbone.output_layer.linear.weight[2049:].abs().sum() == 0
    assert backbone.output_layer.linear.bias[2049:].abs().sum() == 0
    assert_same_log_probs(module, net, draws=1)


@pytest.mark.parametrize(
    "sizes,shapes",
    [
        (dict(vocab=101), r"\(101, 64\) in the checkpoint but \(2049, 64\) in the model"),
        (dict(dim=32, heads=2), r"\(2049, 32\) in the checkpoint but \(2049, 64\) in the model"),
    ],
)
def test_checkpoint_for_another_vocabulary_or_size_is_refused(tmp_path, sizes, shapes):
    save_mdlm_ckpt(tmp_path / "other.ckpt", reference(**sizes))
    module, _ = build_module(make_cfg(tmp_path))
    with pytest.raises(CheckpointError, match=shapes):
        interchange.warm_start(module, str(tmp_path / "other.ckpt"), use_ema=True)


def test_refusal_is_one_error_line_from_the_command_line(tmp_path):
    save_mdlm_ckpt(tmp_path / "other.ckpt", reference(vocab=101))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable, "main.py", f"hydra.run.dir={tmp_path / 'run'}", *TINY,
        f"model.init_from={tmp_path / 'other.ckpt'}", "trainer.max_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "(101, 64) in the checkpoint but (2049, 64)" in error[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.init_from=/nonexistent/mdlm.ckpt"], "model.init_from=/nonexistent/mdlm.ckpt does"),
        (["training.freeze_decoder_steps=-1"], "freeze_decoder_steps=-1 is out of range"),
        (["training.freeze_decoder_steps=5"], "set model.init_from="),
        (
            ["training.freeze_decoder_steps=5", "training.loss_type=mdlm", "model.init_from=."],
            "needs training.loss_type=vae",
        ),
        (["model.init_from_ema=maybe"], "init_from_ema='maybe' is not a boolean"),
    ],
)
def test_bad_warm_start_settings_fail_at_start_up(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(make_cfg(tmp_path, *overrides))


# ---------------------------------------------------------------- freeze + runner
def test_freeze_keeps_the_trunk_for_n_steps_and_trains_the_latent_path(tmp_path, capsys):
    net = reference(seed=11)
    ckpt = save_mdlm_ckpt(tmp_path / "mdlm.ckpt", net)
    loaded = {k: v.detach() for k, v in with_ema(net, ckpt).named_parameters()}
    cfg = make_cfg(
        tmp_path,
        f"model.init_from={tmp_path / 'mdlm.ckpt'}",
        "training.freeze_decoder_steps=2",
        "trainer.max_steps=3",
        "training.loss_strategy=none",  # beta = 1: the encoder gets a gradient from step 1
    )
    validate_config(cfg)
    trainer = runner.build_trainer(cfg)
    module, tokenizer = build_module(cfg)
    encoder_init = [p.detach().clone() for p in module.encoder.parameters()]
    snapshots = {}

    def snapshot(*_):
        snapshots[module.global_step] = {
            k: v.detach().clone() for k, v in module.backbone.state_dict().items()
        }

    module.on_train_batch_end = snapshot
    runner.train(cfg, trainer, module, tokenizer)
    assert "loaded 30 tensors (EMA weights)" in capsys.readouterr().out

    for step in (1, 2):  # frozen: the trunk is exactly the loaded EMA weights
        trunk = {k: v for k, v in snapshots[step].items() if not k.startswith("latent_map.")}
        assert trunk.keys() == loaded.keys()
        assert all(torch.equal(v[: len(loaded[k])], loaded[k]) for k, v in trunk.items()), step
    assert not torch.equal(
        snapshots[3]["blocks.0.attn_qkv.weight"], loaded["blocks.0.attn_qkv.weight"]
    )
    latent_out = "latent_map.net.4.weight"  # zeroed by the warm start, trained from step 1
    assert snapshots[1][latent_out].abs().sum() > 0
    assert any(
        not torch.equal(a, b)
        for a, b in zip(encoder_init, module.encoder.parameters(), strict=True)
    )


def test_resumed_run_does_not_warm_start_again(tmp_path, monkeypatch, capsys):
    net = reference(seed=13)
    save_mdlm_ckpt(tmp_path / "mdlm.ckpt", net)
    overrides = [f"model.init_from={tmp_path / 'mdlm.ckpt'}", "trainer.max_steps=2"]
    cfg = make_cfg(tmp_path, *overrides)
    module, tokenizer = build_module(cfg)
    runner.train(cfg, runner.build_trainer(cfg), module, tokenizer)
    calls = []
    monkeypatch.setattr(interchange, "warm_start", lambda *a, **k: calls.append(a))
    cfg = make_cfg(tmp_path, *overrides[:1], "trainer.max_steps=3")
    module, tokenizer = build_module(cfg)
    runner.train(cfg, runner.build_trainer(cfg), module, tokenizer)
    assert calls == [] and module.global_step == 3
    assert "resuming from" in capsys.readouterr().out


# ---------------------------------------------------------------- export / import
def _export(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts/export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _numbers(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("seconds", "checkpoint", "config")}


def test_export_then_import_gives_identical_ppl_and_samples(tmp_path):
    train_dir = tmp_path / "train"
    main.run(make_cfg(train_dir, "trainer.max_steps=4"))
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    assert _export(["--ckpt", str(ckpt), "--out", str(tmp_path / "ema")]) == 0
    assert _export(["--ckpt", str(ckpt), "--out", str(tmp_path / "raw"), "--raw"]) == 0
    folder = tmp_path / "ema"
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "vadd" and config["weights"] == "EMA"
    assert config["vocab"]["model_size"] == 2049 and config["global_step"] == 4
    assert any(k.startswith("encoder.") for k in config["parameters"])
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }

    def evaluate(path, tag, *extra):
        out = tmp_path / tag
        common = [f"eval.checkpoint_path={path}", "sampling.steps=8", "loader.eval_batch_size=3"]
        for mode in ("ppl_eval", "sample_eval"):
            cfg = make_cfg(out, f"mode={mode}", *common, *extra)
            validate_config(cfg)
            main.run(cfg)
        ppl = json.loads((out / "ppl_eval.json").read_text())
        samples = json.loads((out / "samples_vae_T8_fixzTrue_seed1.json").read_text())
        return _numbers(ppl), samples["token_ids"]

    ppl_ckpt, samples_ckpt = evaluate(ckpt, "from_ckpt")
    ppl_folder, samples_folder = evaluate(folder, "from_folder")
    assert ppl_ckpt == ppl_folder and ppl_folder["weights"] == "EMA"
    assert samples_ckpt == samples_folder
    ppl_raw_ckpt, samples_raw_ckpt = evaluate(ckpt, "raw_ckpt", "eval.disable_ema=True")
    ppl_raw_folder, samples_raw_folder = evaluate(tmp_path / "raw", "raw_folder")
    assert ppl_raw_ckpt["nll"] == ppl_raw_folder["nll"] != ppl_ckpt["nll"]
    assert samples_raw_ckpt == samples_raw_folder


def test_exported_folder_is_refused_with_another_config_or_edited_tokenizer(tmp_path):
    net = reference(seed=17)
    save_mdlm_ckpt(tmp_path / "mdlm.ckpt", net)
    train_dir = tmp_path / "train"
    main.run(make_cfg(train_dir, "trainer.max_steps=1", "training.loss_type=mdlm"))
    folder = tmp_path / "mdlm-export"
    assert _export(["--ckpt", str(train_dir / "checkpoints/last.ckpt"), "--out", str(folder)]) == 0
    # an exported MDLM folder warm-starts a VADD run like any MDLM checkpoint
    module, _ = build_module(make_cfg(tmp_path))
    assert interchange.warm_start(module, str(folder), use_ema=True) == 30
    as_vadd = make_cfg(tmp_path, "mode=ppl_eval", f"eval.checkpoint_path={folder}")
    with pytest.raises(CheckpointError, match="set training.loss_type=mdlm"):
        main.run(as_vadd)
    (folder / "tokenizer.json").write_text(
        (folder / "tokenizer.json").read_text().replace('"<|eos|>"', '"<|end|>"')
    )
    with pytest.raises(CheckpointError, match="tokenizer was changed after export"):
        folders.read_export(str(folder))
    assert _export(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(folder)]) == 2


@pytest.mark.parametrize("damaged", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_truncated_export_file_is_one_line_naming_it(tmp_path, damaged):
    train_dir = tmp_path / "train"
    main.run(make_cfg(train_dir, "trainer.max_steps=1", "training.loss_type=mdlm"))
    folder = tmp_path / "export"
    assert _export(["--ckpt", str(train_dir / "checkpoints/last.ckpt"), "--out", str(folder)]) == 0
    probe = tmp_path / "probe"
    probe.write_text("x")  # the mode this process's umask gives a new file
    for file in folder.iterdir():  # written through a temp file, yet readable like any file
        assert file.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777, file
    target = folder / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    cfg = make_cfg(tmp_path / "eval", "mode=ppl_eval", f"eval.checkpoint_path={folder}",
                   "training.loss_type=mdlm")  # fmt: skip
    with pytest.raises(CheckpointError, match=f"{damaged} cannot be read .*truncated") as err:
        main.run(cfg)
    assert "\n" not in str(err.value)


def test_an_ar_checkpoint_evaluated_with_a_dit_config_names_the_keys_to_set(tmp_path):
    ar = ["backbone=ar", "parameterization=ar", "training.loss_type=mdlm"]
    main.run(make_cfg(tmp_path / "ar", "trainer.max_steps=1", *ar))
    ckpt = tmp_path / "ar" / "checkpoints" / "last.ckpt"
    cfg = make_cfg(tmp_path / "eval", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}")
    with pytest.raises(CheckpointError) as err:
        main.run(cfg)
    message = str(err.value)
    assert "trained with backbone=ar, parameterization=ar, training.loss_type=mdlm" in message
    assert message.endswith("set backbone=ar parameterization=ar training.loss_type=mdlm")
    assert not (tmp_path / "eval" / "ppl_eval.json").exists()


# A fresh interpreter outside the repository: only the exported folder, transformers and
# torch. It loads the folder the documented way and writes the log-probabilities.
HF_LOAD = r"""
import sys, torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
folder, inputs, out = sys.argv[1:4]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder)
x = torch.load(inputs)
with torch.no_grad():
    logp = model(x["xt"], z=x.get("z")).logits
    visible = x["xt"] != tok.mask_token_id
    enc = model.encode(x["x0"], visible=visible) if x.get("z") is not None else None
ids = tok("In the beginning God created the heaven")["input_ids"]
# push_to_hub = save_pretrained + upload: the saved folder (code files included) loads again
model.save_pretrained("resaved")
tok.save_pretrained("resaved")
again = AutoModelForMaskedLM.from_pretrained("resaved", trust_remote_code=True).eval()
with torch.no_grad():
    resaved = again(x["xt"], z=x.get("z")).logits
torch.save({"logp": logp, "enc": enc, "mask_id": tok.mask_token_id, "ids": ids,
            "model_type": config.model_type, "vocab_size": config.vocab_size,
            "resaved": resaved}, out)
"""


@pytest.mark.parametrize("loss_type", ["vae", "mdlm"])
def test_an_export_loads_with_transformers_and_gives_our_log_probs(tmp_path, loss_type):
    from safetensors.torch import load_file

    from algorithms import losses

    train_dir = tmp_path / "train"
    main.run(make_cfg(train_dir, "trainer.max_steps=2", f"training.loss_type={loss_type}"))
    # every weight moved well away from the (zero-initialised AdaLN) start, so that a
    # wrong conditioning, a missing weight or another layout shows in the numbers
    ckpt = torch.load(train_dir / "checkpoints/last.ckpt", weights_only=False)
    gen = torch.Generator().manual_seed(1)
    for value in ckpt["state_dict"].values():
        if value.is_floating_point():
            value.add_(0.05 * torch.randn(value.shape, generator=gen))
    torch.save(ckpt, tmp_path / "moved.ckpt")
    folder = tmp_path / "export"
    assert _export(["--ckpt", str(tmp_path / "moved.ckpt"), "--out", str(folder), "--raw"]) == 0
    # our networks with the exported weights
    module, tokenizer = build_module(make_cfg(tmp_path, f"training.loss_type={loss_type}"))
    weights = load_file(folder / "model.safetensors")
    for name, net in (("backbone", module.backbone), ("encoder", module.encoder)):
        if net is not None:
            own = {k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")}
            net.load_state_dict(own)
    module.eval()
    v = module.vocab.size
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(3, v, (3, 32), generator=gen)
    masked = torch.rand(x0.shape, generator=gen) < 0.5
    xt = torch.where(masked, v, x0)
    z = torch.randn(3, 16, generator=gen) if module.encoder is not None else None
    torch.save({"xt": xt, "x0": x0, "z": z}, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", HF_LOAD, str(folder), "inputs.pt", "out.pt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = torch.load(tmp_path / "out.pt")
    assert hf["model_type"] == "vadd" and hf["mask_id"] == v and hf["vocab_size"] == v + 1
    torch.testing.assert_close(hf["resaved"], hf["logp"], rtol=0, atol=0)
    assert hf["ids"] == tokenizer("In the beginning God created the heaven")["input_ids"]
    with torch.no_grad():
        extra = {} if z is None else {"z": z}
        logits = module.backbone(xt, torch.zeros(3), out_mask=masked, **extra)
        ours = losses.masked_token_logp(logits, x0[masked], v)
    theirs = hf["logp"][masked].gather(1, x0[masked][:, None]).squeeze(1)
    assert ours.std() > 0.1  # far from the uniform start every initialisation shares
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert hf["logp"].shape == (3, 32, v + 1)
    assert torch.isinf(hf["logp"][..., v]).all()  # [MASK] is never predicted
    visible_rows = hf["logp"][~masked]  # an unmasked token carries over: log 1 there
    assert (visible_rows.gather(1, x0[~masked][:, None]) == 0).all()
    assert torch.isinf(visible_rows).sum(1).eq(v).all()
    if z is not None:
        with torch.no_grad():
            mu, log_sigma = module.encoder(x0, ~masked, torch.zeros(3))
        torch.testing.assert_close(hf["enc"][0], mu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf["enc"][1], log_sigma, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- self-describing checkpoints
def _eval_cfg(out: Path, overrides: list[str]):
    """The config of `python main.py <overrides>` without the tiny sizes of make_cfg."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("source", ["ckpt", "folder"])
def test_evaluation_takes_the_architecture_from_the_checkpoint(tmp_path, source):
    from checkpointing.architecture import explicit_keys

    train_dir = tmp_path / "train"
    main.run(make_cfg(train_dir, "trainer.max_steps=2", "decoder.mu_init_std=0.1"))
    path = train_dir / "checkpoints" / "last.ckpt"
    if source == "folder":
        assert _export(["--ckpt", str(path), "--out", str(tmp_path / "export")]) == 0
        path = tmp_path / "export"
    common = [
        "mode=ppl_eval", f"eval.checkpoint_path={path}", "loader.eval_batch_size=16",
        "eval.limit_batches=2", "logger=none", "trainer.accelerator=cpu", "trainer.devices=1",
        f"data.cache_dir={os.environ.get('VADD_CACHE_DIR', tmp_path / 'cache')}", *QUIET,
    ]  # fmt: skip

    def evaluate(tag: str, *extra: str) -> dict:
        out = tmp_path / tag
        overrides = [*common, f"eval.output_dir={out}", f"checkpointing.save_dir={out}", *extra]
        cfg = _eval_cfg(tmp_path / tag, overrides)
        validate_config(cfg)
        main.run(cfg, explicit_keys(overrides, str(ROOT / "configs")))
        return _numbers(json.loads((tmp_path / tag / "ppl_eval.json").read_text()))

    long = evaluate("long", *SMALL_MODEL, "decoder.mu_init_std=0.1", "training.loss_type=vae")
    short = evaluate("short")  # the sizes, latent keys and loss come from the checkpoint
    assert short == long and long["tokens"] > 0
    with pytest.raises(ConfigError, match=r"hidden_size=32 .* trained with model.hidden_size=64"):
        evaluate("wrong", "model.hidden_size=32")
    with pytest.raises(ConfigError, match="training.loss_type=mdlm .* training.loss_type=vae"):
        evaluate("wrong_loss", "training.loss_type=mdlm")
    group = r"model.name=small \(by model=small\), but .*model.name=cpu: drop model=small"
    with pytest.raises(ConfigError, match=group):
        evaluate("wrong_group", "model=small")  # a group choice sets its keys explicitly


def test_explicit_keys_of_a_command_line():
    from checkpointing.architecture import explicit_keys

    keys = explicit_keys(
        ["model=small", "+eval.ppl_times=5", "recipe=verse_set", "training.loss_type=vae"],
        str(ROOT / "configs"),
    )
    assert keys["model.hidden_size"] == keys["model.n_heads"] == "model=small"
    assert keys["eval.ppl_times"] == keys["training.loss_type"] == "the command line"
    assert keys["model.latent_dim"] == keys["trainer.max_steps"] == "recipe=verse_set"
    assert "model.latentMLP" not in keys  # config.yaml's, not small.yaml's
    assert "decoder.hidden_size" not in keys and "decoder.fade_to_prior" in keys


def test_one_call_loads_a_checkpoint_or_folder_into_a_ready_model(tmp_path):
    from diffusion import Diffusion

    load_model = Diffusion.load_from_checkpoint

    train_dir = tmp_path / "train"
    main.run(make_cfg(train_dir, "trainer.max_steps=3", "training.ema=0.5"))
    path = train_dir / "checkpoints" / "last.ckpt"
    assert _export(["--ckpt", str(path), "--out", str(tmp_path / "export")]) == 0
    ckpt = torch.load(path, weights_only=False)
    from_ckpt = Diffusion.load_from_checkpoint(path)  # Lightning's name, no hparams needed
    from_folder = load_model(tmp_path / "export")
    raw = load_model(path, use_ema=False)
    assert not from_ckpt.training and from_ckpt.encoder is not None
    names = [n for n, p in from_ckpt.named_parameters() if p.requires_grad]
    ema = dict(zip(names, ckpt["ema"]["shadow_params"], strict=True))
    for name, p in from_ckpt.named_parameters():
        torch.testing.assert_close(p, ema[name], rtol=0, atol=0)  # the EMA weights
        torch.testing.assert_close(dict(from_folder.named_parameters())[name], p, rtol=0, atol=0)
        torch.testing.assert_close(dict(raw.named_parameters())[name], ckpt["state_dict"][name])
    assert any(not torch.equal(ema[n], ckpt["state_dict"][n]) for n in names)  # they differ
    ids = from_ckpt.tokenizer("In the beginning")["input_ids"]
    assert ids == from_folder.tokenizer("In the beginning")["input_ids"] and len(ids) > 2
    with pytest.raises(CheckpointError, match="no vadd config"):
        save_mdlm_ckpt(tmp_path / "mdlm.ckpt", reference())
        load_model(tmp_path / "mdlm.ckpt")


def test_an_export_names_a_spare_mask_token_when_the_vocabulary_has_its_own(tmp_path):
    """BERT-style vocabularies (lm1b) hold a "[MASK]" of their own at another id: the export
    adds a distinct mask token at the models' [MASK] id V, and vadd reads the tokenizer
    back without it (the training tokenizer, fingerprint and all)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from checkpointing import hf_export
    from data.tokenization import tokenizer_fingerprint, tokenizer_from_state, tokenizer_state

    words = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "the", "earth", "light", "[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]",
                                  eos_token="[SEP]", pad_token="[PAD]")  # fmt: skip
    state = tokenizer_state(tok)
    assert hf_export.save_tokenizer(str(tmp_path), state, len(words), 16) == "<|vadd_mask|>"
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.mask_token == "<|vadd_mask|>" and back.mask_token_id == len(words)
    assert back.convert_tokens_to_ids("[MASK]") == 3  # the vocabulary's own token is kept
    saved = (tmp_path / "tokenizer.json").read_text()
    ours = tokenizer_from_state({**state, "json": hf_export.without_mask_token(saved, 8)})
    assert len(ours) == len(words)
    assert tokenizer_fingerprint(ours) == state["fingerprint"]

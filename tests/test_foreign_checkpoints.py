"""RADD and SEDD folders (checkpointing/foreign.py): warm starts (model.init_from) that
compute what the reference networks compute, evaluation from eval.checkpoint_path, and
one-line refusals of folders that do not fit.

The references (tests/radd_reference.py, tests/sedd_reference.py) import nothing from vadd;
their folders are tiny (hidden 32, 2 blocks, 2 heads, length 16) with every weight
perturbed, so a dropped, swapped or transposed tensor changes the numbers.
"""

import json
from pathlib import Path

import pytest
import radd_reference as radd
import sedd_reference as sedd
import torch
from hydra_jobs import ROOT, compose_job, one_thread

import dataloader
import main
import runner
from checkpointing import foreign, interchange
from checkpointing.architecture import explicit_keys
from checkpointing.checkpoints import CheckpointError, load_for_eval, read_checkpoint
from config_check import ConfigError, validate_config

ATOL = 1e-5  # float32: our networks vs the references, same weights, different kernels
TOKENS = 2048  # data=bible's bpe-2048: the module's vocabulary (+ [MASK] = 2049 rows, 2176)
SIZES = dict(dim=32, heads=2, blocks=2, length=16)
COMMON = [
    "trainer.accelerator=cpu", "trainer.devices=1", "logger=none", "model.length=16",
    "model.hidden_size=32", "model.cond_dim=16", "model.n_heads=2", "model.n_blocks=2",
]  # fmt: skip
RADD_RUN = ["backbone=radd", "training.loss_type=t_DCE"]
SEDD_RUN = ["parameterization=sedd", "training.loss_type=t_DSE", "time_conditioning=True"]
TINY_ENCODER = ["decoder.hidden_size=32", "decoder.cond_dim=16", "decoder.n_heads=2",
                "decoder.n_blocks=1", "model.latent_dim=8"]  # fmt: skip


_BUILT: dict = {}


def build(tmp_path: Path, *overrides: str):
    """The module of COMMON + overrides, built once for the file: a warm start overwrites
    every weight it loads (padding rows zeroed), and every refusal comes before a copy."""
    if overrides not in _BUILT:
        cfg = compose_job(tmp_path, *COMMON, *overrides)
        validate_config(cfg)
        _BUILT[overrides] = module_for(cfg)
    return _BUILT[overrides]


def module_for(cfg):
    runner.derive_batch_sizes(cfg, 1)
    return runner.build_module(cfg, dataloader.get_tokenizer(cfg.data)).eval()


def radd_folder(tmp_path: Path, seed=0, tokens=TOKENS, dim=32, **kw):
    config = radd.radd_config(tokens, dim, SIZES["heads"], SIZES["blocks"], SIZES["length"])
    net = radd.reference(config, seed)
    return radd.write_hub_folder(net, tmp_path / f"radd{seed}", config, **kw), net


def sedd_folder(tmp_path: Path, seed=0, **kw):
    config = sedd.sedd_config(TOKENS, 32, 2, 16, 2, 16, **kw)
    net = sedd.reference(config, seed)
    return sedd.write_hub_folder(net, tmp_path / f"sedd{seed}", config), net


def masked_batch(seed=7, batch=3):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, TOKENS, (batch, SIZES["length"]), generator=gen)
    masked = torch.rand(x0.shape, generator=gen) < 0.5
    return torch.where(masked, TOKENS, x0), masked


def assert_radd_equal(module, ref) -> None:
    """Log-probabilities over the real tokens at masked positions: ours = RADD's output."""
    xt, masked = masked_batch()
    with torch.no_grad():
        ours = torch.log_softmax(module.backbone(xt, torch.zeros(3))[..., :TOKENS].float(), -1)
        theirs = ref(xt)[..., :TOKENS]
    torch.testing.assert_close(ours[masked], theirs[masked], atol=ATOL, rtol=0)


def assert_copied(module, ref) -> None:
    """Every tensor of the reference in the module, token rows first, padding rows zero."""
    own = module.backbone.state_dict()
    for name, tensor in ref.state_dict().items():
        if name.endswith("inv_freq"):
            assert not any(k.endswith("inv_freq") for k in own)  # recomputed, not loaded
            continue
        assert torch.equal(own[name][: len(tensor)], tensor), name
        assert own[name][len(tensor) :].abs().sum() == 0, name  # padding rows


# ---------------------------------------------------------------- warm starts
@pytest.mark.parametrize(
    "weights,nested", [("model.safetensors", False), ("pytorch_model.bin", True)]
)
def test_radd_hub_folder_warm_starts_radd_exactly(tmp_path, weights, nested):
    folder, ref = radd_folder(tmp_path, weights=weights, nested=nested)
    module = build(tmp_path, *RADD_RUN)
    assert interchange.warm_start(module, str(folder), use_ema=True) == 25  # no rotary buffer
    assert module.backbone.vocab_embed.embedding.shape[0] == 2176  # round_up(2049, 128)
    assert_copied(module, ref)
    assert_radd_equal(module, ref)


@pytest.mark.parametrize("use_ema", [True, False])
def test_radd_run_dir_warm_starts_from_its_ema_or_raw_weights(tmp_path, use_ema, capsys):
    config = radd.radd_config(TOKENS, 32, 2, 2, 16, loss_type="lambda_DCE")
    raw = radd.reference(config, seed=1)
    ema = radd.write_run_dir(raw, tmp_path / "run", config)
    module = build(tmp_path, *RADD_RUN)
    interchange.warm_start(module, str(tmp_path / "run"), use_ema=use_ema)
    expected, other = (ema, raw) if use_ema else (raw, ema)
    assert_copied(module, expected)
    assert_radd_equal(module, expected)
    with pytest.raises(AssertionError):  # the two sets differ: the other one would fail
        assert_radd_equal(module, other)
    assert f"({'EMA' if use_ema else 'raw'} weights)" in capsys.readouterr().out


def test_sedd_folder_warm_starts_the_dit_exactly_at_every_noise_level(tmp_path):
    folder, ref = sedd_folder(tmp_path)
    module = build(tmp_path, *SEDD_RUN)
    interchange.warm_start(module, str(folder), use_ema=True)
    assert_copied(module, ref)
    xt, masked = masked_batch()
    for value in (1e-3, 0.05, 0.7, 4.0):  # sigma = -log alpha_t, fed to sigma_map
        sigma = torch.full((3,), value)
        with torch.no_grad():
            logits = module.backbone(xt, sigma)[..., :TOKENS].float()
            theirs = ref(xt, sigma)[..., :TOKENS]  # SEDD's log-score (scale_by_sigma)
            alpha = torch.exp(-torch.tensor(value, dtype=torch.float64))  # float32: 1 - alpha
            score = module.algorithm.log_score(logits[masked], alpha)  # would be off by 6e-5
        ours = torch.log_softmax(logits, -1)[masked]
        torch.testing.assert_close(ours, torch.log_softmax(theirs, -1)[masked], atol=ATOL, rtol=0)
        torch.testing.assert_close(score, theirs[masked], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- evaluation
def eval_cfg(out: Path, *overrides: str):
    """The config `python main.py <overrides>` runs, the architecture from the folder."""
    cfg = compose_job(out, *COMMON[:3], *overrides)  # cpu, one device, no logger
    validate_config(cfg)
    return cfg


def adopted(out: Path, path, *extra: str):
    """(config, checkpoint) of `mode=ppl_eval eval.checkpoint_path=path <extra>` after the
    folder's architecture is adopted (main.py does this before validating)."""
    overrides = ["mode=ppl_eval", f"eval.checkpoint_path={path}", *extra]
    cfg, ckpt = eval_cfg(out, *overrides), read_checkpoint(str(path))
    runner.adopt_architecture(cfg, ckpt, explicit_keys(overrides, str(ROOT / "configs")))
    return cfg, ckpt


def test_evaluation_of_a_run_dir_loads_its_raw_weights_and_its_ema(tmp_path):
    config = radd.radd_config(TOKENS, 32, 2, 2, 16, loss_type="k_DCE")
    raw = radd.reference(config, seed=2)
    ema = radd.write_run_dir(raw, tmp_path / "run", config)
    cfg, ckpt = adopted(tmp_path, tmp_path / "run")
    assert (cfg.backbone, cfg.training.loss_type, cfg.model.hidden_size) == ("radd", "k_DCE", 32)
    module = module_for(cfg)
    load_for_eval(module, ckpt, str(tmp_path / "run"))
    assert_radd_equal(module, raw)  # eval.disable_ema=True evaluates these
    module.ema.copy_to(module.trainable_parameters())  # what evaluation swaps in otherwise
    assert_radd_equal(module, ema)


def test_evaluation_of_a_sedd_folder_takes_sedds_process(tmp_path):
    geometric = {"type": "geometric", "sigma_min": 1e-4, "sigma_max": 20}
    folder, _ = sedd_folder(tmp_path, noise=geometric)
    cfg, _ = adopted(tmp_path, folder)
    validate_config(cfg)
    assert (cfg.backbone, cfg.parameterization, cfg.training.loss_type) == ("dit", "sedd", "t_DSE")
    assert cfg.time_conditioning is True and cfg.model.cond_dim == 16
    assert dict(cfg.noise) == {"type": "geometric", "sigma_min": 1e-4, "sigma_max": 20.0}


def test_sample_eval_of_a_gpt2_radd_folder_runs_with_gpt2s_tokenizer(tmp_path, capsys):
    """A RADD model with GPT-2's vocabulary, nothing else given: the architecture from
    its config.json, GPT-2's tokenizer built offline, samples written."""
    folder, _ = radd_folder(tmp_path, tokens=foreign.GPT2_TOKENS)
    overrides = [
        "mode=sample_eval", f"eval.checkpoint_path={folder}", "sampling.steps=4",
        "loader.eval_batch_size=2", "sampling.num_sample_batches=1",
    ]  # fmt: skip
    cfg = eval_cfg(tmp_path / "eval", *overrides)
    with one_thread():
        main.run(cfg, explicit_keys(overrides, str(ROOT / "configs")))
    out = capsys.readouterr().out
    assert "architecture from the checkpoint: backbone=radd" in out
    assert "vocab 50257 (+1 mask)" in out and "checkpoint's tokenizer (gpt2)" in out
    (file,) = (tmp_path / "eval").glob("samples_*.json")
    samples = json.loads(file.read_text())
    assert samples["length"] == 16 and len(samples["token_ids"]) == 2
    assert all(0 <= i < foreign.GPT2_TOKENS for row in samples["token_ids"] for i in row)


# ---------------------------------------------------------------- refusals
def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _radd_other_hidden(tmp_path):
    return radd_folder(tmp_path, dim=48)[0]


def _radd_other_vocab(tmp_path):
    return radd_folder(tmp_path, tokens=100)[0]


def _radd_truncated(tmp_path):
    folder = radd_folder(tmp_path)[0]
    _truncate(folder / "model.safetensors")
    return folder


def _radd_no_weights(tmp_path):
    folder = radd_folder(tmp_path)[0]
    (folder / "model.safetensors").unlink()
    return folder


def _run_dir_truncated(tmp_path):
    config = radd.radd_config(TOKENS, 32, 2, 2, 16)
    radd.write_run_dir(radd.reference(config), tmp_path / "run", config)
    _truncate(tmp_path / "run" / "checkpoints-meta" / "checkpoint.pth")
    return tmp_path / "run"


def _sedd_uniform(tmp_path):
    return sedd_folder(tmp_path, graph="uniform")[0]


def _sedd_run_dir_missing_block(tmp_path):
    config = sedd.sedd_config(TOKENS, 32, 2, 16, 2, 16)
    net = sedd.reference(config)
    net.blocks = net.blocks[:1]  # the config still says 2 blocks
    return sedd.write_run_dir(net, tmp_path / "run", config)


@pytest.mark.parametrize(
    "make,overrides,message",
    [
        (_radd_other_hidden, RADD_RUN, r"\(48, 48\) in the checkpoint but \(32, 32\) in the"),
        (_radd_other_vocab, RADD_RUN, r"\(101,\) in the checkpoint but \(2049,\) in the"),
        (_radd_truncated, RADD_RUN, r"model.safetensors cannot be read .*truncated"),
        (_radd_no_weights, RADD_RUN, "has a RADD config but no model.safetensors or pytorch_model"),
        (_run_dir_truncated, RADD_RUN, r"checkpoint.pth cannot be read .*truncated"),
        (_sedd_uniform, SEDD_RUN, "graph.type=uniform.*absorbing .*diffusion only"),
        (_sedd_run_dir_missing_block, SEDD_RUN, "lack blocks.1.adaLN_modulation.bias"),
        (_radd_other_hidden, SEDD_RUN, "is a RADD model .* set backbone=radd"),
        (_radd_other_hidden, ["backbone=radd", *TINY_ENCODER], "RADD .* no AdaLN to read z"),
    ],
)
def test_a_folder_that_does_not_fit_is_refused_in_one_line(tmp_path, make, overrides, message):
    folder = make(tmp_path)
    module = build(tmp_path, *overrides)
    with pytest.raises(CheckpointError, match=message) as err:
        interchange.warm_start(module, str(folder), use_ema=True)
    assert "\n" not in str(err.value)


def test_a_sedd_folder_needs_time_conditioning(tmp_path):
    folder, _ = sedd_folder(tmp_path)
    module = build(tmp_path, "training.loss_type=mdlm")  # MDLM's SUBS reads SEDD's weights too
    with pytest.raises(CheckpointError, match="set time_conditioning=True"):
        interchange.warm_start(module, str(folder), use_ema=True)


def test_evaluation_refuses_a_contradicting_command_line_or_tokenizer(tmp_path):
    folder, _ = radd_folder(tmp_path, tokens=100)
    wrong = ["mode=ppl_eval", f"eval.checkpoint_path={folder}", "model.hidden_size=64"]
    ckpt = read_checkpoint(str(folder))
    cfg = eval_cfg(tmp_path, *wrong)
    with pytest.raises(ConfigError, match=r"hidden_size=64 on the command line, but .*=32"):
        runner.adopt_architecture(cfg, ckpt, explicit_keys(wrong, str(ROOT / "configs")))
    cfg = eval_cfg(tmp_path, *wrong[:2])
    runner.adopt_architecture(cfg, ckpt, explicit_keys(wrong[:2], str(ROOT / "configs")))
    module = module_for(cfg)
    with pytest.raises(CheckpointError, match="of 100 tokens .* the tokenizer gives 2048"):
        load_for_eval(module, ckpt, str(folder))


def test_only_radd_and_sedd_folders_are_read_as_theirs(tmp_path):
    folder, _ = radd_folder(tmp_path)
    assert foreign.is_foreign(str(folder))
    mdlm = tmp_path / "mdlm"
    mdlm.mkdir()
    (mdlm / "config.json").write_text('{"model_type": "mdlm", "vocab_size": 2049}')
    vadd = radd.radd_config(TOKENS, 32, 2, 2, 16) | {"format": "vadd"}
    (tmp_path / "vadd").mkdir()
    (tmp_path / "vadd" / "config.json").write_text(json.dumps(vadd))
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text('{"tokens": 5, "mod')
    for other in ("mdlm", "vadd", "damaged"):
        assert not foreign.is_foreign(str(tmp_path / other)), other


def test_load_from_checkpoint_of_a_radd_folder_is_one_line_naming_the_way_in(tmp_path):
    from diffusion import Diffusion

    path, _ = radd_folder(tmp_path)
    with pytest.raises(CheckpointError, match="is a RADD / SEDD folder: evaluate it with") as err:
        Diffusion.load_from_checkpoint(path)
    assert "\n" not in str(err.value) and f"eval.checkpoint_path={path}" in str(err.value)

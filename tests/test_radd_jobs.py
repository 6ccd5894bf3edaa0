"""RADD's and SEDD's choices as a user types them: they compose on the command line,
train on the embedded default for a few steps, are evaluated under their own bound's
name, and bad combinations are one line at start-up."""

import json
import subprocess
import sys

import pytest
from hydra_jobs import ROOT, compose_job, one_thread, run_job
from tiny import MICRO_MODEL

from config_check import ConfigError, validate_config

FAST = [*MICRO_MODEL, "loader.global_batch_size=4", "loader.eval_batch_size=4",
        "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "logger=none",
        "sampling.num_sample_batches=0"]  # fmt: skip


@pytest.mark.parametrize(
    "choice,bound",
    [
        (["training.loss_type=lambda_DCE"], "lambda-DCE bound"),
        (["training.loss_type=k_DCE", "backbone=radd", "training.decoupled_strata=True"],
         "k-DCE bound"),
        (["training.loss_type=t_DSE"], "t-DSE bound"),
        (["parameterization=sedd", "training.loss_type=t_dse", "time_conditioning=True"],
         "DWDSE bound"),  # the lower-case spelling too
        (["training.loss_type=t_DCE", "backbone=radd"], "t-DCE = MDLM NELBO"),
        (["backbone=radd"], "negative DELBO"),  # VADD with the time-free decoder
    ],
)  # fmt: skip
def test_each_new_choice_trains_and_reports_its_own_bound(tmp_path, choice, bound):
    with one_thread():
        run_job(tmp_path, *FAST, "trainer.max_steps=2", "trainer.val_check_interval=2", *choice)
        latent = choice == ["backbone=radd"]
        order = [] if latent else ["eval.any_order=forward"]
        ckpt = tmp_path / "checkpoints" / "last.ckpt"
        run_job(tmp_path, *FAST, "mode=ppl_eval", f"eval.checkpoint_path={ckpt}",
                "eval.limit_batches=1", "+eval.ppl_times=3", *order, *choice)  # fmt: skip
    result = json.loads((tmp_path / "ppl_eval.json").read_text())
    assert result["bound"].startswith(bound)
    assert len(result["nll_per_draw"]) == 3 and result["tokens"] > 0
    if not latent:  # the exact any-order NLL beside the bound
        assert result["any_order"]["order"] == "forward"
        assert 0 < result["any_order_nll"] < 20


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["training.loss_type=k_DCE", "T=4"], "T=4 does not apply"),
        (["training.loss_type=lambda_DCE", "time_conditioning=True"], "time_conditioning=False"),
        (["training.loss_type=t_DSE", "T=8"], "continuous-time loss"),
        (["backbone=radd", "time_conditioning=True"], "has no time input"),
        (["model=small_radd"], "add backbone=radd"),
        (["parameterization=sedd", "training.loss_type=mdlm"], "set training.loss_type=t_DSE"),
        (["parameterization=sedd", "backbone=radd"], "SEDD's network is the DiT"),
        (["eval.any_order=sideways"], "eval.any_order='sideways' is not one of"),
        (["eval.any_order=forward"], "which training.loss_type=vae is not"),
        (["training.loss_type=lamda_DCE"], "did you mean training.loss_type=lambda_DCE"),
        (["training.decoupled_strata=True", "training.antithetic_sampling=False"],
         "set training.antithetic_sampling=True"),
        (["backbone=radd", "data=checkerboard", "model=toy_mlp"], "drop backbone=radd"),
        (["mode=sample_eval", "training.loss_type=k_DCE", "sampling.fixz=True"],
         "applies to a VADD model under a sampler that draws z .*tweedie"),
    ],
)  # fmt: skip
def test_a_bad_combination_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_config(compose_job(tmp_path, *overrides))
    assert "\n" not in str(err.value)


def test_the_new_choices_compose_on_the_command_line(tmp_path):
    args = ["backbone=radd", "model=small_radd", "training.loss_type=k_DCE",
            "training.decoupled_strata=True", "eval.any_order=random",
            "sampling.predictor=tweedie", "sampling.semi_ar=True", "sampling.stride_length=64",
            "sampling.num_strides=3"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "main.py", f"hydra.run.dir={tmp_path}", *args, "--cfg", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for line in ("backbone: radd", "name: small_radd", "loss_type: k_DCE", "any_order: random",
                 "decoupled_strata: true", "hidden_size: 768", "predictor: tweedie",
                 "semi_ar: true", "stride_length: 64", "num_strides: 3"):  # fmt: skip
        assert line in proc.stdout, line


def test_batched_ppl_times_draws_are_the_draws_one_at_a_time(tmp_path, monkeypatch):
    """eval.ppl_times draws go through the network several at a time on an accelerator
    (RADD evaluates with 1024; on CPU one a call is faster): each draw keeps its own t,
    masks and sums, so the per-draw NLLs are those of one draw per call, for a model
    without a latent. Batching is forced on here, on the CPU."""
    from evaluation import validation

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    args = [*FAST, "training.loss_type=mdlm"]
    evaluate = [*args, "mode=ppl_eval", f"eval.checkpoint_path={ckpt}", "eval.limit_batches=2",
                "+eval.ppl_times=5"]  # fmt: skip
    results = []
    with one_thread():
        run_job(tmp_path, *args, "trainer.max_steps=2")
        for tokens_per_call in (0, 1 << 16):  # one draw a call; all five in one call
            monkeypatch.setitem(validation.EVAL_TOKENS_PER_CALL, "cpu", tokens_per_call)
            run_job(tmp_path, *evaluate)
            results.append(json.loads((tmp_path / "ppl_eval.json").read_text()))
    one, batched = results
    assert batched["nll_per_draw"] == pytest.approx(one["nll_per_draw"], rel=1e-6)
    assert len(set(one["nll_per_draw"])) == 5  # five different draws
    assert (
        (batched["tokens"], batched["sequences"]) == (one["tokens"], one["sequences"]) == (256, 8)
    )

"""The known-set text data (data/text_set.py): members, exact scores, and the main.py path."""

import itertools
import json
import math

import pytest
import torch
from hydra_jobs import one_thread, run_job
from omegaconf import OmegaConf
from tiny import QUIET

from data import text_set
from dataloader import get_tokenizer


def test_set_scores_on_a_hand_built_sample_set():
    members = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    samples = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6], [1, 2, 4], [9, 8, 7], [3, 2, 1]])
    got = text_set.set_scores(samples, members)
    assert got["precision"] == pytest.approx(3 / 6)  # two copies of member 0, one of member 1
    assert got["coverage"] == pytest.approx(2 / 3)
    assert got["distinct_members_found"] == 2
    assert got["num_members"] == 3
    assert got["true_entropy_nats_per_sequence"] == pytest.approx(math.log(3))
    assert got["coverage_of_exact_draws"] == pytest.approx(1 - (2 / 3) ** 6)


def test_all_members_and_no_member():
    members = torch.arange(12).view(4, 3)
    assert text_set.set_scores(members, members)["precision"] == 1.0
    assert text_set.set_scores(members, members)["coverage"] == 1.0
    none = text_set.set_scores(members + 100, members)
    assert none["precision"] == 0.0 and none["coverage"] == 0.0


@pytest.mark.parametrize("n,s", [(2, 2), (3, 2), (3, 4), (4, 3)])
def test_expected_coverage_matches_enumeration(n, s):
    """Mean fraction of distinct members over all n^s equally likely draw sequences."""
    draws = list(itertools.product(range(n), repeat=s))
    exact = sum(len(set(d)) for d in draws) / (len(draws) * n)
    assert text_set.expected_coverage(n, s) == pytest.approx(exact)


def verse_cfg(n=16, seed=0):
    from hydra import compose, initialize_config_dir
    from hydra_jobs import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=["data=verse_set", f"data.num_sequences={n}"])
    return OmegaConf.merge(cfg.data, {"seed": seed})


TINY_DIT = ["model.hidden_size=32", "model.cond_dim=16", "model.n_heads=2", "model.n_blocks=1",
            "decoder.hidden_size=32", "decoder.cond_dim=16", "decoder.n_heads=2"]  # fmt: skip


def verse_module(loss_type: str, length: int = 8):
    """An untrained tiny model of the verse_set recipe, and its tokenizer."""
    from hydra import compose, initialize_config_dir
    from hydra_jobs import ROOT

    import runner

    overrides = ["data=verse_set", "recipe=verse_set", f"training.loss_type={loss_type}",
                 f"model.length={length}", *TINY_DIT]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=overrides)
    runner.derive_batch_sizes(cfg, 1)
    tok = get_tokenizer(cfg.data)
    torch.manual_seed(0)
    return runner.build_module(cfg, tok).eval(), tok


def test_members_are_distinct_verse_openings_in_a_seeded_order():
    data = verse_cfg(16)
    tok = get_tokenizer(data)
    rows = text_set.members(data, tok, 12)
    assert rows.shape == (16, 12)
    assert (rows[:, 0] == tok.bos_token_id).all()  # BOS opens every row
    assert len({tuple(r) for r in rows.tolist()}) == 16
    assert torch.equal(rows, text_set.members(data, tok, 12))  # deterministic
    assert not torch.equal(rows, text_set.members(verse_cfg(16, seed=1), tok, 12))
    from data import sources as data_sources

    texts = [v["text"] for v in data_sources.bible_verses()]
    openings = {tuple(ids[:11]) for ids in tok(texts, add_special_tokens=False)["input_ids"]}
    assert all(tuple(r[1:]) in openings for r in rows.tolist())  # each is a real verse's start
    train = text_set.get_dataset(data, tok, "train", 12)
    assert len(train) == 16 * int(data.repeats)


def test_all_mask_input_gives_every_position_the_same_output_until_bos_is_given():
    """Why known-set rows open with BOS and are sampled from it: rotary attention is
    relative, so from an all-[MASK] row no position can tell where it is."""
    module, _ = verse_module("mdlm")
    mask = module.vocab.mask_id
    with torch.no_grad():
        for p in module.backbone.parameters():  # any weights (the output layer starts at 0)
            p.normal_(0.0, 0.2)
        blank = module.backbone(torch.full((1, 8), mask), torch.zeros(1))  # (1, 8, V)
        framed = torch.full((1, 8), mask)
        framed[0, 0] = 1
        anchored = module.backbone(framed, torch.zeros(1))
    assert torch.allclose(blank[0], blank[0, :1].expand(8, -1), atol=1e-5)
    assert not torch.allclose(anchored[0, 1], anchored[0, 2], atol=1e-3)


def test_sampling_frame_fixes_bos_and_the_samplers_keep_it():
    from sampling.generation import generate

    module, tok = verse_module("vae")
    frame = text_set.sampling_frame(tok, 8, module.vocab.mask_id)
    assert frame[0] == tok.bos_token_id and (frame[1:] == module.vocab.mask_id).all()
    for predictor in ("vae", "ddpm"):
        x, _ = generate(module, x_init=frame.expand(4, -1).clone(), predictor=predictor,
                        steps=2, num_samples=4)  # fmt: skip
        assert (x[:, 0] == tok.bos_token_id).all() and (x != module.vocab.mask_id).all()


def test_too_many_members_is_one_clear_error():
    data = verse_cfg(10**6)
    with pytest.raises(Exception, match="data.num_sequences=1000000"):
        text_set.members(data, get_tokenizer(data), 16)


def test_verse_set_trains_and_sample_eval_scores_precision(tmp_path):
    """data=verse_set through main.py: training, then sample_eval writes exact set scores."""
    model = [
        "model.hidden_size=32",
        "model.cond_dim=16",
        "model.n_heads=2",
        "model.n_blocks=1",
        "decoder.hidden_size=32",
        "decoder.cond_dim=16",
        "decoder.n_heads=2",
    ]
    common = [
        "data=verse_set",
        "recipe=verse_set",
        "data.num_sequences=8",
        "data.repeats=4",
        "loader.global_batch_size=8",
        "loader.eval_batch_size=8",
        *model,
        *QUIET,
    ]
    with one_thread():
        run_job(
            tmp_path,
            *common,
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "callbacks.checkpoint_every_n_steps.every_n_train_steps=3",
        )
        run_job(
            tmp_path,
            *common,
            "mode=sample_eval",
            "sampling.steps=2",
            f"eval.checkpoint_path={tmp_path}/checkpoints/last.ckpt",
        )
    (path,) = tmp_path.glob("samples_vae_T2_fixzTrue_seed1.json")
    result = json.loads(path.read_text())
    assert result["num_members"] == 8
    assert 0.0 <= result["precision"] <= 1.0
    assert result["num_samples"] == 8 * 4  # eval batch x recipe's num_sample_batches
    assert result["coverage_of_exact_draws"] == pytest.approx(1 - (7 / 8) ** 32)
    # recipe=verse_set has keep_frame=True: the bound counts the 15 tokens after BOS
    rows = [r for r in (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[1:]]
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    tokens = [float(r.split(",")[header.index("val/tokens")]) for r in rows]
    assert [t for t in tokens if t == t] == [8 * 15]  # the one validation (NaN elsewhere)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampling.frame=none"], "sampling.frame=none -> sampling.frame=auto"),
        (["data=checkerboard", "recipe=checkerboard", "model=toy_mlp"], "data.kind=grid has no"),
        (["data.wrap=True", "data=bible", "recipe=cpu", "sampling.semi_ar=True"], "semi_ar"),
    ],
)
def test_keep_frame_without_a_frame_the_sampler_is_given_is_refused(tmp_path, overrides, message):
    from hydra_jobs import compose_job

    from config_check import ConfigError, validate_config

    cfg = compose_job(tmp_path, "data=verse_set", "recipe=verse_set", *overrides, "keep_frame=True")
    validate_config(compose_job(tmp_path, *overrides))  # fine without keep_frame
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_verse_set_script_writes_the_table_json_and_png(tmp_path):
    """scripts/verse_set.py end to end on a tiny model: both models, every T, the truth."""
    import subprocess
    import sys

    from hydra_jobs import ROOT

    tiny = ["model.hidden_size=32", "model.cond_dim=16", "model.n_heads=2", "model.n_blocks=1",
            "decoder.hidden_size=32", "decoder.cond_dim=16", "decoder.n_heads=2",
            "data.num_sequences=8", "data.repeats=4", "loader.global_batch_size=8"]  # fmt: skip
    args = ["--seeds", "1", "--steps", "2", "--sample-steps", "1", "4", "--num-samples", "6",
            "--vadd", "T=2", "--vadd", "training.kl_weighting=once",
            "--vadd", "decoder.mask_struc=none", "--vadd", "decoder.fade_to_prior=False",
            "--judge", "none", "--jobs", "1", "--out", str(tmp_path), *tiny]  # fmt: skip
    cmd = [sys.executable, "scripts/verse_set.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "verse_set.json").read_text())
    assert set(result["table"]) == {"MDLM", "VADD fixz=True", "VADD fixz=False"}
    assert set(result["table"]["MDLM"]) == {"1", "4"}
    assert result["settings"]["mdlm_train_steps"] > result["settings"]["vadd_train_steps"]
    assert result["truth"]["num_members"] == 8
    assert set(result["truth"]["exact_mdlm_precision"]) == {"1", "4"}
    assert result["settings"]["vadd_overrides"][:2] == ["T=2", "training.kl_weighting=once"]
    vadd_cfg = (tmp_path / "vae_seed1" / "config.yaml").read_text()
    assert "kl_weighting: once" in vadd_cfg
    assert "kl_weighting: once" not in (tmp_path / "mdlm_seed1" / "config.yaml").read_text()
    cell = result["table"]["VADD fixz=False"]["4"]["precision"]
    assert len(cell["per_seed"]) == 1 and 0.0 <= cell["mean"] <= 1.0
    assert (tmp_path / "verse_set.png").stat().st_size > 0
    assert set(result["phase_seconds"]) == {"train_and_sample", "judge", "exact_draws"}
    assert result["settings"]["judge_samples"] == 64  # the default, recorded


@pytest.mark.parametrize("flag", ["--judge-samples", "--num-samples"])
def test_verse_set_refuses_a_non_positive_sample_count_naming_it(flag, capsys):
    import importlib.util

    from hydra_jobs import ROOT

    spec = importlib.util.spec_from_file_location("verse_set_script", ROOT / "scripts/verse_set.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} 0: give at least 1" in capsys.readouterr().err


# ----------------------------------------------------- the exact denoiser (MDLM's bound)
SET = torch.tensor([[5, 0, 1, 2], [5, 0, 2, 1], [5, 3, 1, 2], [5, 3, 3, 3]])  # BOS = 5
MASK = 6


def test_oracle_gives_the_tokens_of_the_members_that_agree_with_what_is_visible():
    oracle = text_set.oracle_denoiser(SET, MASK, 6)
    xt = torch.tensor(
        [[5, MASK, MASK, MASK], [5, 0, MASK, MASK], [5, 3, 3, MASK], [5, 4, MASK, MASK]]
    )  # row 3: no member has a 4
    out_mask = xt == MASK
    probs = oracle(xt, None, None, out_mask).exp()  # (positions, V)
    rows = iter(probs / probs.sum(-1, keepdim=True))
    expect = [  # (row, position) -> member counts at that position
        {0: 2, 3: 2},
        {1: 2, 2: 1, 3: 1},
        {2: 2, 1: 1, 3: 1},  # nothing seen: marginals
        {1: 1, 2: 1},
        {2: 1, 1: 1},  # members 0 and 1
        {3: 1},  # member 3 only
        {1: 2, 2: 1, 3: 1},
        {2: 2, 1: 1, 3: 1},  # unexplained: the set's marginals
    ]
    for counts in expect:
        want = torch.zeros(6)
        for token, c in counts.items():
            want[token] = c / sum(counts.values())
        torch.testing.assert_close(next(rows), want)


def test_the_mdlm_sampler_with_the_oracle_reaches_the_enumerated_one_step_precision():
    """T = 1 reveals every position at once from its marginal: precision is
    sum_m prod_i p_i(m_i) = 0.3125 here (enumerated); many steps reveal one position
    at a time from exact conditionals, so nearly every sample is a member."""
    from noise_schedule import LogLinear
    from sampling import samplers

    marginals = [{0: 0.5, 3: 0.5}, {1: 0.5, 2: 0.25, 3: 0.25}, {2: 0.5, 1: 0.25, 3: 0.25}]
    exact = sum(math.prod(marginals[i].get(int(row[i + 1]), 0.0) for i in range(3)) for row in SET)
    assert exact == pytest.approx(0.3125)
    oracle = text_set.oracle_denoiser(SET, MASK, 6)
    frame = torch.tensor([[5, MASK, MASK, MASK]])
    precision = {}
    for steps, n in ((1, 20000), (400, 1000)):
        x, _ = samplers.sample_masked(
            oracle, frame.expand(n, -1).clone(), mask_id=MASK, vocab_size=6,
            noise=LogLinear(1e-3), steps=steps, generator=torch.Generator().manual_seed(steps),
        )  # fmt: skip
        precision[steps] = text_set.set_scores(x, SET)["precision"]
    se = math.sqrt(exact * (1 - exact) / 20000)
    assert abs(precision[1] - exact) < 4 * se
    assert precision[400] > 0.98

"""bench/bench.py at a micro size: the JSON is complete, its figures are sane, its FLOP count
matches a hand computation and the cached samplers call the network at most T + 1 times.

No timing is asserted: the numbers depend on the machine and on whatever else runs on it.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import runner
from models.dit import round_up

ROOT = Path(__file__).resolve().parents[1]

# Written out here (not imported from tiny.py) because the FLOP check below uses them.
D, C, N_BLOCKS, HEADS, LENGTH = 32, 16, 1, 2, 32  # decoder hidden / cond / blocks / heads / L
DE, CE, NE_BLOCKS = 32, 16, 1  # encoder hidden / cond / blocks
LATENT, BATCH, VOCAB = 8, 4, 2048  # the embedded Bible's BPE has 2048 tokens (+1 mask id)
SAMPLE_STEPS = [2, 4]
OVERRIDES = [
    f"model.length={LENGTH}",
    f"model.hidden_size={D}",
    f"model.cond_dim={C}",
    f"model.n_heads={HEADS}",
    f"model.n_blocks={N_BLOCKS}",
    f"model.latent_dim={LATENT}",
    f"decoder.hidden_size={DE}",
    f"decoder.cond_dim={CE}",
    f"decoder.n_heads={HEADS}",
    f"decoder.n_blocks={NE_BLOCKS}",
    f"loader.global_batch_size={BATCH}",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    cache = os.environ.get("VADD_CACHE_DIR", str(tmp / "cache"))
    cmd = [
        sys.executable, "bench/bench.py", "--device", "cpu", "--loss-types", "mdlm", "vae",
        "--warmup", "2", "--steps-per-repeat", "2", "--repeats", "2",
        "--sample-steps", *map(str, SAMPLE_STEPS), "--sample-repeats", "1",
        "--threads", "1",  # 2 threads on 2 busy cores can be 50x slower at this size
        "--out", str(out),
        "--", *OVERRIDES, f"data.cache_dir={cache}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train" in proc.stdout and "JSON:" in proc.stdout  # the human-readable table
    return json.loads(out.read_text())


def _figures(node, path=""):
    """Every {"value", "unit"} dict in the report, with where it is."""
    if isinstance(node, dict):
        if "unit" in node:
            yield path, node
        for key, child in node.items():
            yield from _figures(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _figures(child, f"{path}[{i}]")


def test_report_has_every_field(report):
    assert report["schema"] == "vadd-bench/1"
    assert report["git"].keys() == {"commit", "dirty"}
    env = report["environment"]
    for key in ("device", "device_name", "cpu_count", "torch", "lightning", "python"):
        assert env[key], key
    assert env["device"] == "cpu"
    settings = report["settings"]
    assert settings["peak"]["unit"] == "TFLOP/s" and "measured" in settings["peak"]["source"]
    assert "6 * N" in settings["flops_formula"] and "not measured" in settings["data"]
    assert settings["sample_steps"] == SAMPLE_STEPS
    assert set(report["results"]) == {"mdlm", "vae"}
    for loss_type, r in report["results"].items():
        assert r["precision"] == runner.resolve_precision("auto", "cpu")  # what training uses
        assert r["compile"] is False
        assert r["shapes"]["batch_size"] == BATCH and r["shapes"]["length"] == LENGTH
        assert r["shapes"]["vocab_size"] == VOCAB
        assert (r["shapes"]["encoder"] is None) == (loss_type == "mdlm")
        for key in ("tokens_per_s", "step_time", "model_flops_per_token", "mfu", "peak_memory"):
            assert key in r["train"], key
        assert len(r["train"]["tokens_per_s"]["repeats"]) == 2
        for key in ("tokens_per_s", "model_flops_per_token", "mfu", "peak_memory", "bound"):
            assert key in r["ppl_eval"], key
        sampling = r["sampling"]
        assert sampling["predictor"] == ("vae_cache" if loss_type == "vae" else "ddpm_cache")
        assert [row["steps"] for row in sampling["runs"]] == SAMPLE_STEPS
        assert r["anchor"]["comparable"] is False  # CPU, micro model


def test_every_figure_is_positive_and_finite(report):
    figures = list(_figures(report))
    assert len(figures) > 30
    for path, fig in figures:
        if path.endswith("encoder") or path.endswith("encoder_non_embedding"):
            continue  # MDLM has no encoder: 0 parameters
        values = [fig["value"], *fig.get("repeats", [])]
        assert all(math.isfinite(v) and v > 0 for v in values), (path, fig)
        assert isinstance(fig["unit"], str) and fig["unit"], path


def _dit_non_embedding(d: int, c: int, blocks: int, out: int) -> int:
    """Parameters of models/dit.py's DIT minus the token embedding, counted by hand."""
    sigma_map = (256 * c + c) + (c * c + c)  # Linear(256, c), Linear(c, c)
    block = (
        2 * d  # two LayerNorm weights
        + 3 * d * d  # attn_qkv (no bias)
        + d * d  # attn_out (no bias)
        + (d * 4 * d + 4 * d) + (4 * d * d + d)  # MLP
        + (c * 6 * d + 6 * d)  # adaLN_modulation
    )  # fmt: skip
    final = d + (d * out + out) + (c * 2 * d + 2 * d)  # norm, linear, adaLN
    return sigma_map + blocks * block + final


def test_flops_match_a_hand_computation(report):
    v = round_up(VOCAB + 1, 128)  # table and output: [MASK] id + padding to model.vocab_multiple
    attention = lambda blocks, d: 12 * blocks * d * LENGTH
    dec_n = _dit_non_embedding(D, C, N_BLOCKS, v)
    dec = 6 * dec_n + attention(N_BLOCKS, D)
    mdlm = report["results"]["mdlm"]
    assert mdlm["params"]["decoder_non_embedding"]["value"] == dec_n
    assert mdlm["params"]["decoder"]["value"] == dec_n + v * D
    assert mdlm["train"]["model_flops_per_token"]["value"] == dec
    assert mdlm["ppl_eval"]["model_flops_per_token"]["value"] == dec // 3

    latent_mlp = 2 * (LATENT * LATENT + LATENT) + (LATENT * C + C)
    gen_n = dec_n + latent_mlp
    enc_n = _dit_non_embedding(DE, CE, NE_BLOCKS, 2 * LATENT) + CE  # + visible_embed
    gen = 6 * gen_n + attention(N_BLOCKS, D)
    enc = 6 * enc_n + attention(NE_BLOCKS, DE)
    vae = report["results"]["vae"]
    assert vae["params"]["decoder_non_embedding"]["value"] == gen_n
    assert vae["params"]["encoder_non_embedding"]["value"] == enc_n
    assert vae["train"]["model_flops_per_token"]["value"] == gen + enc  # K = 1, one step
    assert vae["ppl_eval"]["model_flops_per_token"]["value"] == (enc + 2 * gen) // 3

    peak = report["settings"]["peak"]["value"] * 1e12
    for r in (mdlm, vae):
        train = r["train"]
        expected = train["model_flops_per_token"]["value"] * train["tokens_per_s"]["value"] / peak
        assert math.isclose(train["mfu"]["value"], expected, rel_tol=1e-9)


def test_cached_samplers_call_the_network_at_most_steps_plus_one(report):
    for r in report["results"].values():
        for row in r["sampling"]["runs"]:
            assert 0 < row["nfe_per_sequence"]["value"] <= row["steps"] + 1, row
            assert 0 < row["network_calls"]["value"] <= row["steps"] + 1, row


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_window_rates_drop_warmup_and_split_windows():
    bench = _bench_module()
    stamps = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0]  # ends of 6 batches
    # warm-up 2: windows are batches 3-4 (t 1 -> 3) and 5-6 (t 3 -> 7)
    assert bench.window_rates(stamps, 2, 2, 2, per_batch=10.0) == [10.0, 5.0]
    with pytest.raises(RuntimeError, match="only 6 batches"):
        bench.window_rates(stamps, 2, 2, 3, per_batch=10.0)


def test_pairs_summary_pairs_runs_by_index(tmp_path):
    """bench/pairs.py: medians of each tree and per-pair ratios, from the runs' JSON."""
    spec = importlib.util.spec_from_file_location("pairs", ROOT / "bench" / "pairs.py")
    pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairs)

    def write(name, train, ppl):
        phases = {"train": train, "ppl_eval": ppl}
        result = {k: {"tokens_per_s": {"value": v, "unit": "tokens/s"}} for k, v in phases.items()}
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": {"vae": result}}))

    for i, (a, b) in enumerate([(100.0, 150.0), (200.0, 260.0), (120.0, 240.0)]):
        write(f"a{i}", a, 10 * a)
        write(f"b{i}", b, 10 * b)
    write("b3", 999.0, 999.0)  # an unpaired run is left out
    row = pairs.summarize(str(tmp_path))["vae/train"]
    assert row["a_median"] == 120.0 and row["b_median"] == 240.0
    assert row["ratio_of_medians"] == 2.0
    assert row["pair_ratios"] == pytest.approx([1.3, 1.5, 2.0])

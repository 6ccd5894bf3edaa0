"""bench/checkpoint_cost.py at a micro size: it saves through Lightning, and the file holds
the weights, the EMA and both AdamW moments (no timing is asserted)."""

import importlib.util
import json
from pathlib import Path

from tiny import MICRO_MODEL

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoint_cost_reports_a_full_checkpoint(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "checkpoint_cost", ROOT / "bench/checkpoint_cost.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    argv = ["--repeats", "2", "--dir", str(tmp_path), "--out", str(out), "--", "data=bible"]
    result = bench.main([*argv, *MICRO_MODEL])
    assert json.loads(out.read_text()) == result
    assert len(result["repeats"]) == 2 and result["seconds_per_save"] > 0
    fp32 = 4 * result["trainable_parameters"]
    parts = result["bytes_by_part"]
    assert parts["state_dict"] >= fp32 and parts["ema"] == fp32  # + buffers (rotary tables)
    assert parts["optimizer_states"] >= 2 * fp32  # exp_avg and exp_avg_sq
    assert result["file_bytes"] > sum(parts.values())
    assert list(tmp_path.iterdir()) == [out]  # the checkpoint went with its temporary folder

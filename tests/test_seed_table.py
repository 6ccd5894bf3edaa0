"""scripts/seed_table.py: mean and spread over seeds of steps_sweep.json files."""

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import seed_table  # noqa: E402


def sweep(path: Path, values: dict) -> Path:
    """A steps_sweep.json with {run: {T: gen_ppl}} (entropy = gen_ppl / 10); None = failed."""
    runs = {}
    for name, by_t in values.items():
        results = []
        for t, v in by_t.items():
            if v is None:
                results.append({"steps": t, "status": "failed", "error": "x"})
            else:
                results.append(
                    {"steps": t, "status": "ok", "gen_ppl": v, "unigram_entropy": v / 10}
                )
        runs[name] = {"results": results}
    path.write_text(json.dumps({"runs": runs}))
    return path


def test_mean_and_spread_over_seeds(tmp_path, capsys):
    files = [
        sweep(tmp_path / "a.json", {"VADD": {4: 100.0, 8: 80.0}, "MDLM": {4: 120.0, 8: None}}),
        sweep(tmp_path / "b.json", {"VADD": {4: 110.0, 8: 70.0}, "MDLM": {4: 130.0, 8: 90.0}}),
    ]
    assert seed_table.main([str(f) for f in files]) == 0
    saved = json.loads((tmp_path / "seed_table.json").read_text())
    cell = saved["gen_ppl"]["VADD"]["4"]
    assert cell["mean"] == pytest.approx(105.0)
    assert cell["std"] == pytest.approx(statistics.stdev([100.0, 110.0]))
    assert saved["gen_ppl"]["MDLM"]["8"]["per_seed"] == [90.0]  # the failed seed is left out
    assert saved["unigram_entropy"]["VADD"]["8"]["mean"] == pytest.approx(7.5)
    assert "| VADD | 105.00 ± 7.07 | 75.00 ± 7.07 |" in capsys.readouterr().out


def test_missing_file_is_one_line(tmp_path, capsys):
    assert seed_table.main([str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err

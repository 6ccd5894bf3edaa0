"""Reporting helpers of bench/bench.py: the MDLM reference figures (spec section 6) and our
targets, the comparison of a result with them, and the console table."""

# The MDLM reference code on one H100, bf16, DiT small, L=1024, batch 32, GPT-2 vocabulary
# (spec section 6), and our targets on the same device and shapes.
ANCHOR = {
    "train_tokens_per_s": 112.8e3,
    "ppl_eval_tokens_per_s": 319e3,
    "sampling_s": {16: 1.00, 128: 7.42, 1024: 60.6},
}
TARGETS = {
    "train_tokens_per_s": {"mdlm": 460e3, "vae": 245e3},
    "ppl_eval_tokens_per_s": {"mdlm": 1.2e6},
    "sampling_s": {1024: 12.0},
}


def compare_with_anchor(report: dict, loss_type: str, device: str) -> dict:
    """Ratios to the MDLM reference and pass/fail of the targets, when the shapes match."""
    s = report["shapes"]
    d = s["decoder"]
    same = (
        device == "cuda"
        and s["length"] == 1024
        and s["global_batch_size"] == 32
        and d["hidden_size"] == 768
        and d["n_blocks"] == 12
        and s["vocab_size"] == 50257
    )
    if not same:
        return {"comparable": False, "why": "the anchor is CUDA, DiT small, L=1024, batch 32"}
    train = report["train"]["tokens_per_s"]["value"]
    ppl = report["ppl_eval"]["tokens_per_s"]["value"]
    out = {
        "comparable": True,
        "note": "the anchor was measured on one H100: compare on the same kind of device",
        "train_speedup_vs_mdlm_reference": train / ANCHOR["train_tokens_per_s"],
        "train_target_met": train >= TARGETS["train_tokens_per_s"][loss_type],
    }
    if loss_type in TARGETS["ppl_eval_tokens_per_s"]:
        out["ppl_eval_speedup_vs_mdlm_reference"] = ppl / ANCHOR["ppl_eval_tokens_per_s"]
        out["ppl_eval_target_met"] = ppl >= TARGETS["ppl_eval_tokens_per_s"][loss_type]
    for row in report["sampling"]["runs"] if s["sample_batch"] == 16 else []:
        steps, seconds = row["steps"], row["seconds"]["value"]
        if steps in ANCHOR["sampling_s"]:
            out[f"sampling_T{steps}_speedup_vs_mdlm_reference"] = (
                ANCHOR["sampling_s"][steps] / seconds
            )
        if steps in TARGETS["sampling_s"]:
            out[f"sampling_T{steps}_target_met"] = seconds <= TARGETS["sampling_s"][steps]
    return out


def print_table(report: dict) -> None:
    peak = report["settings"]["peak"]["value"]
    print(f"\nvadd bench on {report['environment']['device_name']} (peak {peak:.3g} TFLOP/s)")
    for loss_type, r in report["results"].items():
        s = r["shapes"]
        train, ppl = r["train"], r["ppl_eval"]
        print(
            f"{loss_type:>4} | batch {s['batch_size']} x L {s['length']} | {r['precision']}"
            f" | train {train['tokens_per_s']['value']:,.0f} tok/s"
            f" (MFU {100 * train['mfu']['value']:.1f}%, peak {train['peak_memory']['value']:,.0f}"
            f" MiB) | ppl_eval {ppl['tokens_per_s']['value']:,.0f} tok/s"
        )
        for row in r["sampling"]["runs"]:
            print(
                f"     | sample {r['sampling']['batch']} x {s['length']} T={row['steps']}:"
                f" {row['seconds']['value']:.3f} s, {row['network_calls']['value']} calls,"
                f" NFE/seq {row['nfe_per_sequence']['value']:.1f} ({r['sampling']['predictor']})"
            )

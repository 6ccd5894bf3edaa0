"""Export a vadd checkpoint as a Hugging Face-style folder.

  python scripts/export.py --ckpt outputs/run/checkpoints/last.ckpt --out exported/vadd-bible
  python scripts/export.py --ckpt last.ckpt --out exported/raw --raw   # raw, not EMA, weights

Writes <out>/config.json (format version, resolved vadd config, vocabulary, tokenizer
identity, weights EMA/raw), model.safetensors (`backbone.*` decoder and, for VADD,
`encoder.*`), tokenizer.json + tokenizer_config.json when the checkpoint stores a
tokenizer, and a README.md model card. Evaluate the folder as a checkpoint:
`python main.py mode=ppl_eval eval.checkpoint_path=<out> <the run's overrides>`.
Errors (missing or foreign checkpoint) print one `error: ...` line and exit 2.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpointing import interchange  # noqa: E402
from errors import VaddError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a vadd Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="folder to write (created if needed)")
    parser.add_argument("--raw", action="store_true", help="export raw weights, not the EMA")
    args = parser.parse_args(argv)
    try:
        config = interchange.export_folder(args.ckpt, args.out, raw=args.raw)
    except VaddError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(
        f"[export] {args.ckpt} -> {args.out} ({config['weights']} weights, "
        f"{len(config['parameters'])} tensors, step {config['global_step']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

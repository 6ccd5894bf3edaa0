"""Peak memory of tokenising one huge line (issue: a 50 MB line took 9.8 GB).

    python bench/long_line.py --mb 50 [--whole]

Builds a line of `--mb` MB of Bible text joined by spaces (no newline), tokenises it with
GPT-2's tokenizer through dataloader._encode (pieces of PIECE_CHARS), or in one call
with --whole, and prints the peak resident memory of the process.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataloader  # noqa: E402
from data import tokenization  # noqa: E402
from data.sources import bible_chapters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--whole", action="store_true", help="one tokenizer call (the old way)")
    args = parser.parse_args()
    tokenizer = tokenization.NAMED_TOKENIZERS["gpt2"]()
    base = " ".join(chapter.replace("\n", " ") for chapter in bible_chapters())
    line = (base * (int(args.mb * 1e6) // len(base) + 1))[: int(args.mb * 1e6)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    if args.whole:
        dataloader.PIECE_CHARS = len(line) + 1
    flat, lengths = dataloader._encode(tokenizer, [line])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mode = "one call" if args.whole else f"pieces of {dataloader.PIECE_CHARS:,} chars"
    print(
        f"{args.mb:g} MB line, {mode}: {int(lengths[0]):,} tokens in {seconds:.1f} s; "
        f"peak RSS {peak:.2f} GiB (before tokenising {before:.2f} GiB)"
    )


if __name__ == "__main__":
    main()

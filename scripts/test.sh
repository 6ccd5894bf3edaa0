#!/usr/bin/env bash
# Run the test suite offline (no hub calls, no wandb network). Sets up .venv if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export VADD_CACHE_DIR=${VADD_CACHE_DIR:-$PWD/.cache/vadd}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two test files at a time (one per core; each torch process on one thread): the suite is
# mostly single-threaded start-up and small matmuls, so this is faster than one process
# with two threads. VADD_TEST_WORKERS=0 runs it in this process (for -x / pdb).
workers=${VADD_TEST_WORKERS:-2}
if [ "$workers" = "0" ]; then
  .venv/bin/python -m pytest -q "$@"
else
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
fi

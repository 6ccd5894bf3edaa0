#!/usr/bin/env bash
# Run the test suite offline (no hub calls, no wandb network). Sets up .venv if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export VADD_CACHE_DIR=${VADD_CACHE_DIR:-$PWD/.cache/vadd}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"

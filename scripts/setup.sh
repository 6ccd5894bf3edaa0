#!/usr/bin/env bash
# Create .venv with the pinned CPU stack (idempotent: a second run only checks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.vadd-requirements
want=$(cat pyproject.toml requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0   # first: the pinned (CPU) build
  .venv/bin/python -m pip install -q -e ".[dev]"     # pyproject.toml; the `vadd` command
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
  echo "$want" > "$stamp"
fi
echo "[setup] .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"

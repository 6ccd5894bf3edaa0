#!/usr/bin/env bash
# README command 1: set up, then train / evaluate / sample the embedded default
# (a CPU-sized VADD on the KJV Bible) in a few minutes on a laptop CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-outputs/quickstart/$(date +%Y%m%d-%H%M%S)}
PY=.venv/bin/python
export TOKENIZERS_PARALLELISM=false
$PY main.py hydra.run.dir="$RUN" "$@"
CKPT="$RUN/checkpoints/last.ckpt"
$PY main.py mode=ppl_eval eval.checkpoint_path="$CKPT" +eval.ppl_times=3 hydra.run.dir="$RUN/eval" "$@"
for FIXZ in True False; do
  $PY main.py mode=sample_eval sampling.fixz=$FIXZ loader.eval_batch_size=4 \
    eval.checkpoint_path="$CKPT" hydra.run.dir="$RUN/eval" "$@"
done
echo "[quickstart] results in $RUN/eval: ppl_eval.json, samples_*.json / .txt"

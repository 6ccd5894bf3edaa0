#!/usr/bin/env bash
# Record what a refactor must not change: the first 100 training losses and the samples
# of MDLM, VADD and AR on the embedded default (tiny sizes, float32, seed 1).
#   bash bench/same_run.sh OUT          (then, in another checkout: bash bench/same_run.sh OUT2)
#   diff <(cat OUT/*.txt) <(cat OUT2/*.txt) && echo identical
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "$1")
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
TINY="model.length=64 model.hidden_size=64 model.cond_dim=32 model.n_blocks=2 model.latent_dim=16
 decoder.hidden_size=32 decoder.cond_dim=32 decoder.n_heads=2 decoder.n_blocks=1
 loader.global_batch_size=8 loader.eval_batch_size=8 trainer.limit_val_batches=2
 trainer.val_check_interval=50 trainer.log_every_n_steps=1 trainer.precision=32-true
 trainer.enable_progress_bar=False trainer.enable_model_summary=False seed=1"
declare -A ALGO=(
  [mdlm]="training.loss_type=mdlm"
  [vadd]="training.loss_type=vae"
  [ar]="backbone=ar parameterization=ar training.loss_type=mdlm"
)
for name in mdlm vadd ar; do
  run="$OUT/$name"
  # shellcheck disable=SC2086
  $PY main.py hydra.run.dir="$run" $TINY ${ALGO[$name]} trainer.max_steps=100 >/dev/null 2>&1
  # shellcheck disable=SC2086
  $PY main.py hydra.run.dir="$run/eval" $TINY ${ALGO[$name]} mode=sample_eval \
    eval.checkpoint_path="$run/checkpoints/last.ckpt" sampling.steps=8 \
    sampling.num_sample_batches=1 >/dev/null 2>&1
  {
    echo "== $name: train/loss by step"
    $PY - "$run/logs/metrics.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("trainer/loss")]
print("\n".join(f"{r['step']} {float(r['trainer/loss']):.10g}" for r in rows))
PY
    echo "== $name: sample token ids"
    $PY -c "import json,glob,sys; f=sorted(glob.glob(sys.argv[1]+'/samples_*.json'))[0]; print(f.split('/')[-1]); print(json.load(open(f))['token_ids'])" "$run/eval"
  } > "$OUT/$name.txt"
  echo "$name: $(grep -c . "$OUT/$name.txt") lines -> $OUT/$name.txt"
done

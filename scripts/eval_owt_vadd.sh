#!/usr/bin/env bash
# Sample a trained OWT VADD model over a sweep of step counts and score the samples' gen-PPL.
# Usage: bash scripts/eval_owt_vadd.sh <fixz: True/False> [checkpoint_path] [extra overrides...]
# STEPS="16 32 64 128 256 512 1024" by default. Results in $OUT_DIR: steps_sweep.json and
# steps_sweep.png (gen-PPL and unigram entropy vs steps), <run>/samples_*_T<steps>_*.json.
# Runs scripts/steps_sweep.py; use it directly to put several models on one plot.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,6p' "$0"; exit 2
fi
cd "$(dirname "$0")/.."
FIXZ=$1
CKPT=${2:-outputs/owt/checkpoints/last.ckpt}
shift $(( $# >= 2 ? 2 : 1 ))
read -r -a STEPS <<< "${STEPS:-16 32 64 128 256 512 1024}"
OUT_DIR=${OUT_DIR:-outputs/owt/eval_fixz${FIXZ}}
"${PYTHON:-python}" scripts/steps_sweep.py --out "$OUT_DIR" --steps "${STEPS[@]}" \
  --run "VADD fixz=${FIXZ}" "$CKPT" sampling.fixz="$FIXZ" -- \
  data=openwebtext-split model=small decoder=small parameterization=subs backbone=dit \
  model.length=1024 training.loss_type=vae model.latentMLP=True model.latent1d=True \
  model.latent_struc=adaln model.latent_dim=512 decoder.mask_struc=adaln \
  sampling.predictor=vae_cache loader.eval_batch_size=8 sampling.num_sample_batches=4 \
  eval.compute_generative_perplexity=True "$@"

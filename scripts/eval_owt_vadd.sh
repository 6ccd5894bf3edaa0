#!/usr/bin/env bash
# Sample a trained OWT VADD model over a sweep of step counts.
# Usage: bash scripts/eval_owt_vadd.sh <fixz: True/False> [checkpoint_path] [extra overrides...]
# STEPS="16 32 64 128 256 512 1024" by default; results go to $OUT_DIR/samples_*.json.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,4p' "$0"; exit 2
fi
cd "$(dirname "$0")/.."
FIXZ=$1
CKPT=${2:-outputs/owt/checkpoints/last.ckpt}
shift $(( $# >= 2 ? 2 : 1 ))
STEPS=${STEPS:-"16 32 64 128 256 512 1024"}
OUT_DIR=${OUT_DIR:-outputs/owt/eval_fixz${FIXZ}}
for T in $STEPS; do
  "${PYTHON:-python}" main.py mode=sample_eval data=openwebtext-split model=small decoder=small \
    parameterization=subs backbone=dit model.length=1024 training.loss_type=vae \
    model.latentMLP=True model.latent1d=True model.latent_struc=adaln model.latent_dim=512 \
    decoder.mask_struc=adaln sampling.predictor=vae_cache sampling.steps="$T" \
    sampling.fixz="$FIXZ" loader.eval_batch_size=8 sampling.num_sample_batches=4 \
    eval.checkpoint_path="$CKPT" hydra.run.dir="$OUT_DIR" "$@"
done

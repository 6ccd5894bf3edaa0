#!/usr/bin/env bash
# Single-node VADD training on OpenWebText (paper setting), one process per visible GPU.
# Usage: CUDA_VISIBLE_DEVICES=<gpus> bash scripts/train_owt_vadd.sh \
#   <batch_size> <seq_len> <num_particles> <encoder_training_times> \
#   <latent_struc> <mask_struc> <latent_dim> [extra hydra overrides...]
# Example: CUDA_VISIBLE_DEVICES=0,1,2,3 bash scripts/train_owt_vadd.sh 16 1024 1 1 adaln adaln 512
# <batch_size> is per GPU; the global batch stays loader.global_batch_size=512 and the
# gradient accumulation is derived from it. Re-running with the same RUN_DIR resumes.
set -euo pipefail
if [ $# -lt 7 ]; then
  sed -n '2,8p' "$0"; exit 2
fi
cd "$(dirname "$0")/.."
BS=$1 LEN=$2 K=$3 ENC=$4 LSTRUC=$5 MSTRUC=$6 LDIM=$7
shift 7
RUN_DIR=${RUN_DIR:-outputs/owt/vadd_bs${BS}_L${LEN}_K${K}_enc${ENC}_${LSTRUC}_${MSTRUC}_d${LDIM}}
"${PYTHON:-python}" main.py \
  recipe=paper data=openwebtext-split model=small decoder=small strategy=ddp \
  parameterization=subs backbone=dit model.length="$LEN" \
  loader.batch_size="$BS" loader.eval_batch_size="$BS" \
  training.loss_type=vae training.num_particles="$K" training.encoder_training_times="$ENC" \
  model.latentMLP=True model.latent1d=True model.latent_struc="$LSTRUC" \
  decoder.mask_struc="$MSTRUC" model.latent_dim="$LDIM" \
  hydra.run.dir="$RUN_DIR" "$@"

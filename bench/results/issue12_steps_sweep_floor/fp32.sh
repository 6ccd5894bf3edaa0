#!/bin/bash
# one seed of the default recipe in float32 (what precision=auto picks without AMX), then ppl_eval
S=$1; D=/tmp/ss/f$S
cd /work/main && source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false VADD_CACHE_DIR=$PWD/.cache/vadd OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p $D; start=$(date +%s)
python main.py seed=$S trainer.precision=32-true hydra.run.dir=$D/vadd > $D/vadd.log 2>&1
python main.py mode=ppl_eval eval.checkpoint_path=$D/vadd/checkpoints/last.ckpt +eval.ppl_times=3 seed=$S trainer.precision=32-true hydra.run.dir=$D/ppl eval.output_dir=$D/ppl > $D/ppl.log 2>&1
echo "seed $S fp32 done $(( $(date +%s) - start )) s"; grep "^\[ppl_eval\]" $D/ppl.log

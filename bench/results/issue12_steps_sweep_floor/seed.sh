#!/bin/bash
# one seed of the default-recipe steps sweep: VADD default, MDLM equal compute, sweep
set -e
S=$1; D=/tmp/ss/s$S
cd /work/main && source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false VADD_CACHE_DIR=$PWD/.cache/vadd OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p $D
start=$(date +%s)
python main.py seed=$S hydra.run.dir=$D/vadd > $D/vadd.log 2>&1
echo "seed $S vadd done $(( $(date +%s) - start )) s"
python main.py seed=$S training.loss_type=mdlm trainer.max_steps=707 hydra.run.dir=$D/mdlm > $D/mdlm.log 2>&1
echo "seed $S mdlm done $(( $(date +%s) - start )) s"
python scripts/steps_sweep.py --out $D/sweep --steps 4 8 16 64 \
  --run "VADD fixz=True" $D/vadd/checkpoints/last.ckpt sampling.fixz=True sampling.predictor=vae_cache \
  --run "VADD fixz=False" $D/vadd/checkpoints/last.ckpt sampling.fixz=False sampling.predictor=vae_cache \
  --run "MDLM (equal compute)" $D/mdlm/checkpoints/last.ckpt training.loss_type=mdlm sampling.predictor=ddpm_cache \
  -- eval.compute_generative_perplexity=True eval.gen_ppl_eval_model_name_or_path=smollm2 loader.eval_batch_size=32 sampling.num_sample_batches=4 seed=$S > $D/sweep.log 2>&1
echo "seed $S sweep done $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# Wall time of a steps sweep (2 runs x 4 step counts, gen-PPL by the offline smollm2 judge)
# and of its rerun, for the code tree TREE (this checkout, or a worktree of an older commit):
#   bash bench/sweep_time.sh TREE OUT        e.g. git worktree add /tmp/old <rev>; bash
#                                                 bench/sweep_time.sh /tmp/old /tmp/sw_old
# The two tiny checkpoints (VADD, MDLM; 5 steps) are trained with this checkout's code.
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=$(realpath "$1"); OUT=$(realpath -m "$2")
PY=${PYTHON:-$PWD/.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
TINY="model.length=64 model.hidden_size=64 model.cond_dim=32 model.n_blocks=2 model.latent_dim=16
 decoder.hidden_size=32 decoder.cond_dim=32 decoder.n_heads=2 decoder.n_blocks=1
 loader.global_batch_size=8 loader.eval_batch_size=8 trainer.limit_val_batches=2
 trainer.enable_progress_bar=False trainer.enable_model_summary=False"
mkdir -p "$OUT"
for loss in vae mdlm; do
  if [ ! -f "$OUT/train_$loss/checkpoints/last.ckpt" ]; then
    # shellcheck disable=SC2086
    $PY main.py hydra.run.dir="$OUT/train_$loss" $TINY training.loss_type=$loss trainer.max_steps=5 \
      callbacks.checkpoint_every_n_steps.every_n_train_steps=5 >/dev/null 2>&1
  fi
done
sweep() {
  # shellcheck disable=SC2086
  (cd "$TREE" && $PY scripts/steps_sweep.py --out "$OUT/sweep" --steps 8 16 32 64 \
    --run VADD "$OUT/train_vae/checkpoints/last.ckpt" \
    --run MDLM "$OUT/train_mdlm/checkpoints/last.ckpt" training.loss_type=mdlm \
    -- $TINY sampling.num_sample_batches=1 eval.compute_generative_perplexity=True \
    eval.gen_ppl_eval_model_name_or_path=smollm2 > "$OUT/sweep_$1.log" 2>&1)
}
rm -rf "$OUT/sweep"
ms() { echo $(( $(date +%s%N) / 1000000 )); }
start=$(ms); sweep first; first=$(( $(ms) - start ))
start=$(ms); sweep again; again=$(( $(ms) - start ))
procs=$(find "$OUT/sweep" -name command.txt | wc -l)
echo "{\"tree\": \"$TREE\", \"first_ms\": $first, \"rerun_ms\": $again, \"main_py_processes\": $procs}" \
  | tee "$OUT/sweep_time.json"

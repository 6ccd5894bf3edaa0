#!/usr/bin/env bash
# The whole GPU check of issue 6 as one device call (~6-8 min on an H100/H200):
#   1. bash scripts/gpu_wheels.sh                       (here, once)
#   2. device run: command "bash bench/gpu_session.sh", carry [".whl"], timeout_s 600
# Writes $OUT/gpu_eager.json, $OUT/gpu_compile.json and $OUT/log.txt (bench/README.md).
# BENCH_SAMPLE_STEPS / BENCH_ARGS override the sampling steps / add bench options.
set -uo pipefail
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
ANCHOR=(model=small decoder=small model.length=1024 loader.global_batch_size=32
        data=openwebtext-split)
STEPS=${BENCH_SAMPLE_STEPS:-16 128 1024}
# shellcheck disable=SC2086
timeout 280 python3 bench/bench.py --device cuda --sample-steps $STEPS ${BENCH_ARGS:-} \
    --out "$OUT/gpu_eager.json" -- "${ANCHOR[@]}"
echo "eager rc=$?"
# shellcheck disable=SC2086
timeout 280 python3 bench/bench.py --device cuda --sample-steps $STEPS ${BENCH_ARGS:-} \
    --out "$OUT/gpu_compile.json" -- "${ANCHOR[@]}" model.compile=True
echo "compile rc=$?"

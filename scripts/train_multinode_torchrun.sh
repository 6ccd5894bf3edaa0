#!/usr/bin/env bash
# Multi-node VADD training with torchrun (Lightning detects the torchelastic environment).
# Run the same command on every node, changing NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#     bash scripts/train_multinode_torchrun.sh [extra hydra overrides...]
# Every process must see the same RUN_DIR (a shared file system): checkpoints go there and a
# re-run with the same RUN_DIR resumes from its last.ckpt.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-outputs/owt/vadd_multinode}
"${TORCHRUN:-torchrun}" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$GPUS_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  main.py recipe=paper data=openwebtext-split model=small decoder=small strategy=ddp \
  training.loss_type=vae trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" \
  hydra.run.dir="$RUN_DIR" "$@"

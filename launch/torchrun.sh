#!/usr/bin/env bash
# megamix pretraining through DeepSpeed, launched with torchrun (single node or multi-node).
#
#   launch/torchrun.sh [megamix train arguments...]      # e.g. --set train.steps=100 --dry-run
# Arguments are forwarded to `megamix train` unchanged, after the ones built from the knobs below.
#
# Knobs (environment variables):
#   CONFIG       run config YAML                       (default configs/gpt-125m.yaml)
#   SETS         extra overrides, space separated      e.g. SETS="train.steps=100 deepspeed.zero_stage=2"
#   NPROC        processes (GPUs) per node             (default: GPUs on this node, or 2 on CPU)
#   NNODES       number of nodes                       (default 1)
#   NODE_RANK    this node's index, 0..NNODES-1        (default 0; run the script once per node)
#   MASTER_ADDR  address of node 0                     (default 127.0.0.1)
#   MASTER_PORT  rendezvous port                       (default 29500)
#   BACKEND      gloo | nccl: overrides deepspeed.backend of the YAML (announced on stderr)
#   DRY_RUN=1    only run the start-up checks on every rank (`megamix train --dry-run`)
#   STOP_TIMEOUT seconds the ranks get to checkpoint after SIGUSR1/SIGTERM (default 110)
#   MEGAMIX_HOME the megamix checkout (default: the folder above this script)
#
# Single node, 8 GPUs:      NPROC=8 launch/torchrun.sh
# Two nodes (run on both):  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 launch/torchrun.sh
#                           NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC=8 launch/torchrun.sh
# CPU smoke test:           CONFIG=configs/tiny-cpu.yaml NPROC=2 launch/torchrun.sh --set train.steps=20
# Checkpoint and stop:      kill -USR1 <torchrun pid>   (run the same command again to resume)
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

if [[ "$NNODES" == "1" ]]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
set -x
exec torchrun "${RDZV[@]}" --nproc_per_node "$NPROC" -m megamix "${TRAIN_ARGS[@]}" "$@"

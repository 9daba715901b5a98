#!/usr/bin/env bash
# megamix pretraining with the `deepspeed` launcher (single node, or multi-node through a hostfile).
#
#   launch/deepspeed.sh [megamix train arguments...]     # e.g. --set train.steps=100 --dry-run
# Arguments are forwarded to `megamix train` unchanged, after the ones built from the knobs below.
#
# Knobs (environment variables):
#   CONFIG       run config YAML                            (default configs/gpt-125m.yaml)
#   SETS         extra overrides, space separated           e.g. SETS="deepspeed.zero_stage=3"
#   HOSTFILE     DeepSpeed hostfile ("host slots=N" lines); multi-node when set. Start from the example:
#                cp launch/hostfile.example launch/hostfile (needs passwordless ssh + pdsh between the nodes)
#   NUM_GPUS     ranks per node                             (default: all GPUs; 2 on CPU)
#   NUM_NODES    use the first N hosts of the hostfile      (default: all)
#   MASTER_ADDR  address of the first host                  (default: the launcher picks it)
#   MASTER_PORT  rendezvous port                            (default 29500)
#   NO_SSH=1     multi-node without ssh/pdsh: run this script on every node with NODE_RANK set
#   NODE_RANK    this node's index in the hostfile (with NO_SSH=1)
#   BACKEND      gloo | nccl: overrides deepspeed.backend of the YAML (announced on stderr)
#   DRY_RUN=1    only run the start-up checks on every rank (`megamix train --dry-run`)
#   MEGAMIX_HOME the megamix checkout (default: the folder above this script)
#
# Single node:   NUM_GPUS=8 launch/deepspeed.sh
# Multi-node:    HOSTFILE=launch/hostfile CONFIG=configs/gpt-1b.yaml launch/deepspeed.sh
#   no ssh:      HOSTFILE=launch/hostfile NO_SSH=1 NODE_RANK=<i> MASTER_ADDR=<first host> ... (on each node)
# CPU:           CONFIG=configs/tiny-cpu.yaml NUM_GPUS=2 launch/deepspeed.sh
#                (on CPU the launcher counts NUMA nodes as devices, hence the explicit NUM_GPUS)
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ARGS=(--no_local_rank --module --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "launch: hostfile $HOSTFILE not found; cp launch/hostfile.example $HOSTFILE and edit it" >&2
    exit 2
  fi
  ARGS+=(--hostfile "$HOSTFILE")
  [[ -n "${NUM_NODES:-}" ]] && ARGS+=(--num_nodes "$NUM_NODES")
  [[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
  if [[ "${NO_SSH:-0}" == "1" ]]; then
    [[ -n "${NODE_RANK:-}" ]] || { echo "launch: NO_SSH=1 needs NODE_RANK" >&2; exit 2; }
    ARGS+=(--no_ssh --node_rank "$NODE_RANK")
  fi
else
  # no hostfile: single node; make sure the launcher does not pick up a stale /job/hostfile
  ARGS+=(--hostfile /dev/null)
  if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
  fi
fi
[[ -n "${NUM_GPUS:-}" ]] && ARGS+=(--num_gpus "$NUM_GPUS")
set -x
exec deepspeed "${ARGS[@]}" megamix "${TRAIN_ARGS[@]}" "$@"

# Shared helpers for the megamix launch scripts (sourced, not executed).
# Builds the `megamix train` argument list from CONFIG, SETS and DRY_RUN, and sets CPU defaults.

# The repository root (scripts live in <root>/launch); the venv is used when present.
MEGAMIX_ROOT="${MEGAMIX_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [[ -z "${VIRTUAL_ENV:-}" && -f "$MEGAMIX_ROOT/.venv/bin/activate" ]]; then
  # shellcheck disable=SC1091
  . "$MEGAMIX_ROOT/.venv/bin/activate"
fi

CONFIG="${CONFIG:-$MEGAMIX_ROOT/configs/gpt-125m.yaml}"
if [[ ! -f "$CONFIG" ]]; then
  echo "launch: config file $CONFIG not found (set CONFIG=...)" >&2
  exit 2
fi

# On machines without CUDA: one OpenMP thread per rank (the launchers would oversubscribe the cores
# otherwise), the CPU accelerator and gloo.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  DEFAULT_BACKEND=gloo
else
  DEFAULT_BACKEND=nccl
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# megamix train arguments: always DeepSpeed; SETS holds extra space-separated overrides.
TRAIN_ARGS=(train --config "$CONFIG" --set deepspeed.enabled=true
            --set "deepspeed.backend=${BACKEND:-$DEFAULT_BACKEND}")
for s in ${SETS:-}; do TRAIN_ARGS+=(--set "$s"); done
if [[ "${DRY_RUN:-0}" == "1" ]]; then TRAIN_ARGS+=(--dry-run); fi

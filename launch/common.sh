# shellcheck shell=bash
# Shared helpers for the megamix launch scripts (sourced, not executed).
# Builds the `megamix train` argument list TRAIN_ARGS from CONFIG, SETS, BACKEND and DRY_RUN, and sets CPU
# defaults. Each script appends its own arguments ("$@") after TRAIN_ARGS, so they reach `megamix train`
# unchanged (later --set wins).

# The repository: MEGAMIX_HOME when set (SLURM runs a spooled copy of the batch script), else the folder
# above this file. Put it on PYTHONPATH so `python -m megamix` works from any directory.
MEGAMIX_ROOT="${MEGAMIX_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [[ ! -f "$MEGAMIX_ROOT/megamix/__init__.py" ]]; then
  echo "launch: $MEGAMIX_ROOT is not a megamix checkout (no megamix/__init__.py); set MEGAMIX_HOME=/path/to/megamix" >&2
  exit 2
fi
export MEGAMIX_HOME="$MEGAMIX_ROOT"
export PYTHONPATH="$MEGAMIX_ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${VIRTUAL_ENV:-}" && -f "$MEGAMIX_ROOT/.venv/bin/activate" ]]; then
  # shellcheck disable=SC1091
  . "$MEGAMIX_ROOT/.venv/bin/activate"
fi

# CONFIG: relative to the current directory, else to the repository
CONFIG="${CONFIG:-$MEGAMIX_ROOT/configs/gpt-125m.yaml}"
if [[ ! -f "$CONFIG" && "$CONFIG" != /* && -f "$MEGAMIX_ROOT/$CONFIG" ]]; then
  CONFIG="$MEGAMIX_ROOT/$CONFIG"
fi
if [[ ! -f "$CONFIG" ]]; then
  echo "launch: config file $CONFIG not found (set CONFIG=path/to/config.yaml)" >&2
  exit 2
fi

# On machines without CUDA: one OpenMP thread per rank (the launchers would oversubscribe the cores
# otherwise) and DeepSpeed's CPU accelerator.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# megamix train arguments: always DeepSpeed. deepspeed.backend comes from the YAML unless BACKEND is set.
TRAIN_ARGS=(train --config "$CONFIG" --set deepspeed.enabled=true)
if [[ -n "${BACKEND:-}" ]]; then
  echo "launch: BACKEND=$BACKEND overrides deepspeed.backend of $CONFIG" >&2
  TRAIN_ARGS+=(--set "deepspeed.backend=$BACKEND")
fi
for s in ${SETS:-}; do TRAIN_ARGS+=(--set "$s"); done
if [[ "${DRY_RUN:-0}" == "1" ]]; then TRAIN_ARGS+=(--dry-run); fi

# torchrun forwards these signals to the ranks (its --signals-to-handle, read from PET_SIGNALS_TO_HANDLE);
# SIGUSR1 or SIGTERM makes megamix save a checkpoint at the next step boundary and stop. STOP_TIMEOUT:
# seconds torchrun then waits before it kills the ranks (--shutdown-timeout). A torchrun without these options
# (check `torchrun --help`; torch 2.13 has them) ignores the variables and dies on SIGUSR1.
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-${STOP_TIMEOUT:-110}}"

#!/usr/bin/env bash
# GPU acceptance: one prepared run of everything megamix claims on a GPU, under 9 minutes on one H100, no network.
# Run from the repository root (the `run` device tool does):
#   bash benchmarks/gpu_acceptance.sh [--out FILE] [--only ITEM,ITEM] [--timeout-scale F] [--timeout ITEM=S] ...
#   bash benchmarks/gpu_acceptance.sh --dry-run     # the plan + every check a CPU allows (< 1 min, no CUDA)
#   bash benchmarks/gpu_acceptance.sh --prepare-only  # just build the token store in runs/gpu_acceptance/data
# Items (each a subprocess with its own time budget; a failure never stops the run): gpu_kernel_tests, plain_bf16,
# deepspeed_zero1_nccl, deepspeed_zero3_nccl, hf_trainer_bf16, stats_allreduce_cuda_gloo, exact_resume_cuda.
# The logic is in benchmarks/gpu_acceptance.py (see its docstring and benchmarks/README.md); this script only picks
# the Python and forwards the arguments:
#   1. $PYTHON if set;
#   2. else .venv/bin/python if it exists and imports torch with CUDA;
#   3. else python3 if it imports torch with CUDA;
#   4. else (no CUDA anywhere) for --dry-run/--prepare-only/--cpu .venv/bin/python if it imports torch, else python3.
# Pinned wheels in .whl/ (pure-python ones, e.g. pytest or accelerate missing on the GPU machine) are installed into a
# temporary folder first, as kernels/bench/gpu_run.sh does. Exit code: 0 only when every selected item passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

cpu_only=0
for a in "$@"; do
  case "$a" in --dry-run|--prepare-only|--cpu) cpu_only=1 ;; esac
done

torch_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON; why="\$PYTHON"
elif [[ -x .venv/bin/python ]] && torch_cuda .venv/bin/python; then
  PY=.venv/bin/python; why=".venv/bin/python imports torch with CUDA"
elif command -v python3 >/dev/null && torch_cuda python3; then
  PY=python3; why="python3 imports torch with CUDA"
elif [[ $cpu_only == 1 && -x .venv/bin/python ]] && has_torch .venv/bin/python; then
  PY=.venv/bin/python; why="no Python with CUDA torch; .venv/bin/python (CPU torch) for a run that needs no GPU"
else
  PY=python3; why="no Python with CUDA torch found; falling back to python3"
fi
echo "gpu_acceptance: python $PY ($why)"

if [[ $cpu_only == 0 ]]; then
  unset TRITON_INTERPRET                      # compiled Triton on the GPU
fi
if ls .whl/*.whl >/dev/null 2>&1; then        # optional wheels carried to an offline machine
  SITE="${TMPDIR:-/tmp}/megamix_gpu_acceptance_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE" && echo "gpu_acceptance: .whl/ wheels on PYTHONPATH ($SITE)"
fi
export PYTHONUNBUFFERED=1 GPU_ACCEPTANCE_PYTHON_REASON="$why"
exec "$PY" benchmarks/gpu_acceptance.py "$@"

#!/usr/bin/env bash
# One-shot GPU check for the megamix kernels, run by the `run` device tool from the repo root:
#   1. the kernel/stats test suite on CUDA (compiled Triton, no TRITON_INTERPRET), incl. @gpu tests;
#   2. a CE-pass tile sweep and the fused linear-CE microbenchmarks (bf16) vs baselines.
# Everything lands in $OUT (default: kernels/bench/results/gpu_<date>), at most 8 files.
set -uo pipefail
OUT=${OUT:-kernels/bench/results/gpu_$(date -u +%Y%m%dT%H%M)}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
if ls .whl/*.whl >/dev/null 2>&1; then   # Liger-Kernel and cut-cross-entropy baselines (pure-python wheels)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu_env.txt"

TEST_BUDGET=${TEST_BUDGET:-150}
BENCH_BUDGET=${BENCH_BUDGET:-200}
echo "== tests (budget ${TEST_BUDGET}s)"
timeout "$TEST_BUDGET" python3 -m pytest tests/test_kernels_*.py tests/test_stats_*.py -q -rs -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
echo "== bench (new shapes start only within ${BENCH_BUDGET}s)"
SHAPES=${SHAPES:-128256:4096:16384,32000:768:16384,50257:768:16384,128256:2048:16384,151936:4096:16384,151936:2048:16384,50257:2048:16384,32000:4096:16384,128256:4096:32768,32000:2048:16384,50257:4096:16384,128256:768:16384,151936:768:16384}
timeout $((BENCH_BUDGET + 150)) python3 -m megamix.kernels.bench.bench_fused_lce --shapes "$SHAPES" --k 32x32,64x64,128x64 \
  --methods fused+proj,fused,eager+proj,liger,cce --chunk "${CHUNK:-8192}" --iters "${ITERS:-7}" --warmup 2 \
  ${SWEEP---sweep-ce} --time-budget "$BENCH_BUDGET" --out-dir "$OUT" --tag bench_gpu 2>&1 | tee "$OUT/bench_gpu.log" | tail -60
echo "== done $(date -u)"

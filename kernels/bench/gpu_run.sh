#!/usr/bin/env bash
# One-shot GPU check for the megamix kernels (about 8 minutes), run by the `run` device tool from the repo root:
#   1. the kernel/stats test suite on CUDA (compiled Triton, no TRITON_INTERPRET), incl. @gpu tests;
#   2. where u = δ P1ᵀ is computed (--u-methods fused,gemm,augmented,tiled) against the step's three-GEMM
#      floor, over chunk sizes, at the key shapes, with the Liger / CCE baselines;
#   3. the other shapes (small d included) with the default u_method;
#   4. the per-sample reduction benchmark.
# Everything lands in $OUT (the device tool sets it; default: the run folder runs/bench/gpu-<date>), each
# benchmark ending with its table; copy a run worth keeping to kernels/bench/results/gpu_<gpu>_<what>/ on purpose.
# The versions used are recorded (gpu_env.txt, and "matches_pins" in every JSON): carry pinned wheels in .whl/
# to measure the pins.
set -uo pipefail
OUT=${OUT:-runs/bench/gpu-$(date -u +%Y%m%dT%H%M)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)      # absolute: the commands below run from the laid-out copy
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
if ls .whl/*.whl >/dev/null 2>&1; then   # Liger-Kernel and cut-cross-entropy baselines (pure-python wheels)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# kernels/ is megamix.kernels through the checkout's link megamix/kernels -> ../kernels. No pip here (the machine
# may lack wheel/network), and a copied tree may have lost the link: lay the checkout out as the installed package
# would be, in /tmp, with the real folder in place of the link, and run from there.
SRC=/tmp/megamix_src
rm -rf "$SRC" && mkdir -p "$SRC" && cp -r megamix "$SRC/" && rm -rf "$SRC/megamix/kernels" \
  && cp -r kernels "$SRC/megamix/kernels" \
  && cp -r tests configs pytest.ini "$SRC/"
export PYTHONPATH="$SRC:${PYTHONPATH#.:}"
cd "$SRC"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu_env.txt"

TEST_BUDGET=${TEST_BUDGET:-120}
echo "== tests (budget ${TEST_BUDGET}s)"
timeout "$TEST_BUDGET" python3 -m pytest tests/test_kernels_*.py tests/test_stats_*.py -q -rs -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -25

echo "== u methods vs the three-GEMM floor, chunk sweep (budget ${DESIGN_BUDGET:-170}s)"
timeout $((${DESIGN_BUDGET:-170} + 90)) python3 -m megamix bench kernels \
  --shapes "${DESIGN_SHAPES:-128256:4096:16384,151936:4096:16384,32000:768:16384}" --k 64x64,128x64 \
  --methods floor,fused+proj,fused,liger,cce --u-methods fused,gemm,augmented,tiled \
  --chunks "${CHUNKS:-4096,8192,16384}" --iters "${ITERS:-7}" --warmup 2 \
  --time-budget "${DESIGN_BUDGET:-170}" --out "$OUT" --tag bench_gpu_designs 2>&1 | tee "$OUT/bench_gpu_designs.log" | tail -40

echo "== other shapes, default u_method (budget ${BENCH_BUDGET:-90}s)"
SHAPES=${SHAPES:-128256:768:16384,50257:768:16384,151936:768:16384,128256:2048:16384,50257:2048:16384,32000:4096:16384}
timeout $((${BENCH_BUDGET:-90} + 60)) python3 -m megamix bench kernels --shapes "$SHAPES" --k 64x64 \
  --methods floor,fused+proj,fused,eager+proj,liger,cce --chunk 8192 --iters "${ITERS:-7}" --warmup 2 \
  --time-budget "${BENCH_BUDGET:-90}" --out "$OUT" --tag bench_gpu 2>&1 | tee "$OUT/bench_gpu.log" | tail -30

echo "== per-sample reduction"
timeout 60 python3 -m megamix bench gram --out "$OUT" 2>&1 | tail -20
echo "== done $(date -u)"

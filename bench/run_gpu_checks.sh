#!/usr/bin/env bash
# One GPU session's checks, in one command (device time is scarce): install the checkout, run
# the kernel tests on CUDA tensors and the `gpu` tests, then (unless skipped) the rest of the
# suite, the fused-kernel micro-benchmark and the demo at a real size. Logs and results go to $OUT.
#   SKIP_SUITE=1 SKIP_BENCH=1 SKIP_GRAPHS=1 SKIP_DEMO=1 DEMO_MODEL=qwen3-8b PAITON_COMMIT=<sha>
set -uo pipefail
OUT=${OUT:-/tmp/paiton-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

python3 -m pytest -q -ra -s -p no:cacheprovider tests/test_gpu.py tests/test_*_kernel.py 2>&1 | tee "$OUT/pytest_gpu.log" \
  | grep -E "passed|failed|error|paiton .* us|max \|logit|^FAILED|^ERROR"
[ -n "${SKIP_SUITE:-}" ] || python3 -m pytest -q -ra -p no:cacheprovider -m "not gpu" tests/ 2>&1 | tee "$OUT/pytest.log" | tail -8
[ -n "${SKIP_BENCH:-}" ] || python3 bench/fused_kernels.py --out "$OUT" 2>&1 | tail -24
if [ -z "${SKIP_GRAPHS:-}" ]; then  # the ATen graphs the passes see on this device, for writing patterns
  python3 bench/dump_graphs.py --out /tmp/graphs --dtype bfloat16 > /dev/null 2>&1 && tar czf "$OUT/graphs.tgz" -C /tmp graphs
fi
[ -n "${SKIP_DEMO:-}" ] || timeout 400 paiton demo --model "${DEMO_MODEL:-qwen3-8b}" --mode reduce-overhead 2>&1 | tee "$OUT/demo.log" | grep -v "^\[paiton\]" | tail -15

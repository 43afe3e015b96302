#!/usr/bin/env bash
# One GPU session's checks, in one command (device time is scarce): install the checkout, run
# the `gpu` tests (and the kernel tests on CUDA tensors), then, each unless skipped and each
# under its own time limit, the rest of the suite, the fused-kernel micro-benchmark, the
# whole-model memory/step run, the kernels-per-layer count, the per-kernel profile of a decode
# step, the GEMV sweep, the profile of the bundled loop's token period, the loop comparison,
# the serving benchmark and the demo. Logs and results go to $OUT.
#   SKIP_KERNEL_TESTS=1 SKIP_SUITE=1 SKIP_BENCH=1 SKIP_MEMORY=1 SKIP_LAYER_KERNELS=1 SKIP_PROFILE=1 SKIP_GEMV_SWEEP=1
#   SKIP_LOOP_PROFILE=1 SKIP_LOOP=1 SKIP_SERVING=1 SKIP_GRAPHS=1 SKIP_DEMO=1
#   SERVING_ARGS="--model qwen3-8b --batch-sizes 1 ..." (default: Qwen3-8B at batch 1, eager vs stock
#   Inductor + tuning vs Paiton, 64 tokens; each configuration's first graphs take 2-4 minutes to compile)
#   LOOP_MODELS=qwen3-8b,qwen3-32b LOOP_BATCHES=1,32 LOOP_CONFIGS=eager,inductor,paiton
#   PROFILE_MODEL=qwen3-8b PROFILE_BATCHES=1,64 PROFILE_CONFIGS=inductor-cdt,paiton
#   LOOP_PROFILE_MODEL=qwen3-8b LOOP_PROFILE_CONFIGS=paiton
#   DEMO_MODEL=qwen3-8b MEMORY_MODEL=qwen3-8b BENCH_REPS=200 PAITON_COMMIT=<sha>
set -uo pipefail
OUT=${OUT:-/tmp/paiton-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/pytest_gpu.log"

tests="tests/test_gpu.py"
[ -n "${SKIP_KERNEL_TESTS:-}" ] || tests="$tests tests/test_*_kernel.py"
timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -ra -s -p no:cacheprovider $tests 2>&1 | tee -a "$OUT/pytest_gpu.log" \
  | grep -E "passed|failed|error|paiton .* us|max \|logit|^FAILED|^ERROR"
[ -n "${SKIP_SUITE:-}" ] || python3 -m pytest -q -ra -p no:cacheprovider -m "not gpu" tests/ 2>&1 | tee "$OUT/pytest.log" | tail -8
[ -n "${SKIP_BENCH:-}" ] || timeout "${BENCH_TIMEOUT:-150}" python3 bench/fused_kernels.py --out "$OUT" --reps "${BENCH_REPS:-200}" 2>&1 | tail -50
[ -n "${SKIP_MEMORY:-}" ] || timeout "${MEMORY_TIMEOUT:-300}" python3 bench/qwen3_memory_and_step.py --model "${MEMORY_MODEL:-qwen3-8b}" \
  --configs "${MEMORY_CONFIGS:-paiton,inductor,eager}" --steps "${MEMORY_STEPS:-32}" --out "$OUT" 2>&1 | tail -12
[ -n "${SKIP_LAYER_KERNELS:-}" ] || timeout "${LAYER_KERNELS_TIMEOUT:-120}" python3 bench/kernels_per_layer.py --out "$OUT" 2>&1 | tail -40
[ -n "${SKIP_PROFILE:-}" ] || timeout "${PROFILE_TIMEOUT:-400}" python3 bench/profile_decode_step.py --model "${PROFILE_MODEL:-qwen3-8b}" \
  --batches "${PROFILE_BATCHES:-1,64}" --configs "${PROFILE_CONFIGS:-inductor-cdt,paiton}" --out "$OUT" 2>&1 | grep -E "^[a-z].* batch [0-9]+:" 
[ -n "${SKIP_GEMV_SWEEP:-}" ] || timeout "${GEMV_SWEEP_TIMEOUT:-150}" python3 bench/gemv_sweep.py --models "${GEMV_SWEEP_MODELS:-qwen3-8b,qwen3-32b}" \
  --out "$OUT" 2>&1 | tail -14
[ -n "${SKIP_LOOP_PROFILE:-}" ] || timeout "${LOOP_PROFILE_TIMEOUT:-400}" python3 bench/profile_decode_loop.py \
  --model "${LOOP_PROFILE_MODEL:-qwen3-8b}" --configs "${LOOP_PROFILE_CONFIGS:-paiton}" --out "$OUT" 2>&1 | tail -12
[ -n "${SKIP_LOOP:-}" ] || timeout "${LOOP_TIMEOUT:-500}" python3 bench/decode_loop_compare.py --models "${LOOP_MODELS:-qwen3-8b}" \
  --batches "${LOOP_BATCHES:-1,32}" --configs "${LOOP_CONFIGS:-eager,inductor,paiton}" --out "$OUT" 2>&1 | tail -12
[ -n "${SKIP_SERVING:-}" ] || timeout "${SERVING_TIMEOUT:-560}" python3 bench/serving.py ${SERVING_ARGS:---model qwen3-8b \
  --num-prompts 128 --rounds 1 --batch-sizes 1 --configs eager,inductor-cdt,paiton --output-len 64 --max-prompt-len 512} \
  --out "$OUT" 2>&1 | grep -E "^\| [0-9]+ \|"
if [ -z "${SKIP_GRAPHS:-}" ]; then  # the ATen graphs the passes see on this device, for writing patterns
  python3 bench/dump_graphs.py --out /tmp/graphs --dtype bfloat16 > /dev/null 2>&1 && tar czf "$OUT/graphs.tgz" -C /tmp graphs
fi
[ -n "${SKIP_DEMO:-}" ] || timeout 400 paiton demo --model "${DEMO_MODEL:-qwen3-8b}" --mode reduce-overhead 2>&1 | tee "$OUT/demo.log" | grep -v "^\[paiton\]" | tail -15

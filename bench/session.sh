#!/usr/bin/env bash
# One device session's runs, in order, each under its own time limit, for bench/detached.sh to
# carry across the device's 10-minute commands (the run outlives each command; compiles happen
# once). Results and logs go to $DETACHED_OUT (or $OUT); each step prints one line when it ends.
#
#   bash bench/detached.sh start S 570 'PAITON_COMMIT=<sha> STEPS="continuous gpu_tests sharegpt_32b" bash bench/session.sh'
#   bash bench/detached.sh wait S 570        # in each later command, until it says "done"
# (DETACHED_PACK=1 before each: one S.tgz comes back, not a file per result: the device hands back 8.)
#
# Steps (STEPS, in the order given):
#   continuous    Qwen3-8B, synthetic ShareGPT-like workload, batches 1, 8, 32, 128: the engine's
#                 continuous batch against the bundled loop's static batches, Paiton both (issue 19)
#   gpu_tests     pytest -m gpu over GPU_TESTS (default tests/; e.g. one file as a quick check)
#   sharegpt      (or sharegpt_32b) SHAREGPT_MODEL (default qwen3-32b; any Qwen3 preset takes
#                 the same token ids) through `paiton serve` over HTTP on ShareGPT V3 prompts (a
#                 workload file made on CPU: WORKLOAD), both scenarios on each server start (dataset output
#                 lengths and 256; SHAREGPT_OUTPUT_LEN), batches SHAREGPT_BATCHES in that order (issue
#                 20), configurations SHAREGPT_CONFIGS ("paiton:700 inductor-cdt:900": each its own
#                 step and time limit, a results file per configuration and scenario; a third field
#                 orders that configuration's batches: "inductor-cdt:900:2,4,128", a fourth its
#                 server's slots, over SHAREGPT_SLOTS: "paiton-fp8:600:1,8,32:32"; paiton-fp8:
#                 issue 21's FP8 weights over the same workload); each server
#                 saves its compile cache under $out (compile-cache-<size>-<config>.xz) and loads the
#                 files SHAREGPT_COMPILE_CACHES names (e.g. bench/results/compile-cache/*.xz);
#                 SHAREGPT_SLOTS: every server's slots (default its largest batch size; a cache
#                 holds the graphs of the slot count it was made with: compile-cache/'s, 128);
#                 SHAREGPT_MODEL_LEN: every server's --max-model-len (default: the longest request
#                 of the scenarios run; compile-cache/'s were made at 1472, both scenarios);
#                 batch B runs SHAREGPT_ROUNDS x B requests (2), at least SHAREGPT_MIN_PROMPTS (8);
#                 SHAREGPT_ROUNDS_FROM="64:2": R x B from batch size B on (issue 20: every slot of the
#                 64 and 128 batches serves twice, while the small ones keep one round)
#   profile       (or profile_32b) bench/profile_decode_step.py, PROFILE_MODEL (qwen3-32b), configurations
#                 PROFILE_CONFIGS (paiton; "paiton-fp8,paiton": FP8 against bf16), batches PROFILE_BATCHES (1,2,32),
#                 or PROFILE_RUNS ("paiton-fp8@1,paiton@1,inductor-cdt@1,..."): the pairs in that order;
#                 PROFILE_FP8_IN_PLACE=1: bf16 rows first, then the model quantized in place for the -fp8 ones
#                 (Qwen3-32B and its FP8 copy do not fit an 80 GB H100 together);
#                 PROFILE_CACHE_LEN: the KV cache's length (a server's, 1472: its attention's split layout);
#                 PROFILE_PROMPT_LEN: the prompt's (128; 330 for ShareGPT contexts at output 256);
#                 PROFILE_TAG names a second run of one model (its files and log); every
#                 PROFILE_STACK_DUMPS seconds (60) each thread's stack goes to stacks-profile_decode_step-*.log
#   pdl_chain     bench/pdl_chain.py: a batch-1 decode layer's products and norms as one CUDA graph,
#                 without and with PDL, for PDL_CHAIN_MODELS (qwen3-32b qwen3-8b), bf16 and FP8
#                 weights, PDL_CHAIN_LAYERS layers (16): what PDL takes off a layer, no compile
#   l2_probe      bench/l2_prefetch_probe.py: Qwen3-32B's products after a window kernel that does or
#                 does not prefetch their weight into L2 (L2_PROBE_ARGS, e.g. "--weight bf16"; no compile)
#   fp8           FP8 weights against bf16 and stock Inductor + tuning, in process, batches 1, 8, 32,
#                 output 128, for FP8_MODEL (default qwen3-8b) (issue 21)
#   fp8_http      the same table through `paiton serve` over HTTP (FP8_CONFIGS, default paiton-fp8,
#                 paiton,inductor-cdt; FP8_BATCHES, default 1,8,32; the server's slots: the largest):
#                 one server start per configuration for all its batch sizes, where `fp8`'s bundled
#                 loop compiles each batch size's shapes again (119-274 s a row for Qwen3-8B on an
#                 H100 at 79661ae: its nine rows need about 30 minutes; this, three warm-ups); each
#                 server saves its compile cache (compile-cache-<size>-<config>.xz), FP8_COMPILE_CACHES loads
#   fp8_sweep     bench/fp8_gemm_sweep.py: every FP8 path of 1-128 rows at Qwen3-8B and 32B's
#                 projections against the bf16 GEMM, and the paths fusion/fp8_paths.py chooses (issue 21)
#   prefill       bench/profile_prefill.py: a burst of the workload's first PREFILL_PROMPTS (32) prompts
#                 through the engine, prefills only (budget PREFILL_TOKENS, 2048), for PREFILL_CONFIGS
#                 (paiton,inductor-cdt) on PREFILL_MODEL (qwen3-32b): time, TFLOP/s, kernels (issue 20's TTFT);
#                 PREFILL_ARGS: more of its flags (e.g. "--warm-up engine": the server's warm-up, not two bursts)
#   swiglu_out    bench/swiglu_out_sweep.py: the batch-1 MLP with SwiGLU in down_proj's loop (today) or
#                 in gate/up's last step (gemv SWIGLU_OUT), Qwen3-8B/32B, FP8 and bf16 (no compile, ~1 min)
#   lowering_sweep, decode_loop_compare   bench/lowering_sweep.py (LOWERING_SWEEP_ARGS, e.g.
#                 "--ops decode_attention --tokens 1,8,32,64") and bench/decode_loop_compare.py
#                 with their defaults (issue 20 asks for both in spare device time)
# The stand-in tokenizer comes as a file (PAITON_TOKENIZER, gzipped beside the checkout: the GPU
# machine has no dataset to train it on).
set -uo pipefail
out=${DETACHED_OUT:-${OUT:-/tmp/paiton-session}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# A server's warm-up prints every thread's stack this often (cli.py --warmup-stack-dumps): the
# FP8 32B server's warm-up ran past its step four times (18612d0, a593e91, a8e08e6 twice). (At
# a8e08e6 the dumps were faulthandler's, and they killed both Paiton servers mid-dump; they
# are read under the GIL since.)
export PAITON_WARMUP_STACK_DUMPS=${PAITON_WARMUP_STACK_DUMPS:-240}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { echo "install failed"; cat "$out/install.log"; exit 1; }
if [ -n "${TOKENIZER_GZ:-}" ] && [ -f "$TOKENIZER_GZ" ]; then
  gunzip -c "$TOKENIZER_GZ" > /tmp/stand-in-tokenizer.json && export PAITON_TOKENIZER=/tmp/stand-in-tokenizer.json
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers, aiohttp; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'aiohttp', aiohttp.__version__)"
} > "$out/versions.log" 2>&1
cat "$out/versions.log"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "step $name: rc=$rc in $((SECONDS - began)) s"
}

load_caches() {  # load_caches FILE...: caches=(--load-compile-cache FILE ...), for serving.py
  caches=()
  for f in "$@"; do caches+=(--load-compile-cache "$f"); done
}

stop_servers() {
  # A server its limit cut off would hold the GPU. The pattern starts at the command's
  # beginning, so it cannot match a shell whose text merely mentions it.
  pkill -f "^[^ ]*python[0-9.]* -m paiton serve" && sleep 5 && pkill -9 -f "^[^ ]*python[0-9.]* -m paiton serve"
}

for name in ${STEPS:-continuous gpu_tests sharegpt_32b}; do
  case $name in
    continuous)
      step continuous "${CONTINUOUS_TIMEOUT:-900}" python3 bench/serving.py --model qwen3-8b --configs paiton \
        --schedulers static,continuous --batch-sizes 1,8,32,128 --num-prompts 256 --rounds 2 --min-prompts 16 \
        --max-prompt-len 512 --tag continuous-vs-static --out "$out" ;;
    gpu_tests)
      step gpu_tests "${GPU_TESTS_TIMEOUT:-480}" python3 -m pytest -q -ra -s -p no:cacheprovider -m gpu ${GPU_TESTS:-tests/} ;;
    sharegpt|sharegpt_32b)  # one server start per configuration, each under its own limit (CONFIG:SECONDS)
      model=${SHAREGPT_MODEL:-qwen3-32b}; short=${model#qwen3-}
      load_caches ${SHAREGPT_COMPILE_CACHES:-}
      for entry in ${SHAREGPT_CONFIGS:-paiton:700 inductor-cdt:900}; do  # CONFIG[:SECONDS[:BATCHES[:SLOTS]]]
        IFS=: read -r config limit batches slots <<< "$entry"
        # A configuration without a compile cache warms up faster with fewer slots (fewer decode
        # sizes to record); one whose cache was made at SHAREGPT_SLOTS keeps those.
        slots=${slots:-${SHAREGPT_SLOTS:-}}
        limit=${limit:-900}; batches=${batches:-${SHAREGPT_BATCHES:-1,8,32,128,2,4,16,64}}
        step "sharegpt_${short}_$config" "$limit" python3 bench/serving.py --model "$model" --serve --configs "$config" \
          --requests "${WORKLOAD:-.device/sharegpt-qwen3-32b.json}" --num-prompts 256 \
          --rounds "${SHAREGPT_ROUNDS:-2}" ${SHAREGPT_ROUNDS_FROM:+--rounds-from "$SHAREGPT_ROUNDS_FROM"} \
          --min-prompts "${SHAREGPT_MIN_PROMPTS:-8}" --batch-sizes "$batches" \
          --output-len "${SHAREGPT_OUTPUT_LEN:-dataset,256}" --tag "sharegpt-http-$config" \
          ${slots:+--server-slots "$slots"} ${SHAREGPT_MODEL_LEN:+--server-max-model-len "$SHAREGPT_MODEL_LEN"} \
          ${caches[@]+"${caches[@]}"} --save-compile-cache "$out/compile-cache-$short.xz" --out "$out"
        stop_servers
      done ;;
    pdl_chain)
      for model in ${PDL_CHAIN_MODELS:-qwen3-32b qwen3-8b}; do
        for weights in "" --fp8; do
          step "pdl_chain_${model}${weights:+_fp8}" "${PDL_CHAIN_TIMEOUT:-240}" python3 bench/pdl_chain.py --model "$model" \
            --layers "${PDL_CHAIN_LAYERS:-16}" $weights --out "$out"
        done
      done ;;
    l2_probe)
      step l2_probe "${L2_PROBE_TIMEOUT:-300}" python3 bench/l2_prefetch_probe.py ${L2_PROBE_ARGS:-} --out "$out" ;;
    fp8)
      step fp8 "${FP8_TIMEOUT:-900}" python3 bench/serving.py --model "${FP8_MODEL:-qwen3-8b}" \
        --configs paiton,paiton-fp8,inductor-cdt --batch-sizes 1,8,32 --num-prompts 64 --rounds 1 --min-prompts 8 \
        --output-len 128 --max-prompt-len 512 --tag fp8 --out "$out" ;;
    fp8_http)
      model=${FP8_MODEL:-qwen3-8b}; short=${model#qwen3-}
      load_caches ${FP8_COMPILE_CACHES:-}
      step "fp8_http_$short" "${FP8_TIMEOUT:-900}" python3 bench/serving.py --model "$model" --serve \
        --configs "${FP8_CONFIGS:-paiton-fp8,paiton,inductor-cdt}" --batch-sizes "${FP8_BATCHES:-1,8,32}" \
        --num-prompts 64 --rounds 1 --min-prompts 8 --output-len 128 --max-prompt-len 512 --tag fp8-http \
        ${caches[@]+"${caches[@]}"} --save-compile-cache "$out/compile-cache-$short.xz" --out "$out"
      stop_servers ;;
    fp8_sweep)
      step fp8_sweep "${FP8_SWEEP_TIMEOUT:-600}" python3 bench/fp8_gemm_sweep.py --models "${FP8_SWEEP_MODELS:-qwen3-8b,qwen3-32b}" \
        --out "$out" ;;
    profile_32b|profile)  # issue 20's miss at batch 32: where batch 2-32's decode step spends the 2-3 ms over
      # batch 1's; with PROFILE_CONFIGS="paiton-fp8,paiton" issue 21's FP8 decode step beside bf16's (only
      # the decode graph compiles: no prefill buckets, no server warm-up)
      step "profile_${PROFILE_MODEL:-qwen3-32b}${PROFILE_TAG:+_$PROFILE_TAG}" "${PROFILE_TIMEOUT:-600}" python3 bench/profile_decode_step.py \
        --model "${PROFILE_MODEL:-qwen3-32b}" --batches "${PROFILE_BATCHES:-1,2,32}" --configs "${PROFILE_CONFIGS:-paiton}" \
        ${PROFILE_RUNS:+--runs "$PROFILE_RUNS"} ${PROFILE_TAG:+--tag "$PROFILE_TAG"} ${PROFILE_FP8_IN_PLACE:+--fp8-in-place} \
        ${PROFILE_CACHE_LEN:+--cache-len "$PROFILE_CACHE_LEN"} ${PROFILE_PROMPT_LEN:+--prompt-len "$PROFILE_PROMPT_LEN"} --stack-dumps "${PROFILE_STACK_DUMPS:-60}" --out "$out" ;;
    prefill)  # issue 20's TTFT: a burst of the workload's first PREFILL_PROMPTS (32) prompts, prefills only, by kernel
      step "prefill_${PREFILL_MODEL:-qwen3-32b}${PREFILL_TAG:+_$PREFILL_TAG}" "${PREFILL_TIMEOUT:-600}" python3 bench/profile_prefill.py \
        --model "${PREFILL_MODEL:-qwen3-32b}" --configs "${PREFILL_CONFIGS:-paiton,inductor-cdt}" \
        --requests "${WORKLOAD:-.device/sharegpt-qwen3-32b.json}" --num-prompts "${PREFILL_PROMPTS:-32}" \
        --max-prefill-tokens "${PREFILL_TOKENS:-2048}" ${PREFILL_TAG:+--tag "$PREFILL_TAG"} ${PREFILL_ARGS:-} --out "$out" ;;
    swiglu_out)
      step swiglu_out "${SWIGLU_OUT_TIMEOUT:-300}" python3 bench/swiglu_out_sweep.py --out "$out" ;;
    lowering_sweep)  # issue 20's spare-time runs: each kernel's table launch against its neighbours ...
      step lowering_sweep "${LOWERING_SWEEP_TIMEOUT:-300}" python3 bench/lowering_sweep.py ${LOWERING_SWEEP_ARGS:-} --out "$out" ;;
    decode_loop_compare)  # ... and the bundled decode loop under eager, stock Inductor and Paiton, Qwen3-8B
      step decode_loop_compare "${DECODE_LOOP_TIMEOUT:-600}" python3 bench/decode_loop_compare.py --out "$out" ;;
    *) echo "unknown step $name" ;;
  esac
done
tail -3 "$out"/gpu_tests.log 2>/dev/null
for f in "$out"/serving-*.md; do [ -f "$f" ] && { echo "== $f"; grep -E "^\| [0-9]+ \|" "$f"; }; done

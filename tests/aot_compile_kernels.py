"""Compile every Paiton Triton kernel ahead of time for sm_80, sm_90, gfx942 and gfx950, each
with the launch configuration its lowering table picks for that chip, without a GPU; print JSON.

Run as a script in a process *without* TRITON_INTERPRET (the interpreter replaces kernels by
Python functions that triton.compile cannot take). test_aot_compile.py drives it. The kernel
signatures and the resource readout are the package's (paiton.backends.aot); this file holds
the cases: dtypes, Qwen3's shapes, and the kernels' variants.
"""

import json
import re
import sys

from paiton.backends.aot import (
    decode_attention_combine_build,
    decode_attention_split_build,
    few_rows_gemm_build,
    gemv_build,
    prefetching,
    prefill_attention_build,
    qk_norm_rope_build,
    quantize_rows_build,
    resources,
    rms_norm_build,
    silu_mul_build,
    with_pdl,
)
from paiton.backends.lowering import TRITON, TRITON_FP8_TYPES, launch_config, lowering_for
from paiton.fusion.few_rows_gemm import block_m, few_rows_config, fitting
from paiton.fusion.gemv import BLOCK_SCALES, NO_SCALES, ROW_SCALES, SCALE_BLOCK
from paiton.fusion.quantize_rows import quantize_rows_launch_config
from paiton.backends.target import target_named
from paiton.fusion.decode_attention import default_split_layout
from paiton.fusion.l2_prefetch import target_has_bulk_prefetch
from paiton.fusion.pdl import target_has_pdl

TARGETS = ("sm_80", "sm_90", "gfx942", "gfx950")
DTYPES = ("bf16", "fp16", "fp32")
# Qwen3 row widths: head_dim 128 (q/k norms), hidden 4096 (8B) and 5120 (14B/32B), and one
# wider than a single block (the two-pass path).
ROW_WIDTHS = (128, 4096, 5120, 20480)
TOKENS = 64
KV_HEADS, HEAD_DIM, CACHE_LEN = 8, 128, 4096


def launch_name(config: dict) -> str:
    """A launch's keywords as a path piece of a build's name (BLOCK_N=16/BLOCK_K=1024/...)."""
    return "/".join(f"{k}={v}" for k, v in config.items())


def builds(target):
    """(case name, op, KernelBuild) for every kernel variant, configured by `target`'s table."""
    for dtype in DTYPES:
        for has_residual in (False, True):
            op = "fused_add_rms_norm" if has_residual else "rms_norm"
            for width in ROW_WIDTHS:
                config = launch_config(op, target, n_rows=TOKENS * (32 if width == 128 else 1), n_cols=width)
                yield f"rms_norm/{dtype}/residual={has_residual}/cols={width}", op, rms_norm_build(config, dtype, has_residual)
        yield f"silu_mul/{dtype}", "silu_mul", silu_mul_build(launch_config("silu_mul", target), dtype)
        # Qwen3-8B (32 q heads) and 32B (64) with 8 kv heads, head_dim 128; without and with the
        # KV-cache write (k and v into their cache slots).
        for q_heads in (32, 64):
            for write_cache in (False, True):
                op = "qk_norm_rope_cache" if write_cache else "qk_norm_rope"
                config = launch_config(op, target, n_q_heads=q_heads, n_k_heads=KV_HEADS, head_dim=HEAD_DIM)
                yield (f"qk_norm_rope/{dtype}/q_heads={q_heads}/cache={write_cache}", op,
                       qk_norm_rope_build(config, dtype, write_cache))
        # Qwen3-8B (GQA 4) and 32B (GQA 8) decode: bounded by query positions (a causal mask built
        # in the graph), with a KV mask as well, or by a mask alone (generate's mask input).
        for group in (4, 8):
            # The split kernel the combine kernel follows (and, below, the one that combines).
            config = {**launch_config("decode_attention", target, group=group, q_len=1, head_dim=HEAD_DIM), "combine_in_split": 0}
            for has_positions, has_mask in ((True, False), (True, True), (False, True)):
                yield (f"decode_attention/{dtype}/group={group}/positions={has_positions}/mask={has_mask}", "decode_attention",
                       decode_attention_split_build(config, dtype, group, has_positions, has_mask))
            # The splits combined by the last split program (combine_in_split: the sweep's knob).
            yield (f"decode_attention/{dtype}/group={group}/positions=True/mask=False/combine_in_split", "decode_attention",
                   decode_attention_split_build({**config, "combine_in_split": 1}, dtype, group, True, False))
            # The combine kernel at batch 1, as many splits as the chip gets there.
            n_splits = default_split_layout(KV_HEADS, CACHE_LEN, target.multiprocessors, config["BLOCK_N"])[1]
            yield (f"decode_attention_combine/{dtype}/group={group}/splits={n_splits}", "decode_attention",
                   decode_attention_combine_build(config, dtype, n_splits))
        # Packed prompts' prefill attention, Qwen3-8B (GQA 4) and 32B (GQA 8).
        for group in (4, 8):
            config = launch_config("prefill_attention", target, head_dim=HEAD_DIM, element_size=4 if dtype == "fp32" else 2)
            yield f"prefill_attention/{dtype}/group={group}", "prefill_attention", prefill_attention_build(config, dtype, group)
        # Every candidate launch of the one-row linear (which runs is timed per shape on the GPU).
        # Plain, and with SwiGLU applied on the way in (down_proj at batch 1).
        for op, variant, gated in (("one_row_linear", "", False), ("silu_mul_linear", "gated/", True)):
            for config in launch_config(op, target).get("candidates", ()):
                name = launch_name(config)
                yield f"gemv/{dtype}/{variant}{name}", op, gemv_build(config, dtype, gated)
        # Every candidate launch of the few-rows GEMM on a weight in x's dtype (decode at batch 2-64;
        # timed per shape and row count on the GPU), at 16 and 64 rows a program (x's widest tiles).
        # Those that fit the chip's shared memory at that many rows: the others are not tried there.
        element_size = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
        for rows in (16, 64):
            for config in fitting(launch_config("few_rows_linear", target).get("candidates", ()), rows, element_size,
                                  target.shared_memory_per_block):
                name = launch_name(config)
                yield (f"few_rows_gemm/{dtype}/rows={rows}/{name}", "few_rows_linear",
                       few_rows_gemm_build({"BLOCK_M": block_m(rows), **config}, dtype, dtype, NO_SCALES))
        # ... gated (SwiGLU applied as x loads: down_proj at 2-64 rows), bf16, every candidate at 16
        # and 32 rows a program (the gate and up tiles both come through the pipeline).
        if dtype == "bf16":
            for rows in (16, 32):
                for config in fitting(launch_config("few_rows_linear", target).get("candidates", ()), rows, element_size,
                                      target.shared_memory_per_block):
                    yield (f"few_rows_gemm/{dtype}/gated/rows={rows}/{launch_name(config)}", "few_rows_linear",
                           few_rows_gemm_build({"BLOCK_M": block_m(rows), **config}, dtype, dtype, NO_SCALES, gated=True))
            # ... and gate/up with SwiGLU in its last step (two W tiles a stage), every candidate at 32 rows
            for config in fitting(launch_config("few_rows_linear", target).get("candidates", ()), 32, element_size,
                                  target.shared_memory_per_block, swiglu_out=True):
                yield (f"few_rows_gemm/{dtype}/swiglu_out/rows=32/{launch_name(config)}", "few_rows_linear",
                       few_rows_gemm_build({"BLOCK_M": block_m(32), **config}, dtype, dtype, NO_SCALES, swiglu_out=True))
        # The one-row GEMV on FP8 weights in the chip's format (e4m3fn; e4m3fnuz on gfx942), scales
        # per row (quantize_fp8's) or per 128 x 128 block (public FP8 checkpoints'), plain and gated.
        if dtype != "fp32" and lowering_for("fp8_linear", target).implementation == TRITON:
            params = launch_config("fp8_linear", target)
            weight_type = TRITON_FP8_TYPES[params["format"]]
            for scales, scale_name in ((ROW_SCALES, "rows"), (BLOCK_SCALES, "blocks")):
                for gated in (False, True):
                    yield (f"gemv/{dtype}/fp8={params['format']}/scales={scale_name}/gated={gated}", "fp8_linear",
                           gemv_build(params["one_row"], dtype, gated, weight_type, scales))
                if scales == ROW_SCALES and dtype == "bf16":  # every launch the one-row timing may pick (quantize_fp8's scales)
                    for config in params["one_row_candidates"][1:]:
                        name = launch_name(config)
                        yield f"gemv/{dtype}/fp8={params['format']}/scales=rows/{name}", "fp8_linear", \
                            gemv_build(config, dtype, False, weight_type, scales)
                    # gate/up with SwiGLU in its last step (bench/swiglu_out_sweep.py times it): every launch
                    for config in params["one_row_candidates"]:
                        yield (f"gemv/{dtype}/fp8={params['format']}/scales=rows/swiglu_out/{launch_name(config)}",
                               "fp8_linear", gemv_build(config, dtype, False, weight_type, scales, swiglu_out=True))
                # The few-rows GEMM on the FP8 weight, a decode step at batch 2-64 (16 and 64 rows a program).
                for rows in (16, 64):
                    yield (f"few_rows_gemm/{dtype}/fp8={params['format']}/scales={scale_name}/rows={rows}", "fp8_linear",
                           few_rows_gemm_build(few_rows_config(rows), dtype, weight_type, scales))
                # ... W converted through fp16 (a timed launch key of FP8_FEW_ROWS_CANDIDATES; at 64 rows
                # it spills 6 registers on gfx942, where no FP8 launch is timed yet)
                yield (f"few_rows_gemm/{dtype}/fp8={params['format']}/scales={scale_name}/rows=16/W_VIA_FP16",
                       "fp8_linear", few_rows_gemm_build({**few_rows_config(16), "W_VIA_FP16": True}, dtype, weight_type, scales))
                # ... and with W's rows on the product's M side (SWAP_AB: wgmma on sm_90), 16 and 32
                # rows, where the chip's table lists such launches (NVIDIA's)
                swapped = any(config.get("SWAP_AB") for config in params["several_rows_candidates"])
                for rows in (16, 32) if swapped else ():
                    yield (f"few_rows_gemm/{dtype}/fp8={params['format']}/scales={scale_name}/rows={rows}/W_VIA_FP16/SWAP_AB",
                           "fp8_linear", few_rows_gemm_build({**few_rows_config(rows), "W_VIA_FP16": True, "SWAP_AB": True},
                                                             dtype, weight_type, scales))
                # ... and every launch with W's tiles by tensor descriptor (W_TMA) the chip's table lists,
                # at 32 rows (those whose K tile lies in one scale block, for block scales)
                for config in params["several_rows_candidates"]:
                    if config.get("W_TMA") and (scales != BLOCK_SCALES or SCALE_BLOCK % config["BLOCK_K"] == 0):
                        yield (f"few_rows_gemm/{dtype}/fp8={params['format']}/scales={scale_name}/rows=32/{launch_name(config)}",
                               "fp8_linear", few_rows_gemm_build({"BLOCK_M": block_m(32), **config}, dtype, weight_type, scales))
                # ... and gate/up with SwiGLU in its last step (passes/swiglu_out.py's fp8_linear_silu_mul),
                # bf16 at 32 rows: with quantize_fp8's row scales every launch that fits the chip's shared
                # memory with two W tiles a stage; with block scales the untimed launch
                if dtype == "bf16":
                    launches = (fitting(params["several_rows_candidates"], 32, 2, target.shared_memory_per_block,
                                        swiglu_out=True) if scales == ROW_SCALES else [params["several_rows_candidates"][0]])
                    for config in launches:
                        yield (f"few_rows_gemm/{dtype}/fp8={params['format']}/scales={scale_name}/swiglu_out/rows=32/"
                               f"{launch_name(config)}", "fp8_linear",
                               few_rows_gemm_build({"BLOCK_M": block_m(32), **config}, dtype, weight_type, scales,
                                                   swiglu_out=True))
            # The per-token quantization before torch._scaled_mm (bf16 activations only: the one dtype
            # row-wise _scaled_mm returns), 128 tokens of Qwen3's linear inputs: hidden 4096 / 5120,
            # intermediate 12288 (one pass) and 25600 (32B: wider than a register row, two passes).
            if dtype == "bf16":
                for width in (4096, 5120, 12288, 25600):
                    yield (f"quantize_rows/{dtype}/fp8={params['format']}/cols={width}", "fp8_linear",
                           quantize_rows_build(quantize_rows_launch_config(TOKENS * 2, width), dtype, weight_type))
    yield from norm_linear_builds(target)
    if target_has_pdl(target):
        yield from pdl_builds(target)
    if target_has_bulk_prefetch(target):
        yield from prefetch_builds(target)


def norm_linear_builds(target):
    """The GEMV with the norm inside (rms_norm_linear: q/k/v and gate/up after their norm) and with
    the residual added (linear_add: o_proj, and down_proj gated), bf16 and fp32, the first
    candidate of each weight type; with FP8 weights every launch the one-row timing may pick, as
    those are the products an FP8 decode step at batch 1 runs."""
    gemv = launch_config("one_row_linear", target).get("candidates", ())
    for dtype in ("bf16", "fp32"):
        for config in gemv[:1]:
            yield f"gemv/{dtype}/norm", "norm_linear", gemv_build(config, dtype, norm=True)
            yield f"gemv/{dtype}/residual", "norm_linear", gemv_build(config, dtype, residual=True)
            yield f"gemv/{dtype}/gated/residual", "norm_linear", gemv_build(config, dtype, True, residual=True)
    if lowering_for("fp8_linear", target).implementation == TRITON:
        params = launch_config("fp8_linear", target)
        weight_type = TRITON_FP8_TYPES[params["format"]]
        for config in params.get("one_row_candidates", ()):
            name = f"gemv/bf16/fp8={params['format']}/scales=rows/{launch_name(config)}"
            yield f"{name}/norm", "norm_linear", gemv_build(config, "bf16", False, weight_type, ROW_SCALES, norm=True)
            yield (f"{name}/gated/residual", "norm_linear",
                   gemv_build(config, "bf16", True, weight_type, ROW_SCALES, residual=True))


def prefetch_builds(target):
    """The norm and rotary kernels asking L2 for the next product's weight (fusion/l2_prefetch.py)
    as a batch-1 step of Qwen3-32B launches them (the prefetch's programs appended), with and
    without PDL, "/prefetch" in their names."""
    from paiton.fusion.l2_prefetch import prefetch_plan

    budgets = lowering_for("l2_prefetch", target).params
    for launch, suffix in ((lambda c: c, ""), (with_pdl, "/pdl")):
        config = launch_config("fused_add_rms_norm", target, n_rows=1, n_cols=5120)
        chunks = prefetch_plan(10240 * 5120, budgets["fused_add_rms_norm"], budgets["programs"], budgets["chunk_bytes"])[2]
        yield (f"rms_norm/bf16/residual=True/cols=5120/prefetch{suffix}", "fused_add_rms_norm",
               rms_norm_build(launch(prefetching(config, chunks, budgets["chunk_bytes"])), "bf16", True))
        config = launch_config("qk_norm_rope_cache", target, n_q_heads=64, n_k_heads=KV_HEADS, head_dim=HEAD_DIM)
        chunks = prefetch_plan(5120 * 8192, budgets["qk_norm_rope_cache"], budgets["programs"], budgets["chunk_bytes"])[2]
        yield (f"qk_norm_rope/bf16/q_heads=64/cache=True/prefetch{suffix}", "qk_norm_rope_cache",
               qk_norm_rope_build(launch(prefetching(config, chunks, budgets["chunk_bytes"])), "bf16", True))


def pdl_builds(target):
    """Each kernel of a bf16 decode step launched with programmatic dependent launch (PAITON_PDL=1,
    fusion/pdl.py), on a chip that has it: one launch of each, Qwen3-32B's shapes, "/pdl" in their names."""
    dtype = "bf16"
    config = launch_config("fused_add_rms_norm", target, n_rows=1, n_cols=5120)
    yield "rms_norm/bf16/residual=True/cols=5120/pdl", "fused_add_rms_norm", rms_norm_build(with_pdl(config), dtype, True)
    yield "silu_mul/bf16/pdl", "silu_mul", silu_mul_build(with_pdl(launch_config("silu_mul", target)), dtype)
    config = launch_config("qk_norm_rope_cache", target, n_q_heads=64, n_k_heads=KV_HEADS, head_dim=HEAD_DIM)
    yield "qk_norm_rope/bf16/q_heads=64/cache=True/pdl", "qk_norm_rope_cache", qk_norm_rope_build(with_pdl(config), dtype, True)
    config = with_pdl({**launch_config("decode_attention", target, group=8, q_len=1, head_dim=HEAD_DIM), "combine_in_split": 0})
    yield "decode_attention/bf16/group=8/pdl", "decode_attention", decode_attention_split_build(config, dtype, 8, True, False)
    yield "decode_attention_combine/bf16/splits=16/pdl", "decode_attention", decode_attention_combine_build(config, dtype, 16)
    yield ("decode_attention/bf16/group=8/combine_in_split/pdl", "decode_attention",
           decode_attention_split_build({**config, "combine_in_split": 1}, dtype, 8, True, False))
    config = with_pdl(launch_config("prefill_attention", target, head_dim=HEAD_DIM, element_size=2))
    yield "prefill_attention/bf16/group=8/pdl", "prefill_attention", prefill_attention_build(config, dtype, 8)
    gemv = with_pdl(launch_config("one_row_linear", target)["candidates"][0])
    yield "gemv/bf16/gated/pdl", "silu_mul_linear", gemv_build(gemv, dtype, True)
    yield "gemv/bf16/norm/pdl", "norm_linear", gemv_build(gemv, dtype, norm=True)
    yield "gemv/bf16/gated/residual/pdl", "norm_linear", gemv_build(gemv, dtype, True, residual=True)
    few_rows = with_pdl({"BLOCK_M": block_m(32), **launch_config("few_rows_linear", target)["candidates"][0]})
    yield "few_rows_gemm/bf16/rows=32/pdl", "few_rows_linear", few_rows_gemm_build(few_rows, dtype, dtype, NO_SCALES)
    params = launch_config("fp8_linear", target)
    weight_type = TRITON_FP8_TYPES[params["format"]]
    for config in params["one_row_candidates"][:2]:  # CHUNK alone, and with X_PER_ROW
        yield (f"gemv/bf16/fp8={params['format']}/scales=rows/{launch_name(config)}/pdl", "fp8_linear",
               gemv_build(with_pdl(config), dtype, False, weight_type, ROW_SCALES))
    for config in params["several_rows_candidates"]:
        if config.get("SPLITS", 1) > 1 and config.get("W_VIA_FP16"):  # split along K, through fp16
            yield (f"few_rows_gemm/bf16/fp8={params['format']}/rows=32/{launch_name(config)}/pdl", "fp8_linear",
                   few_rows_gemm_build(with_pdl({"BLOCK_M": block_m(32), **config}), dtype, weight_type, ROW_SCALES))
    yield (f"quantize_rows/bf16/fp8={params['format']}/pdl/cols=5120", "fp8_linear",
           quantize_rows_build(with_pdl(quantize_rows_launch_config(TOKENS * 2, 5120)), dtype, weight_type))


def main():
    results = {}
    for target_name in TARGETS:
        target = target_named(target_name)
        for name, op, build in builds(target):
            if lowering_for(op, target).implementation != TRITON:
                continue
            key = f"{name}@{target_name}"
            try:
                compiled = build.compile(target)
                summary = resources(compiled, target)
                if name.startswith("quantize_rows/"):  # the chip's own conversion, IEEE divisions
                    code = compiled.asm["ptx" if target.vendor == "cuda" else "amdgcn"]
                    summary["conversions"] = sorted(set(re.findall(
                        r"cvt\.rn\.satfinite\.e4m3x2\.f32|div\.rn\.f32|v_cvt(?:_scalef32)?_pk_fp8_f32|v_div_scale_f32", code)))
                results[key] = {"ok": True, "kernel": build.name, "uses_dot": build.uses_dot,
                                "config": {**build.constexprs, **build.options},
                                "shared_limit": target.shared_memory_per_block, **summary}
            except Exception as error:  # reported, and failed by the test
                results[key] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

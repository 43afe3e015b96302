"""Compile Paiton's Triton kernels ahead of time for GPU targets, without a GPU; print JSON.

Run as a script in a process *without* TRITON_INTERPRET (the interpreter replaces kernels by
Python functions that triton.compile cannot take). test_aot_compile.py drives it.

Kernels are compiled with the launch configuration the launcher picks and with the
specialization the JIT applies at run time for aligned tensors (pointers and the row width
divisible by 16), so the code checked is the code that runs.
"""

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from paiton.fusion.rms_norm import _rms_norm_kernel, rms_norm_launch_config
from paiton.fusion.decode_attention import DECODE_BLOCK_N, _decode_attention_combine_kernel, _decode_attention_split_kernel
from paiton.fusion.qk_norm_rope import _qk_norm_rope_kernel
from paiton.fusion.swiglu import _silu_mul_kernel, silu_mul_launch_config

TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "gfx950": GPUTarget("hip", "gfx950", 64),
}
# Qwen3 row widths: head_dim 128 (q/k norms), hidden 4096 (8B) and 5120 (14B/32B), and one
# wider than a single block (the two-pass path).
ROW_WIDTHS = (128, 4096, 5120, 20480)
TOKENS = 64


def rms_norm_cases():
    for dtype in ("bf16", "fp16", "fp32"):
        for has_residual in (False, True):
            for width in ROW_WIDTHS:
                config = rms_norm_launch_config(TOKENS * (32 if width == 128 else 1), width)
                yield f"rms_norm/{dtype}/residual={has_residual}/cols={width}", dtype, has_residual, config


def compile_rms_norm(dtype, has_residual, config, target):
    pointer = f"*{dtype}"
    signature = {
        "x_ptr": pointer, "residual_ptr": pointer, "weight_ptr": pointer, "out_ptr": pointer, "sum_ptr": pointer,
        "n_rows": "i32", "n_cols": "i32", "eps": "fp32",
        "HAS_RESIDUAL": "constexpr", "BLOCK_ROWS": "constexpr", "BLOCK_COLS": "constexpr", "NUM_COL_BLOCKS": "constexpr",
    }
    names = list(signature)
    aligned = ["x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "sum_ptr", "n_cols"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    constexprs = {"HAS_RESIDUAL": has_residual, **{k: v for k, v in config.items() if k != "num_warps"}}
    source = ASTSource(fn=_rms_norm_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": config["num_warps"]})


def silu_mul_cases():
    for dtype in ("bf16", "fp16", "fp32"):
        yield f"silu_mul/{dtype}", dtype


def compile_silu_mul(dtype, target):
    signature = {
        "gate_ptr": f"*{dtype}", "up_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
        "n_cols": "i32", "gate_row_stride": "i32", "up_row_stride": "i32", "BLOCK": "constexpr",
    }
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n != "BLOCK"}
    config = silu_mul_launch_config(target.warp_size)
    source = ASTSource(fn=_silu_mul_kernel, signature=signature, constexprs={"BLOCK": config["BLOCK"]}, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": config["num_warps"]})


def qk_norm_rope_cases():
    # Qwen3-8B (32 q heads) and 32B (64) with 8 kv heads, head_dim 128; without and with the
    # KV-cache write (k and v into their cache slots).
    for dtype in ("bf16", "fp16", "fp32"):
        for q_heads in (32, 64):
            for write_cache in (False, True):
                yield f"qk_norm_rope/{dtype}/q_heads={q_heads}/cache={write_cache}", dtype, q_heads, write_cache


def compile_qk_norm_rope(dtype, q_heads, write_cache, target):
    pointers = ["q_ptr", "k_ptr", "v_ptr", "q_w_ptr", "k_w_ptr", "q_out_ptr", "k_out_ptr", "v_out_ptr", "cos_ptr", "sin_ptr"]
    ints = ["seq_len", "n_q_heads", "n_k_heads", "head_dim", "cache_len", "eps"]
    for tensor in ("q", "k", "v", "q_out", "k_out", "v_out"):
        ints += [f"{tensor}_stride_b", f"{tensor}_stride_s", f"{tensor}_stride_h"]
    ints += ["cos_stride_b", "cos_stride_s", "sin_stride_b", "sin_stride_s"]
    signature = {**{p: f"*{dtype}" for p in pointers}, "slot_ptr": "*i64", **{n: "i32" for n in ints}, "eps": "fp32",
                 "WRITE_CACHE": "constexpr", "BLOCK_HEADS": "constexpr", "BLOCK_HALF": "constexpr"}
    names = list(signature)
    # As the JIT specializes for Qwen3's aligned tensors (head_dim 128, strides multiples of 16).
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in ("eps", "seq_len", "n_q_heads", "n_k_heads", "cache_len", "slot_ptr") and signature[n] != "constexpr"}
    source = ASTSource(fn=_qk_norm_rope_kernel, signature=signature,
                       constexprs={"WRITE_CACHE": write_cache, "BLOCK_HEADS": q_heads, "BLOCK_HALF": 64}, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": 4})


def decode_attention_cases():
    # Qwen3-8B (GQA 4) and 32B (GQA 8) decode, head_dim 128: bounded by query positions (a causal
    # mask built in the graph), with a KV mask as well, or by a mask alone (generate's mask input).
    for dtype in ("bf16", "fp16", "fp32"):
        for group in (4, 8):
            for has_positions, has_mask in ((True, False), (True, True), (False, True)):
                yield (f"decode_attention/{dtype}/group={group}/positions={has_positions}/mask={has_mask}", dtype, group,
                       has_positions, has_mask)


def compile_decode_attention(dtype, group, has_positions, has_mask, target):
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "pos_ptr": "*i64",
                "mask_ptr": "*i1", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    ints = ["n_kv_heads", "q_len", "head_dim", "cache_len", "q_stride_b", "q_stride_h", "q_stride_s", "k_stride_b",
            "k_stride_h", "k_stride_n", "v_stride_b", "v_stride_h", "v_stride_n", "pos_stride_b", "pos_stride_s",
            "mask_stride_b", "mask_stride_s", "mask_stride_n", "split_size", "n_splits"]
    constexprs = {"GROUP": group, "BLOCK_M": max(16, group), "BLOCK_N": DECODE_BLOCK_N, "BLOCK_D": 128,
                  "HAS_POSITIONS": has_positions, "HAS_MASK": has_mask, "DOT_FP32": False,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else None}
    if has_mask:  # a contiguous mask: the JIT specializes its unit key stride as a constant
        constexprs["mask_stride_n"] = 1
    signature = {**pointers, **{n: "i32" for n in ints}, "scale": "fp32", **{n: "constexpr" for n in constexprs}}
    names = _decode_attention_split_kernel.arg_names
    assert set(signature) == set(names), set(signature) ^ set(names)
    signature = {n: signature[n] for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or n in ("head_dim", "k_stride_b", "k_stride_h", "k_stride_n",
                                                               "v_stride_b", "v_stride_h", "v_stride_n", "q_stride_b",
                                                               "q_stride_h", "q_stride_s", "split_size")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn=_decode_attention_split_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": 4})


def summarize(kernel, target):
    asm = kernel.asm
    if target.backend == "cuda":
        code = asm["ptx"]
        return {
            "binary": "cubin" in asm,
            "matrix": sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync)\b", code))),
            "loads": sorted(set(re.findall(r"ld\.global[.\w]*", code))),
            "local_memory": ".local" in code,
        }
    code = asm["amdgcn"]
    number = lambda key: int(re.search(rf"{key}:?\s+(\d+)", code).group(1))  # noqa: E731
    return {
        "binary": "hsaco" in asm,
        "matrix": sorted(set(re.findall(r"\bv_mfma_\w+", code))),
        "loads": sorted(set(re.findall(r"(?:global|buffer)_load_\w+", code))),
        "vgpr_spills": number(r"\.vgpr_spill_count"),
        "sgpr_spills": number(r"\.sgpr_spill_count"),
        "scratch_bytes": number("; ScratchSize"),
    }


def main():
    cases = [(name, lambda t, c=c: compile_rms_norm(*c, t)) for name, *c in rms_norm_cases()]
    cases += [(name, lambda t, d=dtype: compile_silu_mul(d, t)) for name, dtype in silu_mul_cases()]
    cases += [(name, lambda t, c=c: compile_qk_norm_rope(*c, t)) for name, *c in qk_norm_rope_cases()]
    cases += [(name, lambda t, c=c: compile_decode_attention(*c, t)) for name, *c in decode_attention_cases()]
    results = {}
    for name, compile_for in cases:
        for target_name, target in TARGETS.items():
            try:
                results[f"{name}@{target_name}"] = {"ok": True, **summarize(compile_for(target), target)}
            except Exception as error:  # reported, and failed by the test
                results[f"{name}@{target_name}"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

"""Lowering tables: for each fused op and each chip, what runs and how its kernel is launched.

For every op Paiton's passes put in a graph (`torch.ops.paiton.<op>`) and every chip with a
preset (backends/target.py), the table names

* the implementation: "triton" (Paiton's Triton kernel, fusion/), "vendor" (the vendor's
  library through torch: cuBLAS, hipBLASLt, oneDNN), "reference" (the op's eager reference
  code, on the CPU; under TRITON_INTERPRET=1 the Triton kernel in Triton's interpreter), or
  "inductor": the op is not used, its pass leaves the subgraph to Inductor (and the fusion
  report shows 0 for it);
* the chip's launch parameters: num_warps, num_stages, block sizes fixed per chip, and on ROCm
  waves_per_eu, matrix_instr_nonkdim and kpack where the kernel has matrix products.
  `launch_config(op, target, **shape)` adds the block sizes the input's shape decides (the
  helpers in fusion/); the launchers call it for the device their tensors are on.

A chip without a table (a new arch) gets its vendor's safe defaults and one logged note, never
an error. Every table's kernels are compiled ahead of time for sm_80, sm_90, gfx942 and gfx950
in CI (tests/test_aot_compile.py: compiled, no spills, within the chip's shared memory, matrix
instructions where there are products). The ROCm and sm_100 tables are chosen from those
compiles, not from timings; bench/lowering_sweep.py times each table against alternatives on
the GPU it runs on.

    python -m paiton.backends.lowering --target gfx942    # print a table, compiled ahead of time
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from paiton.backends.target import Target, detect_target, target_named
from paiton.fusion.decode_attention import DECODE_BLOCK_N, decode_attention_block_sizes
from paiton.fusion.few_rows_gemm import (FEW_ROWS_CANDIDATES, FEW_ROWS_TMA_CANDIDATES, FP8_FEW_ROWS_CANDIDATES,
                                         FP8_FEW_ROWS_TMA_CANDIDATES)
from paiton.fusion.few_rows_gemm import MAX_ROWS as FEW_ROWS_MAX
from paiton.fusion.few_rows_gemm import block_m as few_rows_block_m
from paiton.fusion.fp8_paths import DEQUANTIZE, FP8_GEMM, SCALED_MM
from paiton.fusion.gemv import FP8_GEMV_CANDIDATES, GEMV_CANDIDATES, NO_SCALES
from paiton.fusion.l2_prefetch import CHUNK_BYTES, prefetch_plan
from paiton.fusion.prefill_attention import prefill_attention_block_sizes
from paiton.fusion.qk_norm_rope import qk_norm_rope_block_sizes
from paiton.fusion.rms_norm import rms_norm_launch_config
from paiton.fusion.swiglu import silu_mul_launch_config

log = logging.getLogger(__name__)

TRITON, VENDOR, REFERENCE, INDUCTOR = "triton", "vendor", "reference", "inductor"
IMPLEMENTATIONS = (TRITON, VENDOR, REFERENCE, INDUCTOR)

# The ops Paiton's passes create (each pass's `fused_op`).
FUSED_OPS = (
    "rms_norm", "fused_add_rms_norm", "silu_mul", "qk_norm_rope", "qk_norm_rope_cache", "decode_attention", "packed_linear",
    "one_row_linear", "silu_mul_linear", "few_rows_linear", "fp8_linear", "all_reduce_add_rms_norm", "l2_prefetch",
    "norm_linear", "prefill_attention",
)

# FP8 weights (fusion/fp8_linear.py): the format a chip computes in, the one-row GEMV's
# launches (`one_row`: the untimed one, 16 rows x 1024 bytes of FP8 per tile, 8 warps, 16
# sums a row a thread: 16-byte loads of W per thread; `one_row_candidates`: those timed per
# weight shape at first use, as bf16's are), and the products of several rows it may choose
# from (fusion/fp8_paths.py), in their untimed fallback order. Several rows: each shape is
# timed on the GPU at first use; untimed (during a CUDA graph capture) up to 64 rows the FP8
# GEMM reads W once (decode is memory-bound there), above them _scaled_mm multiplies on FP8
# tensor cores.
FP8_ONE_ROW = FP8_GEMV_CANDIDATES[0]
FP8_SEVERAL_ROWS = (FP8_GEMM, SCALED_MM, DEQUANTIZE)
# Every FP8 chip's kernels' parameters, beside its format (the FP8 GEMM's launches of several
# rows: `several_rows_candidates`, timed per shape and row count as the one-row ones are).
FP8_KERNELS = dict(one_row=FP8_ONE_ROW, one_row_candidates=FP8_GEMV_CANDIDATES, several_rows=FP8_SEVERAL_ROWS,
                   several_rows_candidates=FP8_FEW_ROWS_CANDIDATES)
# Hopper and later: the launches whose W tiles come by the tensor memory accelerator too (W_TMA;
# a chip before sm_90 has none: its tables keep the lists above).
TMA_FP8_KERNELS = dict(FP8_KERNELS, several_rows_candidates=FP8_FEW_ROWS_CANDIDATES + FP8_FEW_ROWS_TMA_CANDIDATES)
# AMD: without the SWAP_AB launches (their point is Hopper's wgmma; on gfx942 one spills 15
# registers at 32 rows).
AMD_FP8_KERNELS = dict(FP8_KERNELS, several_rows_candidates=tuple(
    config for config in FP8_FEW_ROWS_CANDIDATES if not config.get("SWAP_AB")))


# Weight prefetch into L2 (fusion/l2_prefetch.py): the bytes of the next product's weight each
# small kernel asks for, by the window it opens: a norm's (the kernel and the gap after it, a few
# microseconds: about 8 MB at an H200's copy rate) and the q/k norm + rotary kernel's, which
# opens attention's (three kernels, about 9 us on an H100 at batch 1: 24 MB, half of L2); and
# over how many programs appended to the kernel's grid the requests are spread (one SM issues
# them at about a line a clock: 8 MB from one program took about 50 us). Used only under
# PAITON_L2_PREFETCH=1: timed a loss on an H100 (NOTES.md, 2026-12-06; fusion/l2_prefetch.py).
L2_PREFETCH_BYTES = dict(rms_norm=8 << 20, fused_add_rms_norm=8 << 20, qk_norm_rope=24 << 20,
                         qk_norm_rope_cache=24 << 20, chunk_bytes=CHUNK_BYTES, programs=128)


class LoweringKey(NamedTuple):
    op: str
    arch: str


@dataclass(frozen=True)
class Lowering:
    implementation: str
    # The chip's launch parameters; `launch_config` adds the shape's block sizes.
    params: dict[str, Any] = field(default_factory=dict)
    why: str = ""


# ---------------------------------------------------------------------------------------------
# NVIDIA: the configurations timed on the H100 against stock Inductor
# (bench/results/fused_kernels-NVIDIA_H100_80GB_HBM3-2026-11-25.md). num_stages=3 is Triton's
# CUDA default, the one those runs used.
# ---------------------------------------------------------------------------------------------

_NVIDIA = {
    "rms_norm": Lowering(TRITON, dict(num_stages=3), "block rows and warps from the row width (rms_norm_launch_config): "
                         "rows up to 16384 wide normalized from registers in one pass"),
    "fused_add_rms_norm": Lowering(TRITON, dict(num_stages=3), "the rms_norm kernel, adding the residual on the way in"),
    "all_reduce_add_rms_norm": Lowering(TRITON, dict(num_stages=3), "tensor parallel: NCCL's all-reduce (torch's functional "
                                        "collective), then the fused add + RMSNorm kernel on the reduced buffer"),
    "silu_mul": Lowering(TRITON, silu_mul_launch_config(32), "8 elements a thread of 4 warps: one 16-byte load of gate and "
                         "of up per thread in bf16"),
    "qk_norm_rope": Lowering(TRITON, dict(num_warps=8), "one program per token for q and one for k, all heads in one "
                             "[heads, head_dim / 2] block; 8 warps: 7-21% faster than 4 at Qwen3-8B/32B's heads, 1 and 64 "
                             "tokens, with and without the cache write (H100, bench/results/lowering_sweep-sm_90-*-1e1e716-*)"),
    "qk_norm_rope_cache": Lowering(TRITON, dict(num_warps=8), "the qk_norm_rope kernel, writing k and v into their cache slots"),
    "decode_attention": Lowering(
        TRITON, dict(BLOCK_N=DECODE_BLOCK_N, num_warps=4, num_stages=2, combine_num_warps=1, combine_in_split=2),
        "64-key tiles, 2 stages of K/V prefetch; the combine kernel on one warp. Timed one knob at a time against 3 "
        "stages and a 4-warp combine (bench/lowering_sweep.py, Qwen3-8B/32B heads, cache 4096 filled 1024; "
        "lowering_sweep-sm_90-*-1e1e716-* on an H100, -2810a50 on an H200): 2 stages 4-11% faster at 64 sequences and "
        "within 1% at one; the 1-warp combine 5-7% faster at one sequence (its many splits) and even at 64. "
        "Up to 2 splits the last split program combines them (combine_in_split; one launch a layer): Qwen3-32B's "
        "heads over 150-400 of 1472 keys on an H100 (d153dc7's GPU test), batch 32 (2 splits) 18.8 us against the two "
        "kernels' 21.0, batch 1 (23 splits, combined in turn by one program) 15.4 against 9.0",
    ),
    "prefill_attention": Lowering(
        TRITON, dict(BLOCK_M=128, BLOCK_N=64, SCAN=1024, num_warps=8, num_stages=2),
        "packed prompts' prefill: 128-query tiles against 64-key tiles (the Triton flash-attention tutorial's Hopper "
        "tile at head_dim 128), only over the keys a query tile may see. Qwen3-32B's heads, packed ShareGPT-like "
        "prompts, on an H100 (d153dc7's GPU test): 0.201 ms at 2048 tokens and 0.394 at 4096, against 0.518 and 1.840 "
        "for SDPA over the dense mask (the graph before the pass); other tiles not timed yet",
    ),
    "packed_linear": Lowering(VENDOR, {}, "cuBLAS: one GEMM (torch's linear) over the packed q/k/v or gate/up weights"),
    "one_row_linear": Lowering(
        TRITON, dict(candidates=GEMV_CANDIDATES),
        "linears of one input row (batch-1 decode; packed ones too): Paiton's GEMV or cuBLAS per weight shape, as "
        "the card's measured table says (backends/measured_gemv.py) or as timed at first use (fusion/gemv.py)",
    ),
    "silu_mul_linear": Lowering(
        TRITON, dict(candidates=GEMV_CANDIDATES),
        "SwiGLU feeding a one-row linear (down_proj at batch 1): the GEMV applying silu(gate) * up as it loads, "
        "silu_mul then the plain GEMV, or silu_mul + cuBLAS, per weight shape as measured or timed (as one_row_linear)",
    ),
    "norm_linear": Lowering(
        TRITON, {},
        "a decode step's RMSNorm inside its one-row products (fusion/norm_linear.py): the residual add in the GEMV "
        "before the norm, the norm in the GEMV after it, each with the launch its unfused product runs; untimed, "
        "so only under PAITON_NORM_LINEAR=1",
    ),
    "few_rows_linear": Lowering(
        TRITON, dict(candidates=FEW_ROWS_CANDIDATES + FEW_ROWS_TMA_CANDIDATES),
        "linears of 2-64 input rows (decode at batch 2-64; packed ones too): Paiton's few-rows GEMM (W read once) or "
        "cuBLAS per weight shape and row count, as timed at first use (fusion/few_rows_gemm.py)",
    ),
    "fp8_linear": Lowering(
        TRITON, dict(format="e4m3fn", **TMA_FP8_KERNELS),
        "e4m3fn weights: one row, the GEMV dequantizing in registers (scales on the fp32 sums; its launch timed per "
        "shape at first use); several rows, the "
        "fastest for the shape (timed at first use, fusion/fp8_paths.py) of the FP8 GEMM (2-64 rows: W read once, "
        "converted in registers, mma/wgmma), torch._scaled_mm (activations quantized per token, cuBLASLt FP8) and "
        "the weight dequantized to bf16, then cuBLAS (weight-only)",
    ),
    "l2_prefetch": Lowering(
        TRITON, dict(L2_PREFETCH_BYTES),
        "the first norm or rotary kernel after a product asks L2 for the next product's first megabytes "
        "(cp.async.bulk.prefetch.L2, sm_90 on: memory streams them while the small kernels run); "
        "timed a loss on an H100 (the kernel waits for its prefetches), so only under PAITON_L2_PREFETCH=1",
    ),
}
# Before Hopper: no tensor memory accelerator, so the few-rows GEMM's launches without W_TMA.
_PRE_HOPPER_FEW_ROWS = Lowering(TRITON, dict(candidates=FEW_ROWS_CANDIDATES),
                                _NVIDIA["few_rows_linear"].why + "; no W_TMA launches before sm_90")
# Ampere: no FP8 arithmetic, and Triton converts FP8 only from sm_89 on.
_SM80 = {**_NVIDIA, "fp8_linear": Lowering(INDUCTOR, dict(format=None), "sm_80 has no FP8: quantize_fp8 refuses the chip"),
         "l2_prefetch": Lowering(INDUCTOR, {}, "no bulk L2 prefetch before sm_90: no prefetch"),
         "few_rows_linear": _PRE_HOPPER_FEW_ROWS}

# ---------------------------------------------------------------------------------------------
# AMD CDNA (wavefronts of 64): chosen from ahead-of-time compiles, not yet timed on an MI300X.
# ---------------------------------------------------------------------------------------------

# Decode attention, from compiles for gfx90a, gfx942 and gfx950 (Triton 3.9, bf16/fp16/fp32,
# GQA 4 and 8, positions and/or mask): 64-key tiles spill scalar registers (up to 8 SGPRs on
# gfx942, 44 on gfx950) and need 68 KB of LDS in fp32, over gfx942's 64 KB; 32-key tiles with
# two stages compile without spills, within 35 KB (gfx942) / 67 KB (gfx950) of LDS.
# waves_per_eu=0 (no hint): the compiler's own register budget gives 3-4 waves per SIMD in
# bf16 and 2 in fp32 without spills; 2 would cap bf16 at 2 waves, 3 spills in fp32.
# matrix_instr_nonkdim=16: the 16 x 16 MFMA tile fits the kernel's 16 query rows (a 32-wide
# tile would be half empty).
_AMD_DECODE_ATTENTION = dict(BLOCK_N=32, num_warps=4, num_stages=2, waves_per_eu=0, matrix_instr_nonkdim=16,
                             combine_num_warps=4)
# Prefill attention: 64-query tiles against 32-key tiles (decode attention's key tile), the
# 16 x 16 MFMA tile, one stage: with two (the stream pipeliner) every dtype spills scalar
# registers (23-60 on gfx942/gfx950, Triton 3.9; the scan's chunk, 128-1024, changes nothing),
# with one none do.
_AMD_PREFILL_ATTENTION = dict(BLOCK_M=64, BLOCK_N=32, SCAN=1024, num_warps=4, num_stages=1, waves_per_eu=0,
                              matrix_instr_nonkdim=16)
_AMD_CDNA = {
    "rms_norm": Lowering(TRITON, dict(num_stages=2), "the NVIDIA sizes (the widest rows: 16 wavefronts of 64 = 1024 lanes, "
                         "the workgroup limit) and Triton's ROCm default of 2 stages"),
    "fused_add_rms_norm": Lowering(TRITON, dict(num_stages=2), "the rms_norm kernel, adding the residual on the way in"),
    "all_reduce_add_rms_norm": Lowering(TRITON, dict(num_stages=2), "tensor parallel: RCCL's all-reduce, then the fused "
                                        "add + RMSNorm kernel on the reduced buffer"),
    "silu_mul": Lowering(TRITON, silu_mul_launch_config(64), "8 elements a lane of 4 wavefronts of 64: one dwordx4 load of "
                         "gate and of up per lane in bf16"),
    "qk_norm_rope": Lowering(TRITON, dict(num_warps=4), "4 wavefronts of 64 lanes per token for q and for k (NVIDIA's 8 warps not timed on AMD)"),
    "qk_norm_rope_cache": Lowering(TRITON, dict(num_warps=4), "the qk_norm_rope kernel, writing k and v into their cache slots"),
    "decode_attention": Lowering(
        TRITON, {**_AMD_DECODE_ATTENTION, "kpack": 1},
        "32-key tiles, 2 stages: no register spills, LDS within 64 KB in fp32, 3-4 waves per SIMD in bf16",
    ),
    "prefill_attention": Lowering(TRITON, {**_AMD_PREFILL_ATTENTION, "kpack": 1},
                                  "64-query tiles against decode attention's 32-key tiles; compiled ahead of time, not timed"),
    "packed_linear": Lowering(VENDOR, {}, "hipBLASLt: one GEMM (torch's linear) over the packed q/k/v or gate/up weights"),
    "one_row_linear": Lowering(INDUCTOR, {}, "not timed on an MI300X yet: one-row linears stay Inductor's (packed ones "
                               "hipBLASLt's)"),
    "silu_mul_linear": Lowering(INDUCTOR, {}, "not timed on an MI300X yet, like one_row_linear: silu_mul, then the product"),
    "norm_linear": Lowering(INDUCTOR, {}, "no one-row GEMV on AMD yet (one_row_linear): the norms stay kernels of their own"),
    "few_rows_linear": Lowering(INDUCTOR, {}, "not timed on an MI300X yet, like one_row_linear: linears of a few rows stay "
                                "Inductor's (packed ones hipBLASLt's)"),
    "fp8_linear": Lowering(
        TRITON, dict(format="e4m3fnuz", **AMD_FP8_KERNELS),
        "e4m3fnuz (the MI300X's FP8: largest value 240): one row, the GEMV dequantizing in registers; several rows, "
        "timed per shape as on NVIDIA: the FP8 GEMM on MFMA (2-64 rows), torch._scaled_mm (hipBLASLt, e4m3fnuz "
        "activations) or dequantized to bf16, then hipBLASLt. Compiled ahead of time, not timed on an MI300X yet",
    ),
    "l2_prefetch": Lowering(INDUCTOR, {}, "no bulk L2 prefetch instruction on CDNA: no prefetch"),
}
_GFX90A = {**_AMD_CDNA, "fp8_linear": Lowering(INDUCTOR, dict(format=None), "gfx90a (MI250) has no FP8: quantize_fp8 "
                                                                             "refuses the chip")}
_GFX950 = {
    **_AMD_CDNA,
    # CDNA4 computes in the OCP format (e4m3fn), as NVIDIA does.
    "fp8_linear": Lowering(TRITON, dict(format="e4m3fn", **AMD_FP8_KERNELS),
                           "e4m3fn (OCP FP8, CDNA4): as gfx942 otherwise. Compiled ahead of time, not timed"),
    # Triton deprecates kpack on gfx950 and forces it to 1.
    "decode_attention": Lowering(TRITON, dict(_AMD_DECODE_ATTENTION), _AMD_CDNA["decode_attention"].why),
    "prefill_attention": Lowering(TRITON, dict(_AMD_PREFILL_ATTENTION), _AMD_CDNA["prefill_attention"].why),
}

# CPU: each op's reference code, or under TRITON_INTERPRET=1 its Triton kernel launched with
# the NVIDIA sizes (the CPU preset has 32-wide warps), as the CPU tests have always run them.
_CPU = {op: Lowering(REFERENCE, dict(lowering.params), "the op's reference code (TRITON_INTERPRET=1: the Triton kernel)")
        for op, lowering in _NVIDIA.items() if lowering.implementation == TRITON}
_CPU["packed_linear"] = Lowering(VENDOR, {}, "torch's CPU GEMM over the packed weights")
_CPU["l2_prefetch"] = Lowering(INDUCTOR, {}, "nothing to prefetch into on a CPU")
_CPU["fp8_linear"] = Lowering(REFERENCE, dict(format="e4m3fn", several_rows=(DEQUANTIZE,)), "the weight dequantized, "
                              "then torch's CPU GEMM (TRITON_INTERPRET=1: one row through the GEMV kernel, 2-64 rows "
                              "through the FP8 GEMM)")

TABLES: dict[str, dict[str, Lowering]] = {
    "sm_80": _SM80,
    "sm_90": _NVIDIA,
    # Blackwell: the Hopper table, compiled and checked ahead of time, not timed.
    "sm_100": _NVIDIA,
    "gfx90a": _GFX90A,
    "gfx942": _AMD_CDNA,
    "gfx950": _GFX950,
    "cpu": _CPU,
}
LOWERINGS: dict[LoweringKey, Lowering] = {
    LoweringKey(op, arch): table[op] for arch, table in TABLES.items() for op in FUSED_OPS
}


def _vendor_defaults(target: Target) -> dict[str, Lowering]:
    """A chip without a table: its vendor's table, made safe for any chip of that vendor.

    Decode attention takes 32-key tiles and 2 stages: 21 KB of shared memory in bf16, 43 KB in
    fp32 (the known tables' 64-key, 3-stage tiles need 140 KB in fp32, more than the 99 KB of
    sm_86/sm_89/sm_120 or the 64 KB of sm_75 and AMD's LDS), and no AMD matrix-instruction
    options (an RDNA chip has no MFMA). Prefill attention takes 64-query (32 in fp32) tiles against
    32-key tiles, one stage: 32 KB in bf16, 48 KB in fp32. The elementwise block follows the chip's
    warp size.
    """
    if target.vendor == "cpu":
        return _CPU
    base = _NVIDIA if target.vendor == "cuda" else _AMD_CDNA
    why = "vendor default for a chip without a table"
    sm = target.compute_capability
    fp8 = base["fp8_linear"] if sm >= 89 else Lowering(INDUCTOR, dict(format=None), f"{why}: no FP8 known for this chip")
    prefetch = base["l2_prefetch"] if sm >= 90 else Lowering(INDUCTOR, {}, f"{why}: no bulk L2 prefetch before sm_90")
    few_rows = base["few_rows_linear"]
    if target.vendor == "cuda" and sm < 90:  # no tensor memory accelerator: no W_TMA launches
        few_rows = _PRE_HOPPER_FEW_ROWS
        if fp8.implementation == TRITON:
            fp8 = Lowering(TRITON, dict(fp8.params, several_rows_candidates=FP8_FEW_ROWS_CANDIDATES),
                           fp8.why + "; no W_TMA launches before sm_90")
    return {
        **base,
        "l2_prefetch": prefetch,
        "few_rows_linear": few_rows,
        "silu_mul": Lowering(TRITON, silu_mul_launch_config(target.warp_size), why),
        "decode_attention": Lowering(TRITON, dict(BLOCK_N=32, num_warps=4, num_stages=2, combine_num_warps=4), why),
        "prefill_attention": Lowering(TRITON, dict(BLOCK_M=64, BLOCK_N=32, SCAN=1024, num_warps=4, num_stages=1), why),
        "fp8_linear": fp8,
    }


@functools.cache
def lowering_table(target: Target) -> dict[str, Lowering]:
    """op -> Lowering on `target`: its arch's table, or its vendor's safe defaults (noted once)."""
    if all(LoweringKey(op, target.arch) in LOWERINGS for op in FUSED_OPS):
        return {op: LOWERINGS[LoweringKey(op, target.arch)] for op in FUSED_OPS}
    log.warning(
        "paiton: no lowering table for %s (%s); using the safe %s defaults. Known: %s. Tune one with bench/lowering_sweep.py.",
        target.arch, target.name or target.vendor, target.vendor, ", ".join(sorted(TABLES)),
    )
    return _vendor_defaults(target)


def lowering_for(op: str, target: Target) -> Lowering:
    if op not in FUSED_OPS:
        raise ValueError(f"unknown Paiton op {op!r}; ops are {list(FUSED_OPS)}")
    return lowering_table(target)[op]


def launch_config(op: str, target: Target, **shape) -> dict[str, Any]:
    """The keyword arguments a launch of `op`'s kernel on `target` gets (block sizes, num_warps,
    num_stages, ROCm options; decode attention's also `combine_num_warps` for its second kernel
    and `combine_in_split`, up to how many splits the first combines them instead):
    the table's parameters, plus the block sizes the input's shape decides.

    shape: rms_norm/fused_add_rms_norm: n_rows, n_cols; qk_norm_rope(_cache): n_q_heads,
    n_k_heads, head_dim; decode_attention: group, q_len, head_dim; prefill_attention: head_dim,
    element_size (the query tile halves in fp32); silu_mul: none (one block
    size per chip); packed_linear: none (no kernel of Paiton's: {}); one_row_linear and
    silu_mul_linear: none (the `candidates`, one picked per shape by fusion/gemv.choose);
    few_rows_linear: none (the `candidates`, one picked per shape and row count by
    fusion/few_rows_gemm.choose);
    fp8_linear: none (its format, the one-row GEMV's untimed launch `one_row` and the
    `one_row_candidates` fusion/gemv.choose picks from per shape, and `several_rows`: the
    products of several rows fusion/fp8_paths.choose_path picks from, in fallback order).
    """
    params = lowering_for(op, target).params
    if op in ("rms_norm", "fused_add_rms_norm", "all_reduce_add_rms_norm"):
        return {**rms_norm_launch_config(shape["n_rows"], shape["n_cols"]), **params}
    if op in ("qk_norm_rope", "qk_norm_rope_cache"):
        return {**qk_norm_rope_block_sizes(shape["n_q_heads"], shape["n_k_heads"], shape["head_dim"]), **params}
    if op == "decode_attention":
        return {**decode_attention_block_sizes(shape["group"], shape["q_len"], shape["head_dim"]), **params}
    if op == "prefill_attention":
        return {**params, **prefill_attention_block_sizes(shape["head_dim"], shape["element_size"], params["BLOCK_M"])}
    return dict(params)


def ops_left_to_inductor(target: Target) -> set[str]:
    return {op for op, lowering in lowering_table(target).items() if lowering.implementation == INDUCTOR}



# ---------------------------------------------------------------------------------------------
# python -m paiton.backends.lowering --target gfx942
# ---------------------------------------------------------------------------------------------


@dataclass
class TableRow:
    """One kernel launch of a fused op at a model's shapes, as the target's table configures it."""

    op: str
    implementation: str
    kernel: str
    shape: str
    config: dict[str, Any]
    build: Any = None  # an aot.KernelBuild for Paiton's Triton kernels, else None
    compiled: dict[str, Any] | None = None  # aot.resources(...) once compiled
    error: str = ""


def table_rows(target: Target, model: str, dtype: str, tokens: int, cache_len: int) -> list[TableRow]:
    """The table's launches for one decode step of `model` (a Qwen3 preset) with `tokens`
    sequences of one query each."""
    from paiton.backends import aot
    from paiton.fusion.decode_attention import default_split_layout, split_kernel_combines
    from paiton.models.qwen3 import QWEN3_PRESETS

    m = QWEN3_PRESETS[model]
    group = m.num_attention_heads // m.num_key_value_heads
    table = lowering_table(target)
    compiles = {op: target.is_gpu and lowering.implementation == TRITON for op, lowering in table.items()}

    def row(op, kernel, shape, config, build):
        lowering = table[op]
        if lowering.implementation == INDUCTOR:
            return TableRow(op, INDUCTOR, "-", shape, {})
        return TableRow(op, lowering.implementation, kernel, shape, config, build if compiles[op] else None)

    rows = []
    for op in ("rms_norm", "fused_add_rms_norm", "all_reduce_add_rms_norm"):
        config = launch_config(op, target, n_rows=tokens, n_cols=m.hidden_size)
        kernel = "_rms_norm_kernel" + (" (after the all-reduce)" if op == "all_reduce_add_rms_norm" else "")
        rows.append(row(op, kernel, f"[{tokens}, {m.hidden_size}]", config, aot.rms_norm_build(config, dtype, op != "rms_norm")))
    config = launch_config("silu_mul", target)
    rows.append(row("silu_mul", "_silu_mul_kernel", f"[{tokens}, {m.intermediate_size}]", config, aot.silu_mul_build(config, dtype)))
    heads = f"[{tokens}, {m.num_attention_heads}+{m.num_key_value_heads} heads, {m.head_dim}]"
    for op in ("qk_norm_rope", "qk_norm_rope_cache"):
        config = launch_config(op, target, n_q_heads=m.num_attention_heads, n_k_heads=m.num_key_value_heads, head_dim=m.head_dim)
        rows.append(row(op, "_qk_norm_rope_kernel", heads + (" + cache" if op.endswith("cache") else ""), config,
                        aot.qk_norm_rope_build(config, dtype, op.endswith("cache"))))
    # The window kernels asking L2 for the next product's weight (fusion/l2_prefetch.py), as many
    # bytes as the table says: q/k/v's after the norm, o_proj's after the rotary kernel.
    if table["l2_prefetch"].implementation != TRITON:
        rows.append(row("l2_prefetch", "-", "no prefetch", {}, None))
    else:
        rows += _prefetch_rows(target, m, dtype, tokens, table["l2_prefetch"].params, row)
    config = launch_config("decode_attention", target, group=group, q_len=1, head_dim=m.head_dim)
    n_splits = default_split_layout(tokens * m.num_key_value_heads, cache_len, target.multiprocessors, config["BLOCK_N"])[1]
    shape = f"[{tokens}, {m.num_attention_heads} heads, GQA {group}], cache {cache_len}"
    combines = split_kernel_combines(n_splits, config)  # no combine kernel after it
    config = {**config, "combine_in_split": int(combines)}
    rows.append(row("decode_attention", "_decode_attention_split_kernel",
                    shape + f", {n_splits} splits" + (", combined in it" if combines else ""),
                    {k: v for k, v in config.items() if k != "combine_num_warps"},
                    aot.decode_attention_split_build(config, dtype, group, has_positions=True, has_mask=False)))
    if not combines:
        rows.append(row("decode_attention", "_decode_attention_combine_kernel", f"{n_splits} splits",
                        dict(BLOCK_SPLITS=_next_power_of_2(n_splits), BLOCK_D=config["BLOCK_D"],
                             num_warps=config["combine_num_warps"]),
                        aot.decode_attention_combine_build(config, dtype, n_splits)))
    # A prefill of `tokens` packed prompt tokens (the engine's; a decode step has no prefill attention).
    element_size = {"fp32": 4}.get(dtype, 2)
    config = launch_config("prefill_attention", target, head_dim=m.head_dim, element_size=element_size)
    rows.append(row("prefill_attention", "_prefill_attention_kernel",
                    f"prefill of {tokens} tokens, {m.num_attention_heads} heads, GQA {group}", config,
                    aot.prefill_attention_build(config, dtype, group)))
    qkv = m.num_attention_heads * m.head_dim + 2 * m.num_key_value_heads * m.head_dim
    rows.append(row("packed_linear", "torch linear", f"[{tokens}, {m.hidden_size}] x [{qkv}, {m.hidden_size}]", {}, None))
    # The GEMV's candidates, a row each (which one runs: the card's measured table, or timed at first use):
    # plain for q/k/v, gated (SwiGLU as it loads) for down_proj.
    gemv_ops = (("one_row_linear", "_gemv_kernel", f"[1, {m.hidden_size}] x [{qkv}, {m.hidden_size}]", False),
                ("silu_mul_linear", "_gemv_kernel (gated)",
                 f"silu([1, {m.intermediate_size}]) x [{m.hidden_size}, {m.intermediate_size}]", True))
    for op, kernel, shape, gated in gemv_ops:
        candidates = launch_config(op, target).get("candidates", ()) if tokens == 1 else ()
        if not candidates:
            rows.append(row(op, "-", "not used: more than one row" if tokens != 1 else "-", {}, None))
        for config in candidates:
            rows.append(row(op, kernel, shape, config, aot.gemv_build(config, dtype, gated)))
    # The norm inside q/k/v's GEMV, and the residual added in down_proj's (gated), with the first
    # candidate (the launch the unfused product of the shape runs is the one they take).
    fused = tokens == 1 and table["norm_linear"].implementation == TRITON
    norm_linear = launch_config("one_row_linear", target).get("candidates", ())[:1] if fused else ()
    if not norm_linear:
        rows.append(row("norm_linear", "-", "not used: more than one row" if tokens != 1 else "-", {}, None))
    for config in norm_linear:
        rows.append(row("norm_linear", "_gemv_kernel (norm)", f"rms_norm([1, {m.hidden_size}]) x [{qkv}, {m.hidden_size}]",
                        config, aot.gemv_build(config, dtype, norm=True)))
        rows.append(row("norm_linear", "_gemv_kernel (gated, residual)",
                        f"silu([1, {m.intermediate_size}]) x [{m.hidden_size}, {m.intermediate_size}] + residual", config,
                        aot.gemv_build(config, dtype, True, residual=True)))
    # The few-rows GEMM's candidates for q/k/v at 2-64 rows (which one runs, if any: timed per shape and rows).
    few_rows = launch_config("few_rows_linear", target).get("candidates", ()) if 1 < tokens <= FEW_ROWS_MAX else ()
    if not few_rows:
        rows.append(row("few_rows_linear", "-", f"not used: {tokens} row(s)", {}, None))
    for config in few_rows:
        config = {"BLOCK_M": few_rows_block_m(tokens), **config}
        rows.append(row("few_rows_linear", "_few_rows_gemm_kernel", f"[{tokens}, {m.hidden_size}] x [{qkv}, {m.hidden_size}]",
                        config, aot.few_rows_gemm_build(config, dtype, dtype, NO_SCALES)))
    fp8 = table["fp8_linear"]
    if fp8.implementation == TRITON and tokens == 1:  # the FP8 GEMV, per-row scales (quantize_fp8's)
        from paiton.fusion.gemv import ROW_SCALES

        weight_type = TRITON_FP8_TYPES[fp8.params["format"]]
        rows.append(row("fp8_linear", f"_gemv_kernel ({fp8.params['format']})", f"[1, {m.hidden_size}] x FP8 [{qkv}, "
                        f"{m.hidden_size}]", fp8.params["one_row"],
                        aot.gemv_build(fp8.params["one_row"], dtype, False, weight_type, ROW_SCALES)))
    elif fp8.implementation == TRITON and dtype != "fp32":  # several rows: the FP8 GEMM (up to 64) and the
        # per-token quantization before _scaled_mm; which of those (or the dequantized GEMM) runs is timed per shape
        from paiton.fusion.few_rows_gemm import MAX_ROWS, few_rows_config
        from paiton.fusion.gemv import ROW_SCALES
        from paiton.fusion.quantize_rows import quantize_rows_launch_config

        fp8_name, weight_type = fp8.params["format"], TRITON_FP8_TYPES[fp8.params["format"]]
        if tokens <= MAX_ROWS and FP8_GEMM in fp8.params["several_rows"]:
            config = few_rows_config(tokens)
            rows.append(row("fp8_linear", f"_few_rows_gemm_kernel ({fp8_name})", f"[{tokens}, {m.hidden_size}] x FP8 [{qkv}, "
                            f"{m.hidden_size}]", config, aot.few_rows_gemm_build(config, dtype, weight_type, ROW_SCALES)))
        if dtype == "bf16" and SCALED_MM in fp8.params["several_rows"]:
            config = quantize_rows_launch_config(tokens, m.hidden_size)
            rows.append(row("fp8_linear", f"_quantize_rows_kernel ({fp8_name}, then _scaled_mm)",
                            f"[{tokens}, {m.hidden_size}]", config, aot.quantize_rows_build(config, dtype, weight_type)))
    else:  # no FP8 on this chip (or fp32 activations): dequantized, then the vendor's GEMM
        rows.append(row("fp8_linear", "-", "not used: more than one row" if tokens != 1 else "-", {}, None))
    return rows


def _prefetch_rows(target: Target, m, dtype: str, tokens: int, budgets: dict, row) -> list[TableRow]:
    """table_rows' l2_prefetch rows: the fused add + RMSNorm before q/k/v and the rotary kernel
    before o_proj, each launched with programs appended for the table's prefetch budget."""
    from paiton.backends import aot

    element_bytes = 4 if dtype == "fp32" else 2
    q_width = m.num_attention_heads * m.head_dim
    qkv_bytes = (q_width + 2 * m.num_key_value_heads * m.head_dim) * m.hidden_size * element_bytes
    norm_config = launch_config("fused_add_rms_norm", target, n_rows=tokens, n_cols=m.hidden_size)
    rotary_config = launch_config("qk_norm_rope_cache", target, n_q_heads=m.num_attention_heads,
                                  n_k_heads=m.num_key_value_heads, head_dim=m.head_dim)
    rows = []
    for op, config, nbytes, name in (
            ("fused_add_rms_norm", norm_config, qkv_bytes, "q/k/v"),
            ("qk_norm_rope_cache", rotary_config, m.hidden_size * q_width * element_bytes, "o_proj")):
        asked, programs, chunks = prefetch_plan(nbytes, budgets[op], budgets["programs"], budgets["chunk_bytes"])
        config = aot.prefetching(config, chunks, budgets["chunk_bytes"])
        if op == "fused_add_rms_norm":
            kernel, build = "_rms_norm_kernel", aot.rms_norm_build(config, dtype, True)
        else:
            kernel, build = "_qk_norm_rope_kernel", aot.qk_norm_rope_build(config, dtype, True)
        rows.append(row("l2_prefetch", f"{kernel} (prefetching)",
                        f"{asked / 2**20:.0f} of {nbytes / 2**20:.0f} MB of {name}'s weight over {programs} "
                        "appended programs", config, build))
    return rows


# Triton's names of the FP8 formats (the pointer types of an FP8 weight).
TRITON_FP8_TYPES = {"e4m3fn": "fp8e4nv", "e4m3fnuz": "fp8e4b8"}


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def compile_rows(rows: list[TableRow], target: Target) -> None:
    from paiton.backends import aot

    for r in rows:
        if r.build is None:
            continue
        try:
            r.compiled = aot.resources(r.build.compile(target), target)
        except Exception as error:  # shown in the table; the command exits with 1
            r.error = f"{type(error).__name__}: {error}".splitlines()[0][:120]


def format_table(rows: list[TableRow], target: Target, header: str) -> str:
    def registers(r):
        if r.error:
            return "compile failed"
        if r.compiled is None:
            return "-"
        if target.vendor == "hip":
            return f"{r.compiled['registers']} v, {r.compiled['sgprs']} s"
        return str(r.compiled["registers"]) if r.compiled["registers"] is not None else "?"

    def spills(r):
        return "-" if r.compiled is None else str(r.compiled["spills"])

    def shared(r):
        return "-" if r.compiled is None else f"{r.compiled['shared_bytes'] / 1024:.1f} KB"

    cells = [("op", "implementation", "kernel", "shape", "registers", "spills", "shared", "configuration")]
    for r in rows:
        config = " ".join(f"{k}={v}" for k, v in r.config.items()) or "-"
        cells.append((r.op, r.implementation, r.kernel, r.shape, registers(r), spills(r), shared(r), config))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = [header, ""]
    for index, c in enumerate(cells):
        lines.append("  ".join(value.ljust(width) for value, width in zip(c, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("")
    table = lowering_table(target)
    lines += [f"{op}: {table[op].why}" for op in FUSED_OPS if table[op].why]
    lines += [f"compile error, {r.kernel}: {r.error}" for r in rows if r.error]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import subprocess
    import sys

    from paiton.models.qwen3 import QWEN3_PRESETS

    parser = argparse.ArgumentParser(
        prog="python -m paiton.backends.lowering",
        description="Print a chip's lowering table: for each fused op its implementation, each kernel's launch "
        "configuration at a Qwen3 model's decode shapes, and (compiled ahead of time, no GPU needed) its registers, "
        "spills and shared memory.",
    )
    parser.add_argument("--target", choices=sorted(TABLES), help="the chip (default: this machine's GPU, else cpu)")
    parser.add_argument("--model", choices=sorted(p for p in QWEN3_PRESETS if p != "tiny"), default="qwen3-8b")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--tokens", type=int, default=1, help="sequences in the decode step, one token each (default 1)")
    parser.add_argument("--cache-len", type=int, default=4096, help="KV cache length (default 4096)")
    parser.add_argument("--no-compile", action="store_true", help="print the configurations only")
    args = parser.parse_args(argv)

    target = target_named(args.target) if args.target else detect_target()
    compile_kernels = target.is_gpu and not args.no_compile
    if compile_kernels and os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels imported under Triton's interpreter cannot be compiled: the same command, without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "paiton.backends.lowering", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env=env).returncode

    rows = table_rows(target, args.model, args.dtype, args.tokens, args.cache_len)
    if compile_kernels:
        compile_rows(rows, target)
    import triton

    if target.is_gpu:
        memory = "LDS per workgroup" if target.vendor == "hip" else "shared memory per block"
        chip = (f"{target.vendor}, warp {target.warp_size}, {target.multiprocessors} multiprocessors, "
                f"{target.shared_memory_per_block // 1024} KB {memory}")
    else:
        chip = "each op's reference code; with TRITON_INTERPRET=1 its Triton kernel in the interpreter, launched as shown"
    header = (
        f"Paiton lowering for {target.arch} ({target.name or target.vendor}): {chip}\n"
        f"{args.model} decode step, {args.dtype}, {args.tokens} sequence(s), KV cache {args.cache_len}; "
        + (f"registers, spills, shared memory from an ahead-of-time compile (Triton {triton.__version__})"
           if compile_kernels else "not compiled")
    )
    print(format_table(rows, target, header))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())

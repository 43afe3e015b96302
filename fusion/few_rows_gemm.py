"""A few rows times a weight: y = x @ W.T for 2 to 64 rows (a decode step at batch 2-64), as one
Triton kernel that reads W once; W in x's dtype, or FP8 with its scales (dequantized in registers).

Why: at a handful of rows a product is still a read of its weight, so its time is W's bytes over
the memory's bandwidth, as at one row (fusion/gemv.py). At batch 2-32, Qwen3-32B's decode step
on an H200 ran about 2-3 ms over its 15.4 ms weight floor with cuBLAS doing these products,
where batch 1's GEMV step is 0.5 ms over (bench/results/NOTES.md, 2026-12-03). For FP8 weights
the alternative is worse still: dequantizing W to bf16 first (a full write and re-read) and the
vendor's GEMM read three times the FP8 weight's bytes.

The kernel: program (n, m) takes BLOCK_N rows of W in [BLOCK_N, BLOCK_K] tiles along K
(`evict_first`: streamed once), converts them to x's dtype in registers (exact for FP8: every
e4m3 value is a bf16/fp16 value) and multiplies them with BLOCK_M rows of x (BLOCK_M >= the
rows, so the grid spans N only and W is read once) on the chip's matrix instructions,
accumulating in fp32. Scales of an FP8 W: per output row they multiply the fp32 sums at the
end; per 128 x 128 block, each 128-wide K tile's partial product as it is added (BLOCK_K =
128: one scale block per tile). The output is rounded to x's dtype once.

Which launch runs a bf16/fp16 product (BLOCK_N, BLOCK_K, warps, stages), or the vendor's GEMM,
is decided per (weight shape, rows rounded up to a power of two, dtype, device) the first time
it runs (`choose`): every candidate of the lowering table's list (`few_rows_linear`) and torch's
linear timed as a decode step runs them (fusion/timing.py: back to back, weights from memory),
the fastest kept; a candidate whose product differs from torch's by more than bf16 rounding is
dropped, so a kernel that is wrong on some chip is never chosen. FP8 weights go through
fusion/fp8_paths.py's choice of products, this kernel being one (FP8_GEMM).

SwiGLU, where a decode step's MLP has it: applied as down_proj's x loads (GATED, or silu_mul's
kernel first: SILU_FIRST), or in the gate/up product's last step (SWIGLU_OUT, or silu_mul's
kernel after the plain launch: SILU_AFTER); each a choice of its own per shape and rows, both
forms of every launch timed (`choose`'s `up` and `swiglu_out`).

Under Triton's interpreter (CPU tests) a bf16 `tl.dot` is wrong (ENV_NOTES: bf16 held as
uint16): DOT_FP32 makes the products in fp32 there, as decode attention's kernel does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from paiton.fusion import split_k
from paiton.fusion.gemv import BLOCK_SCALES, FP8_DTYPES, SCALE_BLOCK, VENDOR, gated_forms, run_silu_first, scales_kind
from paiton.fusion.pdl import pdl_launch, prefetch_rows_to_l2, wait_for_previous_kernel
from paiton.fusion.swiglu import silu_mul, silu_times_up
from paiton.fusion.timing import TIMING_ROUNDS, best_times, bucket_probe, cold_copies, rows_bucket, time_ms, timed_choices
from paiton.fusion.triton_utils import as_rows, device_guard, is_interpreted

log = logging.getLogger(__name__)

MAX_ROWS = 64  # above this, the vendor's GEMM (the product turns compute-bound: prefill)

# W_VIA_FP16 (a launch key, for FP8 weights): W converted to x's dtype through fp16 and fp32,
# e4m3 -> fp16 two elements an instruction (F2FP), fp16 -> fp32 on the FMA pipe (HADD2), fp32
# -> bf16 two elements an instruction (F2FP), all exact. Triton's own e4m3 -> bf16 takes an F2F
# per element (sm_90 SASS: 64 F2F per 64 elements of a 64 x 128 tile), an instruction of the
# conversion unit, which (by our reading of NVIDIA's throughput tables, not measured here) issues
# about 16 a clock per multiprocessor: about the rate at which an H200 streams FP8 bytes into a
# multiprocessor (at 18612d0-a593e91 the product ran at 1.6-2.2x the FP8 floor there). Measured
# since (H100, a88eea9): through fp16 was faster in 38 of 40 shape pairs, up to 1.4x.

# SWAP_AB (a launch key): the product computed as W @ x.T, W's BLOCK_N rows on the M side of
# the matrix instruction and x's rows on its N side, the result transposed once after the loop.
# Hopper's wgmma takes 64 rows a warpgroup on the M side, so x's 16-32 rows there (the plain
# orientation) compile to the older mma.sync through ldmatrix; swapped, a tile of 64 or 128 W
# rows compiles to wgmma.mma_async m64nBLOCK_Mk16 (sm_90 PTX read here), reading a bf16 W straight
# from shared memory, and an FP8 W, converted in registers, as its register operand. Timed on an
# H100 at 52e4217: chosen for every FP8 shape at 32 rows (32B: down 90.7 -> 68.2 us, q/k/v 37.0 ->
# 32.8) and most bf16 ones at 8 and 32 (1-8%); at 8 rows FP8 the plain launches stay faster.

# W_TMA (a launch key, sm_90 on): W's [BLOCK_N, BLOCK_K] tiles arrive through a tensor descriptor
# (`triton.tools.tensor_descriptor.TensorDescriptor`), which Triton compiles on Hopper to the
# tensor memory accelerator's bulk copies (cp.async.bulk.tensor: one instruction a tile, the
# copy engine zero-filling past N and K) instead of every thread's own 16-byte loads. Timed on an
# H100 (bench/few_rows_sweep.py, Qwen3-32B's weights, the table's best launch without -> with
# them, 08efc50): at 32 rows FP8 W, q/k/v 32.6 -> 28.6 us, o_proj 25.4 -> 23.7, gate/up 111.2 ->
# 105.3, down 67.3 -> 56.4 (a decode step at batch 32: 17.73 -> 16.14 ms, one process); bf16 at
# 32 rows 1-2% (the step 24.62 -> 24.36 ms); at 8 rows about 1%. A weight a descriptor cannot
# describe (its base or row stride not 16-byte aligned) is read by the threads' loads, the same
# product.


@triton.jit
def _times_transposed(a, b, DOT_FP32: tl.constexpr):
    """a @ b.T on the matrix instructions, or in IEEE fp32 (DOT_FP32: the interpreter's)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    return tl.dot(a, tl.trans(b))


@triton.jit
def _tile_product(w, x, block, SCALES: tl.constexpr, SWAP_AB: tl.constexpr, W_VIA_FP16: tl.constexpr,
                  DOT_FP32: tl.constexpr):
    """One K step of the product: the W tile converted to x's dtype (exact: e4m3 values are bf16
    and fp16 values; W_VIA_FP16: through fp16, see W_VIA_FP16 above) times x's tile, [BLOCK_N,
    BLOCK_M] with W's rows on the product's M side (SWAP_AB above), else [BLOCK_M, BLOCK_N]; with
    block scales (SCALES == 2), times the tile's rows' `block` scales."""
    if W_VIA_FP16:
        w = w.to(tl.float16).to(tl.float32).to(x.dtype)
    else:
        w = w.to(x.dtype)
    if SWAP_AB:
        part = _times_transposed(w, x, DOT_FP32)
        if SCALES == 2:
            part *= block[:, None]
    else:
        part = _times_transposed(x, w, DOT_FP32)
        if SCALES == 2:
            part *= block[None, :]
    return part


# M is not specialized on (Triton would compile apart for 1, and for multiples of 16): a decode
# step's 2, 4, 8 and 16 rows share one compiled kernel per BLOCK_M, so the first use's timing
# compiles each candidate once per BLOCK_M rather than per row count.
@triton.jit(do_not_specialize=["M"])
def _few_rows_gemm_kernel(x_ptr, w_ptr, w_desc, scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, stride_sn,
                          K_SLICE, partial_ptr, count_ptr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALES: tl.constexpr,
                          SCALE_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, SPLITS: tl.constexpr,
                          W_VIA_FP16: tl.constexpr = False, PDL: tl.constexpr = False,
                          SWAP_AB: tl.constexpr = False, W_TMA: tl.constexpr = False,
                          up_ptr=None, stride_um=0, GATED: tl.constexpr = False, SWIGLU_OUT: tl.constexpr = False):
    """Program (n, m, s): y[m rows, n rows of W] over K slice s (all of K when SPLITS is 1); see
    the module docstring. Split (SPLITS > 1): each slice's fp32 sums go to partial_ptr
    [SPLITS, M, N]; the tile's last program to arrive (count_ptr: one counter a tile, left at 0)
    adds the slices in slice order, so the result does not depend on which program is last.
    PDL (fusion/pdl.py): the slice's first two W tiles (4-16 KB each) are prefetched into L2
    while the kernel before this one finishes; x is read (and the counters touched) after it has.
    W_TMA: W's tiles come through `w_desc`, a [BLOCK_N, BLOCK_K] tensor descriptor of W (see
    W_TMA above); else (w_desc None) by every thread's own loads from w_ptr.
    GATED: x is the gate and `up_ptr` the up half of a SwiGLU, applied as x loads (silu(gate) *
    up, rounded as paiton::silu_mul rounds it): down_proj without the silu_mul kernel before it.
    SWIGLU_OUT: W is gate/up packed, [gate; up] of N / 2 rows each (in x's dtype, or FP8 with
    the packed scales: the up rows' scales are those of W's rows N / 2 on), and y [M, N / 2] is
    silu(x @ gate.T) * (x @ up.T), each product rounded to y's dtype first, as this kernel's
    plain product and then paiton::silu_mul round them. Program n reads gate rows
    and up rows n * BLOCK_N + [0, BLOCK_N) (two W tiles a K step, two accumulators), so each
    pair meets in its registers and SwiGLU is computed once per output, after the sums: the
    gate/up product without the silu_mul kernel after it (GATED computes SwiGLU over its K
    slice in every program of the product after it instead)."""
    if SWIGLU_OUT:
        n_out = N // 2  # outputs; up row r is W's row n_out + r
    else:
        n_out = N
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_begin = tl.program_id(2) * K_SLICE
    if PDL:
        prefetch_rows_to_l2(w_ptr, rows_n, N, stride_wn, k_begin, K, 2 * BLOCK_K)
    wait_for_previous_kernel(PDL)
    k_end = tl.minimum(k_begin + K_SLICE, K)
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm
    if GATED:
        up_rows = up_ptr + rows_m.to(tl.int64)[:, None] * stride_um
    w_rows = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn
    if SWAP_AB:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU_OUT:
        up_w_rows = w_ptr + (rows_n + n_out).to(tl.int64)[:, None] * stride_wn
        if SWAP_AB:
            acc_t_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(k_begin, k_end, BLOCK_K):  # slices are whole BLOCK_K tiles: only K's end is ragged
        k = start + cols[None, :]
        x = tl.load(x_rows + k, mask=(rows_m[:, None] < M) & (k < K), other=0.0)
        if GATED:  # silu(0) * 0 = 0 where masked
            x = silu_times_up(x, tl.load(up_rows + k, mask=(rows_m[:, None] < M) & (k < K), other=0.0))
        if W_TMA:  # the tile in one bulk copy, zeros past N and K as the mask below gives
            w = w_desc.load([tl.program_id(0) * BLOCK_N, start])
        else:
            w = tl.load(w_rows + k, mask=(rows_n[:, None] < n_out) & (k < K), other=0.0, eviction_policy="evict_first")
        block, block_up = None, None
        if SCALES == 2:  # this K tile lies in one scale block (BLOCK_K divides SCALE_BLOCK)
            block = tl.load(scale_ptr + (rows_n // SCALE_BLOCK) * stride_sn + start // SCALE_BLOCK, mask=rows_n < N, other=0.0)
            if SWIGLU_OUT:  # the up rows' blocks
                block_up = tl.load(scale_ptr + ((rows_n + n_out) // SCALE_BLOCK) * stride_sn + start // SCALE_BLOCK,
                                   mask=rows_n < n_out, other=0.0)
        part = _tile_product(w, x, block, SCALES, SWAP_AB, W_VIA_FP16, DOT_FP32)
        if SWAP_AB:
            acc_t += part
        else:
            acc += part
        if SWIGLU_OUT:  # the up rows' tile (the tensor descriptor zero-fills past N)
            if W_TMA:
                w_up = w_desc.load([n_out + tl.program_id(0) * BLOCK_N, start])
            else:
                w_up = tl.load(up_w_rows + k, mask=(rows_n[:, None] < n_out) & (k < K), other=0.0,
                               eviction_policy="evict_first")
            part_up = _tile_product(w_up, x, block_up, SCALES, SWAP_AB, W_VIA_FP16, DOT_FP32)
            if SWAP_AB:
                acc_t_up += part_up
            else:
                acc_up += part_up
    if SWAP_AB:
        acc = tl.trans(acc_t)  # once, after the loop
        if SWIGLU_OUT:
            acc_up = tl.trans(acc_t_up)
    if not SWIGLU_OUT:
        acc_up = acc  # not read
    if SCALES == 1:
        acc *= tl.load(scale_ptr + rows_n, mask=rows_n < N, other=0.0)[None, :]
        if SWIGLU_OUT:  # the up rows' scales
            acc_up *= tl.load(scale_ptr + n_out + rows_n, mask=rows_n < n_out, other=0.0)[None, :]
    inside = (rows_m[:, None] < M) & (rows_n[None, :] < n_out)
    y = y_ptr + rows_m.to(tl.int64)[:, None] * stride_ym + rows_n[None, :]
    if SPLITS == 1:
        tl.store(y, _rounded_output(acc, acc_up, y_ptr.dtype.element_ty, SWIGLU_OUT), mask=inside)
    else:
        at = rows_m.to(tl.int64)[:, None] * N + rows_n[None, :]  # partials [SPLITS, M, N]: up sums at n_out on
        tl.store(partial_ptr + tl.program_id(2).to(tl.int64) * M * N + at, acc, mask=inside)
        if SWIGLU_OUT:
            tl.store(partial_ptr + tl.program_id(2).to(tl.int64) * M * N + at + n_out, acc_up, mask=inside)
        tl.debug_barrier()  # every thread's partial sums are written before the counter says so
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLITS - 1:  # the tile's last slice: add all slices (L2, not a stale L1 line)
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            total_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                slice_at = partial_ptr + (s * M).to(tl.int64) * N + at
                total += tl.load(slice_at, mask=inside, other=0.0, cache_modifier=".cg")
                if SWIGLU_OUT:
                    total_up += tl.load(slice_at + n_out, mask=inside, other=0.0, cache_modifier=".cg")
            tl.store(y, _rounded_output(total, total_up, y_ptr.dtype.element_ty, SWIGLU_OUT), mask=inside)
            tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next product


@triton.jit
def _rounded_output(acc, acc_up, dtype: tl.constexpr, SWIGLU_OUT: tl.constexpr):
    """The fp32 sums as y's elements: rounded once; SWIGLU_OUT: the gate and up sums each rounded
    (the plain product's output), then SwiGLU as paiton::silu_mul computes it."""
    if SWIGLU_OUT:
        return silu_times_up(acc.to(dtype), acc_up.to(dtype))
    return acc.to(dtype)


def block_m(rows: int) -> int:
    """BLOCK_M for `rows` rows of x: the next power of two from 16 (tl.dot's smallest) up to 64."""
    return min(max(16, triton.next_power_of_2(rows)), MAX_ROWS)


def few_rows_config(rows: int) -> dict[str, int]:
    """The untimed launch for `rows` rows (FP8 weights; block scales need BLOCK_K = 128): 64-row
    W tiles 128 wide (one scale block), 4 warps, 3 stages."""
    return dict(BLOCK_M=block_m(rows), BLOCK_N=64, BLOCK_K=SCALE_BLOCK, num_warps=4, num_stages=3)


def candidate(block_n: int, block_k: int, num_warps: int, num_stages: int, splits: int = 1,
              via_fp16: bool = False, swap_ab: bool = False, tma: bool = False) -> dict[str, int]:
    """A launch; `splits` > 1 cuts K into that many slices of whole BLOCK_K tiles, a program each;
    `via_fp16`: an FP8 weight converted through fp16 (W_VIA_FP16; a weight in x's dtype ignores it);
    `swap_ab`: W's rows on the product's M side (SWAP_AB); `tma`: W's tiles by tensor descriptor
    (W_TMA; sm_90 and later)."""
    config = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        config["SPLITS"] = splits
    if via_fp16:
        config["W_VIA_FP16"] = True
    if swap_ab:
        config["SWAP_AB"] = True
    if tma:
        config["W_TMA"] = True
    return config


# The launches a CUDA GPU times per shape and row count (the lowering table's `few_rows_linear`
# list; BLOCK_M follows the rows). Each W tile is 4-32 KB, every thread loading 16 bytes at a
# time; BLOCK_N of 16-32 gives the narrowest weights (o_proj and down_proj, N = 5120 at 32B) 160
# to 320 programs, more than the H200's 132 multiprocessors, where 64-row tiles give them 80;
# 3-5 stages keep 32-96 KB of W in flight per program. The widest x tiles (64 rows x 512) need
# more shared memory than a Hopper has at 4 stages: such a launch is not tried (`fitting`).
# Split along K (2-8 slices): the narrow weights' tiles stream K serially over too few programs
# (Qwen3-32B's o_proj and q/k/v ran at 66-80% of the H200's bandwidth with 160-320 programs,
# through this kernel and cuBLAS alike: bench/results/NOTES.md, 2026-12-03, tenth session);
# 4 slices give o_proj 640 programs of 2048-wide K.
# SWAP_AB (64 or 128 rows of W a program): at a88eea9 on an H100 the products of 8 and 32 rows
# ran Qwen3-32B's layers 10% slower than batch 1's GEMV (346 against 315 us a layer at 32 rows,
# bf16), on mma.sync; with W's rows as the product's M side they compile to wgmma (sm_90 SASS
# read here; chosen by the timing at 52e4217 for most shapes at 8 and 32 rows: SWAP_AB above).
FEW_ROWS_CANDIDATES: tuple[dict[str, int], ...] = (
    candidate(16, 256, 4, 4),
    candidate(16, 512, 4, 3),
    candidate(32, 256, 4, 4),
    candidate(32, 128, 4, 5),
    candidate(64, 128, 4, 4),
    candidate(64, 256, 8, 3),
    candidate(32, 128, 4, 4, splits=2),
    candidate(32, 128, 4, 4, splits=4),
    candidate(32, 128, 4, 4, splits=8),
    candidate(64, 128, 4, 4, splits=4),
    candidate(64, 128, 4, 4, swap_ab=True),
    candidate(64, 256, 4, 3, swap_ab=True),
    candidate(128, 128, 4, 4, swap_ab=True),
    candidate(64, 128, 4, 4, splits=4, swap_ab=True),
)

# FP8 weights (fusion/fp8_paths.py's FP8_GEMM, one byte an element): the untimed launch first
# (few_rows_config's tile, the baseline: FP8 weights have no vendor GEMM of their own), then W
# tiles of 8-16 KB, as the bf16 list's in bytes. At 18612d0 the untimed launch alone gave
# Qwen3-32B's o_proj (N = 5120) 80 programs and ran it at a quarter of the FP8 copy rate, its
# q/k/v at a third (H200, fp8_gemm_sweep). Block scales take the launches whose BLOCK_K divides
# their 128-wide blocks. W_VIA_FP16: timed at a88eea9 on an H100 beside the same tiles without
# it, it was faster in 38 of 40 pairs (Qwen3-8B/32B, 8 and 32 rows; up to 1.4x), slower by at
# most 7% in two; the launches that never won are gone. The untimed launch stays without it
# (at 64 rows it spills 6 registers on gfx942, where nothing is timed yet). SWAP_AB as in the bf16
# list: on sm_90 W, converted in registers, is wgmma's register operand (the timing's choice at
# 32 rows on an H100, 52e4217).
FP8_FEW_ROWS_CANDIDATES: tuple[dict[str, int], ...] = (
    candidate(64, SCALE_BLOCK, 4, 3),
    candidate(64, SCALE_BLOCK, 4, 3, via_fp16=True),
    candidate(32, 256, 4, 4, via_fp16=True),
    candidate(64, 256, 4, 3, via_fp16=True),
    candidate(32, 128, 4, 5, via_fp16=True),
    candidate(32, 256, 4, 4, splits=4, via_fp16=True),
    candidate(32, 128, 4, 5, splits=4),
    candidate(32, 128, 4, 5, splits=4, via_fp16=True),
    candidate(64, SCALE_BLOCK, 4, 3, via_fp16=True, swap_ab=True),
    candidate(128, SCALE_BLOCK, 4, 3, via_fp16=True, swap_ab=True),
    candidate(64, SCALE_BLOCK, 4, 4, splits=4, via_fp16=True, swap_ab=True),
)

# PAITON_W_TMA=0 leaves the W_TMA launches out of the timing (an A/B of one process: the choices
# made without them are kept apart from those made with them).
W_TMA_ENV = "PAITON_W_TMA"


def w_tma_allowed() -> bool:
    return os.environ.get(W_TMA_ENV, "1") != "0"


# Launches with W_TMA, for chips with the tensor memory accelerator (the lowering tables of sm_90
# and later add them to the lists above): the fastest tiles of a prototype at 32 rows on an H100
# (b065e57), and the same tiles split along K for the narrow, long weights, where split launches win;
# in 4 slices too: at 32 rows on an H200 (4613cae) o_proj's choice, 2 slices (160 programs over
# 132 multiprocessors), read its weight at 74% of the copy rate; 4 slices give it 320 programs.
FEW_ROWS_TMA_CANDIDATES: tuple[dict[str, int], ...] = (
    candidate(64, 128, 4, 4, swap_ab=True, tma=True),
    candidate(64, 128, 4, 4, splits=2, swap_ab=True, tma=True),
    candidate(64, 128, 4, 4, splits=4, swap_ab=True, tma=True),
)
FP8_FEW_ROWS_TMA_CANDIDATES: tuple[dict[str, int], ...] = (
    candidate(64, SCALE_BLOCK, 4, 4, via_fp16=True, swap_ab=True, tma=True),
    candidate(128, 64, 4, 4, via_fp16=True, swap_ab=True, tma=True),
    candidate(64, SCALE_BLOCK, 4, 4, splits=4, via_fp16=True, swap_ab=True, tma=True),
)


# SILU_AFTER (a launch key of a gate/up product made with `swiglu_out`): the launch plain, then
# paiton.silu_mul's kernel on its two halves (the form before SWIGLU_OUT), timed beside it.
SILU_AFTER = "SILU_AFTER"


def swiglu_out_forms(candidates: Sequence[dict]) -> list[dict]:
    """A gate/up product's candidates for timing: each launch with SwiGLU in its last step
    (SWIGLU_OUT: as given) and plain followed by silu_mul's kernel (SILU_AFTER). Why both: the
    fused launch reads two W tiles a K step into two accumulators (twice the shared memory and
    registers of its plain form), so on some card and row count its loop may lose more than
    silu_mul's launch costs (about 2.5 us a layer at Qwen3-32B's batch 32 on an H100: 162 us a
    step, bench/results/NOTES.md, thirty-first session)."""
    return [*candidates, *({**config, SILU_AFTER: True} for config in candidates)]


# Under Triton's CPU interpreter (the CPU tests) each program runs in turn in Python: few wide
# programs are what is fast there.
INTERPRETER_CANDIDATE = candidate(64, 128, 4, 1)


def shared_bytes(config: dict[str, int], rows: int, element_size: int, swiglu_out: bool = False) -> int:
    """At most the shared memory a launch of `config` for `rows` rows takes: Triton's pipeline
    keeps up to num_stages buffers of the x and W tiles (compiled by Triton 3.9 at 64 rows: on
    sm_90, 3 stages of 64 + 16 rows x 512 bf16 took 3 x 80 KB; on sm_80, 4 stages of 64 + 16 x 256
    fp32 took 3 x 80 KB), plus the fp32 result's layout conversion; a SWIGLU_OUT launch (with
    `swiglu_out`, not SILU_AFTER) has two W tiles a stage and two results."""
    bm = block_m(rows)
    w_tiles = 2 if swiglu_out and not config.get(SILU_AFTER) else 1
    tiles = (bm + w_tiles * config["BLOCK_N"]) * config["BLOCK_K"] * element_size
    return tiles * config["num_stages"] + w_tiles * bm * config["BLOCK_N"] * 4


def fitting(candidates: Sequence[dict[str, int]], rows: int, element_size: int, limit: int,
            swiglu_out: bool = False) -> list[dict[str, int]]:
    """The candidates whose launch for `rows` rows fits `limit` bytes of shared memory (the x
    tiles grow with the rows: the widest need more than a chip has at 64 rows in fp32)."""
    return [config for config in candidates if shared_bytes(config, rows, element_size, swiglu_out) <= limit]


def tma_descriptor(weight: torch.Tensor, block_n: int, block_k: int):
    """A [block_n, block_k] tensor descriptor of `weight` [N, K] for a W_TMA launch, or None
    where the copy engine cannot read it (base or row stride not a multiple of 16 bytes) or the
    weight is smaller than one tile (a copy box wider than the tensor is not relied on): that
    launch then reads W with the threads' loads."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    size = weight.element_size()
    if weight.data_ptr() % 16 or (weight.stride(0) * size) % 16 or weight.stride(1) != 1:
        return None
    if weight.shape[0] < block_n or weight.shape[1] < block_k:
        return None
    return TensorDescriptor.from_tensor(weight, [block_n, block_k])


def few_rows_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
                  config: dict | None = None, up: torch.Tensor | None = None, swiglu_out: bool = False) -> torch.Tensor:
    """x [..., K] (any number of rows; BLOCK_M rows per program) @ dequantize(weight, scales).T
    in x's dtype; with `up` (x's shape): silu_mul(x, up) @ ... (GATED; or with the launch key
    SILU_FIRST, paiton.silu_mul's kernel and then the launch plain). `swiglu_out` (a gate/up
    packed W, [gate; up] of N / 2 rows each): silu_mul(x @ gate.T, x @ up.T), [...,
    N / 2] (SWIGLU_OUT; or with the launch key SILU_AFTER, the launch plain and then
    paiton.silu_mul's kernel on its halves; an FP8 W's scales are the packed gate/up's).
    `config`: launch keywords (default few_rows_config)."""
    if config is not None and config.get(SILU_AFTER):
        if not swiglu_out:
            raise ValueError(f"paiton few_rows_gemm: {SILU_AFTER} is a launch of a gate/up product (swiglu_out); got {config}")
        product = few_rows_gemm(x, weight, scales, {key: value for key, value in config.items() if key != SILU_AFTER}, up)
        return silu_mul(*product.chunk(2, dim=-1))
    if config is not None:
        config, x, up = run_silu_first(config, x, up)
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"paiton few_rows_gemm: x [..., K] and W [N, K] with unit stride along K; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)} strides {weight.stride()}")
    if swiglu_out and (n % 2 or up is not None):
        raise ValueError(f"paiton few_rows_gemm: swiglu_out takes a gate/up packed W of an even row count and no "
                         f"gate; got W {tuple(weight.shape)} {weight.dtype}")
    kind = scales_kind(weight, scales)
    rows = as_rows(x)
    m = rows.shape[0]
    if up is not None:
        if up.shape != x.shape or up.dtype != x.dtype:
            raise ValueError(f"paiton few_rows_gemm: gate and up of one shape and dtype; got {tuple(x.shape)} {x.dtype}, "
                             f"{tuple(up.shape)} {up.dtype}")
        up = as_rows(up)
    n_out = n // 2 if swiglu_out else n
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m and n:
        launch = dict(config or few_rows_config(m))
        block_m, block_n, block_k = launch["BLOCK_M"], launch["BLOCK_N"], launch["BLOCK_K"]
        grid_n, grid_m = triton.cdiv(n_out, block_n), triton.cdiv(m, block_m)
        k_slice, splits = split_k.k_slices(k, block_k, launch.pop("SPLITS", 1))
        via_fp16 = launch.pop("W_VIA_FP16", False) and weight.dtype in FP8_DTYPES
        w_desc = tma_descriptor(weight, block_n, block_k) if launch.pop("W_TMA", False) else None
        counters = split_k.tile_counters(x.device, grid_n * grid_m) if splits > 1 else None
        if counters is None:  # no counters to be had (first use inside a CUDA graph capture): unsplit
            k_slice, splits = k, 1
        partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else None
        with device_guard(x):
            _few_rows_gemm_kernel[(grid_n, grid_m, splits)](
                rows, weight, w_desc, scales, y, m, n, k, rows.stride(0), weight.stride(0), y.stride(0),
                scales.stride(0) if kind == BLOCK_SCALES else 0, k_slice, partial, counters, SCALES=kind,
                SCALE_BLOCK=SCALE_BLOCK, DOT_FP32=is_interpreted(_few_rows_gemm_kernel) or x.dtype == torch.float32,
                SPLITS=splits, W_VIA_FP16=via_fp16, W_TMA=w_desc is not None,
                up_ptr=up, stride_um=0 if up is None else up.stride(0), GATED=up is not None, SWIGLU_OUT=swiglu_out,
                **launch, **(pdl_launch(x, _few_rows_gemm_kernel) if k else {}))  # (an empty W: nothing to prefetch)
    return y.reshape(*x.shape[:-1], n_out)


def launch_candidate(x: torch.Tensor, weight: torch.Tensor, config: dict[str, int],
                     scales: torch.Tensor | None = None, up: torch.Tensor | None = None,
                     swiglu_out: bool = False) -> torch.Tensor:
    """x @ weight.T (W in x's dtype, or FP8 with its `scales`; silu_mul(x, up) @ weight.T with
    `up`; silu_mul of the gate and up halves with `swiglu_out`) with `config`'s launch (a
    candidate: BLOCK_M from x's rows)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return few_rows_gemm(x, weight, scales, {"BLOCK_M": block_m(rows), **config}, up=up, swiglu_out=swiglu_out)


# Bound on |product - torch's product| / max |torch's product| for a candidate to be kept: both
# accumulate in fp32 and round once to bf16 (2**-8 relative), in different orders.
AGREEMENT = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


class ChoiceKey(NamedTuple):
    """What `choose` keeps a choice under: the product's device, x's rows bucket, W's shape, row
    stride and x's dtype; an FP8 weight's dtype and scales kind; whether the W_TMA launches were
    timed (PAITON_W_TMA); whether SwiGLU is applied as x loads (gated) or to the gate/up
    product's halves (swiglu_out)."""

    device: str
    rows: int
    n: int
    k: int
    row_stride: int
    dtype: torch.dtype
    weight_dtype: torch.dtype | None
    scales_kind: int | None  # gemv.scales_kind's SCALES
    w_tma: bool
    gated: bool
    swiglu_out: bool = False


# ChoiceKey -> the chosen launch (a candidate's dict) or VENDOR, and how it was chosen (the times
# seen, candidates dropped for disagreeing).
_CHOICES: dict[ChoiceKey, dict[str, int] | str] = {}
_TIMINGS: dict[ChoiceKey, dict] = {}


def choose(x: torch.Tensor, weight: torch.Tensor, candidates: Sequence[dict[str, int]],
           time_ms_fn: Callable[[Callable[[], object]], float] | None = None,
           scales: torch.Tensor | None = None, up: torch.Tensor | None = None,
           swiglu_out: bool = False) -> dict[str, int] | str:
    """The fastest of `candidates` and torch's linear (VENDOR) for x's rows (rounded up to a
    power of two) times this weight, decided once per (device, rows bucket, shape, stride, dtype)
    and kept: TIMING_ROUNDS rounds of each in turn over cold copies of W, the vendor first (a tie
    keeps it). A candidate whose product disagrees with torch's (AGREEMENT) is not timed. Not
    timed: more than MAX_ROWS rows, no candidates, a CPU without `time_ms_fn` (VENDOR, kept), or
    a CUDA graph being captured (VENDOR, not kept: a later call decides).

    An FP8 weight (with its `scales`) has no vendor GEMM: the candidates alone (the first, the
    untimed launch, is the baseline that captures, CPUs and ties get), checked against torch's
    product of the dequantized weight; block scales keep the launches whose BLOCK_K divides
    their blocks.

    With `up` (x the gate): the product of silu_mul(x, up), a choice of its own per shape and
    rows between paiton::silu_mul then torch's linear (VENDOR) and each launch in two forms:
    applying SwiGLU as it loads x (GATED), and after silu_mul's kernel, plain (SILU_FIRST, as
    the one-row GEMV times them: `gemv.gated_forms`). Why both: the gated launch recomputes SwiGLU over its
    K slice in every program (80-320 at Qwen3-32B's down_proj), and on an H100 every gated
    launch lost to silu_mul + cuBLAS there at 32 rows (168-370 us against 99.6; a5ebfb9), while
    the plain launch after silu_mul had beaten cuBLAS by 7-9 us at 2-8 rows on an H200 (4613cae,
    before the gated form existed). Without SILU_FIRST such a choice fell back to cuBLAS.

    With `swiglu_out` (W gate/up packed): the product's two halves through SwiGLU, a choice of
    its own between torch's linear then paiton::silu_mul (VENDOR; not for an FP8 W) and each
    launch in two forms: SwiGLU in its last step (SWIGLU_OUT) and plain, then silu_mul's kernel
    (SILU_AFTER: `swiglu_out_forms`)."""
    fp8 = scales is not None
    kind = scales_kind(weight, scales)
    rows = as_rows(x)
    bucket = rows_bucket(rows.shape[0])
    if kind == BLOCK_SCALES:
        candidates = [config for config in candidates if SCALE_BLOCK % config["BLOCK_K"] == 0]
    tma_allowed = w_tma_allowed()
    if not tma_allowed:
        candidates = [config for config in candidates if not config.get("W_TMA")]
    if up is not None:
        candidates = gated_forms(candidates)
    if swiglu_out:
        candidates = swiglu_out_forms(candidates)
    if bucket > MAX_ROWS or not candidates or rows.shape[0] == 0:
        return VENDOR
    baseline = candidates[0] if fp8 else VENDOR
    key = ChoiceKey(str(x.device), bucket, weight.shape[0], weight.shape[1], weight.stride(0), x.dtype,
                    weight.dtype if fp8 else None, kind if fp8 else None, tma_allowed, up is not None, swiglu_out)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if time_ms_fn is None and not x.is_cuda:
        _CHOICES[key], _TIMINGS[key] = baseline, {"source": "fallback"}
        return baseline
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return baseline
    if time_ms_fn is None and not timed_choices():  # untimed, kept: PAITON_TIMED_CHOICES=0
        _CHOICES[key], _TIMINGS[key] = baseline, {"source": "untimed"}
        return baseline
    if x.is_cuda:  # the launches this chip's shared memory takes at this many rows
        from paiton.backends.target import detect_target

        candidates = fitting(candidates, bucket, x.element_size(), detect_target(x.device).shared_memory_per_block,
                             swiglu_out)
    probe = bucket_probe(rows)
    up_probe = None if up is None else bucket_probe(as_rows(up))
    reference_weight = weight
    if fp8:
        from paiton.fusion.fp8_paths import dequantize  # (fp8_paths imports this module)

        reference_weight = dequantize(weight, scales, x.dtype)
    if up is not None:  # (FP8 weights take no gate: fusion/fp8_linear.py's own products)
        expected = torch.nn.functional.linear(silu_mul(probe, up_probe), weight).float()
    elif swiglu_out:
        expected = vendor_swiglu_out(probe, reference_weight).float()
    else:
        expected = torch.nn.functional.linear(probe, reference_weight).float()
    bound = AGREEMENT.get(x.dtype, 2e-2) * max(expected.abs().max().item(), 1e-30)
    agreeing, dropped = [], []
    for config in candidates:
        try:
            error = (launch_candidate(probe, weight, config, scales, up_probe, swiglu_out).float()
                     - expected).abs().max().item()
        except Exception as failure:  # a launch this chip cannot make (shared memory): not a candidate
            log.debug("paiton few_rows_gemm: %s failed: %s", config, failure)
            continue
        (agreeing if error <= bound else dropped).append(config)
    what = (f"{bucket} rows x [{key.n} x {key.k}] {x.dtype}" + (f", {weight.dtype} weight" if fp8 else "")
            + (", gated" if up is not None else "") + (", SwiGLU out" if swiglu_out else ""))
    if dropped:
        log.warning("paiton few_rows_gemm: %s on %s: launches %s disagree with torch's product; left out", what,
                    x.device, dropped)
    if fp8 and not agreeing:  # nothing to time: the untimed launch, as under a capture
        _CHOICES[key], _TIMINGS[key] = baseline, {"source": "fallback", "disagreeing": dropped}
        return baseline
    weights = cold_copies(weight)
    if up is not None:  # the vendor's product after silu_mul's kernel
        runs = [(VENDOR, lambda: [torch.nn.functional.linear(silu_mul(probe, up_probe), w) for w in weights])]
    elif swiglu_out and not fp8:  # the vendor's product, then silu_mul's kernel
        runs = [(VENDOR, lambda: [vendor_swiglu_out(probe, w) for w in weights])]
    else:
        runs = [] if fp8 else [(VENDOR, lambda: [torch.nn.functional.linear(probe, w) for w in weights])]
    runs += [(config, lambda config=config: [launch_candidate(probe, w, config, scales, up_probe, swiglu_out)
                                             for w in weights])
             for config in agreeing]
    with device_guard(x):
        timed = best_times(runs, TIMING_ROUNDS, time_ms_fn or time_ms, required=runs[0][0],
                           what=f"paiton few_rows_gemm on {x.device}")
    choice, best_ms = min(timed, key=lambda timing: timing[1])  # the baseline first: a tie keeps it
    chosen_us, baseline_us = (ms / len(weights) * 1e3 for ms in (best_ms, timed[0][1]))
    log.info("paiton few_rows_gemm: %s on %s: %s (%.1f us; %s %.1f us)", what, x.device, choice, chosen_us,
             "first launch" if fp8 else "vendor", baseline_us)
    _CHOICES[key] = choice
    _TIMINGS[key] = {"source": "timed", ("first_launch_us" if fp8 else "vendor_us"): baseline_us, "chosen_us": chosen_us,
                     "disagreeing": dropped,
                     # every launch's best time, for results files (which launches to keep timing)
                     "candidate_times": [[config, round(ms / len(weights) * 1e3, 2)] for config, ms in timed]}
    return choice


def chosen_launches() -> list[dict]:
    """What `choose` picked so far, one record per key (for result files: which kernel ran each
    product of a few rows), with its source and, timed, the vendor's and the choice's times."""
    records = []
    for key, choice in _CHOICES.items():
        record = dict(device=key.device, rows=key.rows, n=key.n, k=key.k, row_stride=key.row_stride,
                      dtype=str(key.dtype).removeprefix("torch."))
        if key.weight_dtype is not None:
            record["weight_dtype"] = str(key.weight_dtype).removeprefix("torch.")
        if key.gated:
            record["gated"] = True
        if key.swiglu_out:
            record["swiglu_out"] = True
        if not key.w_tma:
            record["w_tma"] = False
        records.append(dict(record, choice=choice, **_TIMINGS.get(key, {})))
    return records


def describe_choices() -> list[str]:
    """A line per choice `choose` made (for logs: which product ran each shape and row count)."""
    lines = []
    for r in chosen_launches():
        choice = r["choice"] if isinstance(r["choice"], str) else "kernel " + ", ".join(f"{k}={v}" for k, v in r["choice"].items())
        baseline = f"vendor {r['vendor_us']:.1f} us" if "vendor_us" in r else f"first launch {r.get('first_launch_us', 0):.1f} us"
        times = f": {r['chosen_us']:.1f} us, {baseline}" if "chosen_us" in r else f" ({r['source']})"
        weight = f", {r['weight_dtype']} weight" if "weight_dtype" in r else ""
        gated = (", gated (SwiGLU as x loads)" if r.get("gated") else "") + (", SwiGLU on the gate/up halves"
                                                                           if r.get("swiglu_out") else "")
        lines.append(f"{r['rows']} rows x [{r['n']} x {r['k']}] {r['dtype']}{weight}{gated}: {choice}{times}")
    return lines


def vendor_swiglu_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu_mul of x @ weight.T's two halves (W gate/up packed) as it runs without the kernel:
    torch's linear, then paiton.silu_mul's kernel on the halves, read in place."""
    return silu_mul(*torch.nn.functional.linear(x, weight).chunk(2, dim=-1))


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, candidates: Sequence[dict[str, int]],
                    up: torch.Tensor | None = None, swiglu_out: bool = False) -> torch.Tensor:
    """x [..., K] @ weight.T (with `up`: silu_mul(x, up) @ weight.T; with `swiglu_out`: silu_mul
    of the gate/up product's two halves): Paiton's kernel or torch's linear (with silu_mul
    before or after it), whichever `choose` found faster for this shape and row count. Under
    the interpreter (CPU tests) the kernel's interpreter launch runs, for 2 to MAX_ROWS rows."""
    def vendor():
        if swiglu_out:
            return vendor_swiglu_out(x, weight)
        return torch.nn.functional.linear(x if up is None else silu_mul(x, up), weight)

    if x.device.type == "cpu" and is_interpreted(_few_rows_gemm_kernel):
        rows = x.numel() // max(x.shape[-1], 1)
        if 1 < rows <= MAX_ROWS:
            return launch_candidate(x, weight, INTERPRETER_CANDIDATE, up=up, swiglu_out=swiglu_out)
        return vendor()
    config = choose(x, weight, candidates, up=up, swiglu_out=swiglu_out)
    if config == VENDOR:
        return vendor()
    return launch_candidate(x, weight, config, up=up, swiglu_out=swiglu_out)

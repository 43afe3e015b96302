"""One-row linear, y = x @ W.T with x a single row: the matrix-vector product of a decode step
at batch 1, as a Triton kernel that streams W once.

Why: at one row every linear is a read of its weight and nothing else, so its time is the
weight's bytes over memory bandwidth. The profile of a Qwen3-8B decode step on an H200
(bench/results/profile_decode_step-qwen3-8b-NVIDIA_H200-2026-11-29*.md) has cuBLAS's one-row
GEMM for the packed q/k/v weight at 74% of the copy rate and Inductor's decomposed reductions
for o_proj and down_proj at 55-80%; together they are most of the step.

The kernel: program i reads rows [i * BLOCK_N, (i + 1) * BLOCK_N) of W in [BLOCK_N, BLOCK_K]
tiles along K (16-byte loads, read once: `evict_first` keeps them from pushing x and the
activations out of L2), multiplies by x's matching piece and accumulates element by element
in fp32; the tile is summed once, after the last K step. The output is rounded to x's dtype
once, as torch's linear rounds its fp32 accumulation. A split launch (SPLITS, fusion/split_k.py)
gives each slice of K a program of its own, for weights whose K is long and N narrow
(down_proj), the slices' fp32 sums added in slice order by the rows' last program.

Which launch (BLOCK_N, BLOCK_K, warps, stages), or the vendor's GEMM, is decided per weight
shape, dtype and device the first time that shape runs (`choose`): the card's measured entry
(backends/measured_gemv.py, from bench/gemv_sweep.py) where there is one, else by timing each
candidate of the lowering table's list against torch's linear (launched back to back over
copies of the weight that do not fit L2 together, as a decode step reads it), outside CUDA
graph capture; the choice is kept for the process (`choices()` lists them). So a
shape where the vendor's GEMM is faster keeps it, on any GPU.

Used by paiton::packed_linear (fusion/packed_linear.py) for inputs of one row; the pass
passes/one_row_linear.py routes a decode step's other linears (o_proj, down_proj, lm_head)
through that op. Gated (`up` given): the input is silu(x) * up, computed tile by tile as the
kernel loads it and rounded as paiton::silu_mul rounds it, for paiton::silu_mul_packed_linear
(passes/silu_mul_linear.py: SwiGLU into down_proj at batch 1, one launch less per layer);
its vendor candidate is silu_mul's kernel followed by torch's linear, and each launch is also
timed after silu_mul's kernel, plain (`silu_first`: where the gated loop's ALU work costs more
than a launch, as on an H200 with FP8 weights). SWIGLU_OUT (`launch_gemv(..., swiglu_out=True)`)
is the other place for SwiGLU: in the packed gate/up product's last step, each program pairing
gate rows with their up rows; no pass routes a model through it yet (bench/swiglu_out_sweep.py
times it against today's form first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from paiton.fusion import split_k
from paiton.fusion.pdl import pdl_launch, prefetch_rows_to_l2, wait_for_previous_kernel
from paiton.fusion.swiglu import silu_mul, silu_mul_reference, silu_times_up
from paiton.fusion.timing import TIMING_ROUNDS, best_times
from paiton.fusion.timing import cold_copies as _cold_copies
from paiton.fusion.timing import time_ms as _time_ms
from paiton.fusion.timing import timed_choices
from paiton.fusion.triton_utils import device_guard

log = logging.getLogger(__name__)

VENDOR = "vendor"  # the candidate that is torch's linear (cuBLAS / hipBLASLt)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T; with `up`, silu(x) * up @ weight.T."""
    return torch.nn.functional.linear(x if up is None else silu_mul_reference(x, up), weight)


# How an FP8 weight is scaled (SCALES): not at all (a bf16/fp16/fp32 weight), one fp32 scale per
# output row, or one per [SCALE_BLOCK x SCALE_BLOCK] block of W (the 128 x 128 blocks of public
# FP8 checkpoints' `weight_scale_inv`).
NO_SCALES, ROW_SCALES, BLOCK_SCALES = 0, 1, 2
SCALE_BLOCK = 128


# Sums of squares a product leaves for the RMSNorm after it (SQUARES_OUT): one fp32 per this many
# output rows, so that their count, cdiv(N, SQUARES_GRAIN), does not depend on the launch (its
# BLOCK_N, a multiple of it) and a graph can hold the buffer.
SQUARES_GRAIN = tl.constexpr(4)


@triton.jit
def _gemv_kernel(x_ptr, up_ptr, w_ptr, y_ptr, N, K, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                 GATED: tl.constexpr, scale_ptr=None, stride_sn=0, SCALES: tl.constexpr = 0,
                 SCALE_BLOCK: tl.constexpr = 128, X_PER_ROW: tl.constexpr = False, CHUNK: tl.constexpr = 0,
                 PDL: tl.constexpr = False, norm_w_ptr=None, squares_ptr=None, n_squares=0, eps=0.0,
                 NORM: tl.constexpr = False, SQUARES_BLOCK: tl.constexpr = 1, res_ptr=None,
                 RESIDUAL: tl.constexpr = False, squares_out_ptr=None, SQUARES_OUT: tl.constexpr = False,
                 SWIGLU_OUT: tl.constexpr = False, k_slice=0, partial_ptr=None, count_ptr=None,
                 SPLITS: tl.constexpr = 1):
    """Program i: y[rows] = W[rows, :] @ x for rows i * BLOCK_N + [0, BLOCK_N). GATED: x is
    silu(x) * up, made piece by piece as it is loaded, rounded as paiton.silu_mul rounds it
    (SwiGLU feeding down_proj without a kernel and a round trip of its own). An FP8 W is
    dequantized in registers (fp32 products and sums); its scales (SCALES) multiply the row sums
    at the end (one per row), or each product as it is accumulated (one per block of W).

    X_PER_ROW: x (and up) are loaded through a [BLOCK_N, BLOCK_K] tile of pointers whose rows
    all point at x, so x arrives in W's layout (repeated reads of the same lines hit L1): loaded
    as [1, BLOCK_K], x takes its own layout and is moved into W's through shared memory, with
    8 barriers an iteration at 16 x 1024 FP8 tiles (the sm_90 SASS). CHUNK > 0: the products of
    CHUNK neighbours along K (one thread's 16-byte load of FP8) are summed as they are made, so
    the accumulator holds BLOCK_K / CHUNK sums a row instead of BLOCK_K: 48 registers a thread
    instead of 115 at 16 x 1024 FP8 on 8 warps, so more programs, and more loads, per
    multiprocessor.

    PDL (fusion/pdl.py): the program's first W tile is prefetched into L2 while the kernel
    before this one finishes (one: a first wave of about 600 programs with 16-32 KB tiles asks
    for 10-20 MB of L2 with it, while the kernel before streams its own weight through L2); x
    is read after it has.

    NORM (not with GATED): the product of RMSNorm(x) with `norm_w_ptr`'s weight, where the
    product that made x left the sums of x's squares (`squares_ptr`, `n_squares` fp32 partial
    sums: SQUARES_OUT's): each piece of x is multiplied by the norm's weight as it is loaded
    (rounded to x's dtype, but for fp16, whose range the unnormalized product can leave), and
    the row sums by 1 / sqrt(mean(x^2) + eps) at the end. So the
    norm has no kernel of its own, and no pass over x before the first product: a first form
    that summed x's squares in every program before its loop made Qwen3-8B's FP8 step 1%
    slower on an H100 (765a60c). Eager rounds x * rstd and then its product with the weight;
    this rounds x times the weight and scales the fp32 sums (about 2^-9 relative apart in bf16).
    RESIDUAL: y + res (rounded to y's dtype once more, as eager's add of two bf16 tensors), the
    residual stream's add in the product's last step. SQUARES_OUT: the sums of the squares of
    y (as stored), one per SQUARES_GRAIN rows, to `squares_out_ptr` (the next norm's NORM input).

    SWIGLU_OUT (alone): W is gate/up packed, [gate; up] of N / 2 rows each, and y [N / 2] is
    silu(gate product) * (up product), each product rounded to y's dtype first, as the GEMV then
    paiton.silu_mul round them. Program i takes gate rows and up rows i * BLOCK_N / 2 + [0,
    BLOCK_N / 2) (one tile of BLOCK_N rows from two places), so the pair meets in its registers:
    the product after it (down_proj) then runs plain, without silu in its loop.

    SPLITS > 1 (split-K; the grid's second axis): program (i, s) sums K slice s (`k_slice` wide,
    whole BLOCK_K tiles) of rows i and writes its fp32 row sums to `partial_ptr` [SPLITS, N];
    the last of the SPLITS programs of rows i to arrive (`count_ptr`: one counter for them, left
    at 0; fusion/split_k.py) adds the slices in slice order and runs the epilogue above (the
    NORM, scale, residual, SWIGLU_OUT and SQUARES_OUT steps) on the total.
    """
    if SWIGLU_OUT:
        HALF: tl.constexpr = BLOCK_N // 2
        local = tl.arange(0, BLOCK_N)
        outputs = tl.program_id(0) * HALF + local % HALF
        rows = outputs + (local // HALF) * (N // 2)  # the tile's first half gate rows, its second half up rows
        row_valid = outputs < N // 2
    else:
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_valid = rows < N
    if SPLITS > 1:
        k_begin = tl.program_id(1) * k_slice
        k_end = tl.minimum(k_begin + k_slice, K)
    else:
        k_begin = 0
        k_end = K
    if PDL:
        prefetch_rows_to_l2(w_ptr, rows, N, stride_wn, k_begin, K, BLOCK_K)
    wait_for_previous_kernel(PDL)
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    if X_PER_ROW:
        x_rows = x_ptr + (rows * 0)[:, None]
        up_rows = up_ptr + (rows * 0)[:, None]
    else:
        x_rows = x_ptr
        up_rows = up_ptr
    if NORM:
        if X_PER_ROW:
            norm_w_rows = norm_w_ptr + (rows * 0)[:, None]
        else:
            norm_w_rows = norm_w_ptr
        # Loaded now, summed after the loop: the load's wait overlaps the products.
        square_slots = tl.arange(0, SQUARES_BLOCK)
        squares = tl.load(squares_ptr + square_slots, mask=square_slots < n_squares, other=0.0)
    if CHUNK > 0:
        acc = tl.zeros((BLOCK_N, BLOCK_K // CHUNK), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(k_begin, k_end, BLOCK_K):  # slices are whole BLOCK_K tiles: only K's end is ragged
        k = start + cols[None, :]  # [1, BLOCK_K]
        if EVEN_K:
            x = tl.load(x_rows + k)
        else:
            x = tl.load(x_rows + k, mask=k < K, other=0.0)
        if GATED:  # silu(0) * 0 = 0 where masked
            if EVEN_K:
                x = silu_times_up(x, tl.load(up_rows + k))
            else:
                x = silu_times_up(x, tl.load(up_rows + k, mask=k < K, other=0.0))
        if NORM:  # 0 where masked: x and the norm's weight load 0 there
            if EVEN_K:
                norm_w = tl.load(norm_w_rows + k)
            else:
                norm_w = tl.load(norm_w_rows + k, mask=k < K, other=0.0)
            x = x.to(tl.float32) * norm_w.to(tl.float32)
            if x_ptr.dtype.element_ty != tl.float16:  # fp16 keeps fp32: x * w, not yet normalized, can pass 65504
                x = x.to(x_ptr.dtype.element_ty)
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + k, eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + k, mask=row_valid[:, None] & (k < K), other=0.0, eviction_policy="evict_first")
        product = w.to(tl.float32) * x.to(tl.float32)
        if SCALES == 2:  # the scale of each element's block (a few bytes per tile, from cache)
            scale_at = scale_ptr + (rows // SCALE_BLOCK)[:, None] * stride_sn + k // SCALE_BLOCK
            product *= tl.load(scale_at, mask=row_valid[:, None] & (k < K), other=0.0)
        if CHUNK > 0:
            acc += tl.sum(tl.reshape(product, (BLOCK_N, BLOCK_K // CHUNK, CHUNK)), axis=2)
        else:
            acc += product
    y = tl.sum(acc, axis=1)
    if NORM:
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    else:
        rstd = 1.0  # not read
    if SPLITS > 1:
        tl.store(partial_ptr + tl.program_id(1) * N + rows, y, mask=row_valid)
        tl.debug_barrier()  # every thread's sums are written before the counter says so
        arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel")
        if arrived == SPLITS - 1:  # the last slice of these rows: add all slices (from L2, not a stale L1 line)
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for split in tl.static_range(SPLITS):
                total += tl.load(partial_ptr + split * N + rows, mask=row_valid, other=0.0, cache_modifier=".cg")
            _gemv_epilogue(total, rows, row_valid, N, rstd, y_ptr, scale_ptr, res_ptr, squares_out_ptr,
                           BLOCK_N, EVEN_N, SCALES, NORM, RESIDUAL, SQUARES_OUT, SWIGLU_OUT)
            tl.atomic_xchg(count_ptr + tl.program_id(0), 0)  # ready for the next product
    else:
        _gemv_epilogue(y, rows, row_valid, N, rstd, y_ptr, scale_ptr, res_ptr, squares_out_ptr,
                       BLOCK_N, EVEN_N, SCALES, NORM, RESIDUAL, SQUARES_OUT, SWIGLU_OUT)


@triton.jit
def _gemv_epilogue(y, rows, row_valid, N, rstd, y_ptr, scale_ptr, res_ptr, squares_out_ptr,
                   BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, SCALES: tl.constexpr, NORM: tl.constexpr,
                   RESIDUAL: tl.constexpr, SQUARES_OUT: tl.constexpr, SWIGLU_OUT: tl.constexpr):
    """_gemv_kernel's last step on the fp32 row sums `y` of `rows`: the norm's 1 / rms (NORM),
    the row scales, the rounding to y's dtype, then SWIGLU_OUT's pairing, or the residual's add,
    the store and the sums of squares (SQUARES_OUT)."""
    if NORM:
        y *= rstd
    if SCALES == 1:
        y *= tl.load(scale_ptr + rows, mask=row_valid, other=0.0)
    y = y.to(y_ptr.dtype.element_ty)
    if SWIGLU_OUT:
        HALF: tl.constexpr = BLOCK_N // 2
        gate, up = tl.split(tl.permute(tl.reshape(y, (2, HALF)), (1, 0)))
        out_index = tl.program_id(0) * HALF + tl.arange(0, HALF)
        tl.store(y_ptr + out_index, silu_times_up(gate, up), mask=out_index < N // 2)
    else:
        if RESIDUAL:
            if EVEN_N:
                residual = tl.load(res_ptr + rows)
            else:
                residual = tl.load(res_ptr + rows, mask=row_valid, other=0.0)
            y = (y.to(tl.float32) + residual.to(tl.float32)).to(y_ptr.dtype.element_ty)
        if EVEN_N:
            tl.store(y_ptr + rows, y)
        else:
            tl.store(y_ptr + rows, y, mask=row_valid)
        if SQUARES_OUT:
            stored = tl.where(row_valid, y.to(tl.float32), 0.0)
            GROUPS: tl.constexpr = BLOCK_N // SQUARES_GRAIN
            group_sums = tl.sum(tl.reshape(stored * stored, (GROUPS, SQUARES_GRAIN)), axis=1)
            slots = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
            tl.store(squares_out_ptr + slots, group_sums, mask=slots < tl.cdiv(N, SQUARES_GRAIN))


def gemv_config(block_n: int, block_k: int, num_warps: int, num_stages: int, x_per_row: bool = False,
                chunk: int = 0, silu_first: bool = False, splits: int = 1) -> dict[str, int]:
    """A launch of _gemv_kernel; `x_per_row`, `chunk` and `splits` are its X_PER_ROW, CHUNK and
    SPLITS (named in the dict only when set, so the measured table's launches keep their keys);
    `silu_first`: for a gated product, paiton.silu_mul's kernel first and then this launch, plain
    (SILU_FIRST)."""
    config = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    if x_per_row:
        config["X_PER_ROW"] = True
    if chunk:
        config["CHUNK"] = chunk
    if silu_first:
        config["SILU_FIRST"] = True
    if splits > 1:
        config["SPLITS"] = splits
    return config


def silu_first(config: dict[str, int]) -> dict[str, int]:
    """`config` as a gated product's launch that runs paiton.silu_mul first, then the plain kernel
    (a GEMV's here; fusion/few_rows_gemm.py's `choose` takes the same key for a few rows).

    Why: the gated kernel computes silu(gate) * up for every element of W it multiplies, and
    with x in W's layout (X_PER_ROW) once for each of a tile's rows: ALU work that a card whose
    memory is fast enough runs out of. On an H200 Qwen3-32B's FP8 down_proj ran at 75% of the
    copy rate gated (40.9 us, 16 x 1024 CHUNK), where its gate/up product, the same bytes, ran
    at 96% plain (X_PER_ROW; bench/results/profile_decode_step-qwen3-32b-NVIDIA_H200-2026-12-06-976075e.md).
    silu_mul's kernel is about 2 us; `choose` times both forms of every candidate."""
    return {**config, "SILU_FIRST": True}


def gated_forms(candidates: Sequence[dict]) -> list[dict]:
    """A gated product's candidates for timing: each launch gated (as given) and after silu_mul's
    kernel, plain (`silu_first`); the one-row GEMV's choice and the few-rows GEMM's both time
    these, since which form wins depends on the card and the rows."""
    return [*candidates, *(silu_first(c) for c in candidates if not c.get("SILU_FIRST"))]


def run_silu_first(config: dict, x: torch.Tensor, up: torch.Tensor | None):
    """(config, x, up) for a launch: with SILU_FIRST, the config without it, silu_mul(x, up) and
    no `up` (the gated product as silu_mul's kernel, then the launch plain); else unchanged."""
    if not config.get("SILU_FIRST"):
        return config, x, up
    config = {key: value for key, value in config.items() if key != "SILU_FIRST"}
    return (config, x, up) if up is None else (config, silu_mul(x, up), None)


# The candidates a CUDA GPU times per shape (the lowering table's list). Each tile is 4 to 32
# KB of weight; BLOCK_K of 512-2048 with 4-8 warps gives every thread 16-byte loads; BLOCK_N of
# 4-16 gives Qwen3's narrowest weights (o_proj, 4096 rows at 8B) 256-1024 programs, two or more
# per multiprocessor.
GEMV_CANDIDATES: tuple[dict[str, int], ...] = (
    gemv_config(4, 1024, 4, 2),
    gemv_config(8, 512, 4, 2),
    gemv_config(8, 1024, 4, 2),
    gemv_config(8, 1024, 8, 3),
    gemv_config(16, 512, 4, 2),
    gemv_config(16, 512, 8, 3),
    gemv_config(16, 1024, 8, 2),
    gemv_config(32, 256, 4, 2),
    # Split along K (fusion/split_k.py): for the long-K weights (down_proj, o_proj), see the FP8
    # list's note.
    gemv_config(8, 1024, 4, 2, splits=4),
    gemv_config(16, 512, 4, 2, splits=4),
)


# FP8 weights (one byte an element), one row: tiles of 8-32 KB of FP8. The first is the lowering
# table's untimed launch (and the baseline the timing reports). Until 21723a0 that was 16 rows x
# 1024, 8 warps, in W's elements, whose sm_90 code (Triton 3.9's SASS, bench/gemv_sass.py) has
# 126 registers a thread (two 256-thread programs a multiprocessor, too few loads in flight for
# an H100/H200) and moves x into W's layout through shared memory behind 8 barriers an
# iteration; it ran Qwen3-32B's o_proj at a quarter of the H200's copy rate (18612d0). CHUNK
# keeps 16 sums a row a thread instead of one per element (48-68 registers); X_PER_ROW loads x
# in W's layout (no barrier in the loop). Timed at a88eea9 on an H100 (bench/results/NOTES.md,
# 2026-12-05) against the old launches: the CHUNK launch without X_PER_ROW was within 11% of
# the best on every Qwen3-8B/32B weight, faster than every old launch on five of eight (one
# tie), and the fastest for 32B's gated down_proj (48.7 us against 65.0 for the old untimed
# launch: silu is computed once a column there, where X_PER_ROW repeats it in every warp); the
# X_PER_ROW launches won the rest (32B: q/k/v at 85% of the copy rate, gate/up 98%); the old
# launches won none and are gone.
FP8_GEMV_CANDIDATES: tuple[dict[str, int], ...] = (
    gemv_config(16, 1024, 8, 2, chunk=16),
    gemv_config(16, 1024, 8, 2, x_per_row=True, chunk=16),
    gemv_config(8, 1024, 4, 2, x_per_row=True, chunk=16),
    gemv_config(8, 2048, 4, 2, x_per_row=True, chunk=16),
    gemv_config(4, 2048, 4, 2, x_per_row=True, chunk=16),
    # Split along K: each program one slice of K, the rows' last program adding the slices
    # (SPLITS). Why: on an H200 at 2810a50 every FP8 product took about 3.5 us over its bytes,
    # and the long-K one, down_proj (Qwen3-32B: K = 25600, 640 programs of 25 K steps), 7.7 us
    # plain (38.5 us against 30.8; profile and swiglu_out_sweep -2810a50). Our reading, not yet
    # timed: each of its 640 programs streams 200 KB in turn, so its last programs run while most
    # of the chip idles. Four slices give 2560 programs of about 7 steps; 16 rows a program halve
    # x's reloads. `choose` times them beside the rest, so a shape they do not help keeps its launch.
    gemv_config(8, 1024, 4, 2, x_per_row=True, chunk=16, splits=4),
    gemv_config(16, 1024, 8, 2, x_per_row=True, chunk=16, splits=4),
    gemv_config(4, 2048, 4, 2, x_per_row=True, chunk=16, splits=2),
)


# Under Triton's CPU interpreter (the CPU tests) each program runs in turn in Python: few wide
# programs are what is fast there, whatever suits a GPU.
INTERPRETER_CONFIG = gemv_config(64, 128, 4, 1)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def scales_kind(weight: torch.Tensor, scales: torch.Tensor | None) -> int:
    """SCALES for the kernel: NO_SCALES without scales, ROW_SCALES for [N] (or [N, 1]), BLOCK_SCALES
    for [ceil(N / 128), ceil(K / 128)]; a ValueError for anything else."""
    if scales is None:
        return NO_SCALES
    n, k = weight.shape
    blocks = (-(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK))
    if scales.dtype != torch.float32 or scales.device != weight.device:
        raise ValueError(f"paiton gemv: scales are float32 on W's device; got {scales.dtype} on {scales.device}")
    if tuple(scales.shape) in ((n,), (n, 1)) and scales.stride(0) == 1:
        return ROW_SCALES
    if tuple(scales.shape) == blocks and scales.stride(1) == 1:
        return BLOCK_SCALES
    raise ValueError(f"paiton gemv: scales for W [{n}, {k}] are [{n}] (one per row) or {list(blocks)} (one per "
                     f"{SCALE_BLOCK} x {SCALE_BLOCK} block, contiguous along K); got {tuple(scales.shape)}")


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, up: torch.Tensor | None,
                  scales: torch.Tensor | None = None) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.numel() != weight.shape[1]:
        raise ValueError(f"paiton gemv: one row x [..., K] and W [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    fp8 = weight.dtype in FP8_DTYPES
    if weight.stride(1) != 1 or (x.dtype != weight.dtype and not fp8) or x.device != weight.device:
        raise ValueError(f"paiton gemv: W needs unit stride along K and x its dtype (or FP8 with scales) and device; "
                         f"got strides {weight.stride()}, {x.dtype}/{weight.dtype}, {x.device}/{weight.device}")
    if fp8 != (scales is not None):
        raise ValueError("paiton gemv: an FP8 weight needs its scales, and only an FP8 weight takes them")
    scales_kind(weight, scales)
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype or up.device != x.device):
        raise ValueError(f"paiton gemv: up must have x's shape, dtype and device; got {tuple(up.shape)} {up.dtype} "
                         f"for x {tuple(x.shape)} {x.dtype}")


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, config: dict[str, int], up: torch.Tensor | None = None,
                scales: torch.Tensor | None = None, *, norm_weight: torch.Tensor | None = None,
                squares: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
                squares_out: bool = False, swiglu_out: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y [..., N] = x [..., K] (one row) @ weight.T with the kernel launched as `config` says;
    with `up`, (silu(x) * up) @ weight.T; an FP8 weight with its `scales` (see scales_kind):
    x @ dequantized(weight).T, the scales applied to the fp32 sums.

    With `norm_weight` and `squares` (not with `up`): rms_norm(x, norm_weight, eps) @ weight.T,
    `squares` being fp32 partial sums of x's squares (any number of them; what a product with
    `squares_out` leaves; the kernel's NORM says how it rounds). With `residual` ([..., N], y's
    dtype): y plus the residual. `squares_out`: (y, the sums of y's squares, one fp32 per
    SQUARES_GRAIN outputs: [..., ceil(N / SQUARES_GRAIN)]); the launch's BLOCK_N must be a
    multiple of SQUARES_GRAIN. `swiglu_out` (alone): weight is gate/up packed ([gate; up], N
    even) and y [..., N / 2] = silu_mul(x @ gate.T, x @ up.T) (the kernel's SWIGLU_OUT)."""
    _check_inputs(x, weight, up, scales)
    _check_fusions(x, weight, config, up, norm_weight, squares, residual, squares_out, swiglu_out)
    return _launch(x, weight, config, up, scales, norm_weight=norm_weight, squares=squares, eps=eps, residual=residual,
                   squares_out=squares_out, swiglu_out=swiglu_out)


def squares_count(n: int) -> int:
    """How many partial sums of squares a product of n outputs leaves (SQUARES_OUT)."""
    return -(-n // SQUARES_GRAIN.value)


def _check_fusions(x: torch.Tensor, weight: torch.Tensor, config: dict[str, int], up: torch.Tensor | None,
                   norm_weight: torch.Tensor | None, squares: torch.Tensor | None, residual: torch.Tensor | None,
                   squares_out: bool, swiglu_out: bool = False) -> None:
    if (norm_weight is None) != (squares is None):
        raise ValueError("paiton gemv: a normalized input needs both the norm's weight and the sums of its squares")
    if norm_weight is not None:
        if up is not None:
            raise ValueError("paiton gemv: the input is either normalized (norm_weight) or gated (up), not both")
        if norm_weight.shape != (x.shape[-1],) or norm_weight.dtype != x.dtype or norm_weight.device != x.device:
            raise ValueError(f"paiton gemv: the norm's weight is [K] in x's dtype and device; got {tuple(norm_weight.shape)} "
                             f"{norm_weight.dtype} for x {tuple(x.shape)} {x.dtype}")
        if squares.dtype != torch.float32 or squares.device != x.device or not squares.is_contiguous():
            raise ValueError(f"paiton gemv: the sums of squares are contiguous fp32 on x's device; got {squares.dtype}")
    if residual is not None and (residual.shape != (*x.shape[:-1], weight.shape[0]) or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"paiton gemv: the residual is the product's shape [..., N] in x's dtype; got "
                         f"{tuple(residual.shape)} {residual.dtype} for y [..., {weight.shape[0]}] {x.dtype}")
    if squares_out and config["BLOCK_N"] % SQUARES_GRAIN.value:
        raise ValueError(f"paiton gemv: sums of squares need BLOCK_N a multiple of {SQUARES_GRAIN.value}; got {config}")
    if swiglu_out and (weight.shape[0] % 2 or config["BLOCK_N"] % 2 or up is not None or norm_weight is not None
                       or residual is not None or squares_out):
        raise ValueError(f"paiton gemv: swiglu_out takes a packed gate/up weight of an even row count, a launch of an "
                         f"even BLOCK_N and no other fusion; got W {tuple(weight.shape)}, {config}")


def _unit_stride_row(x: torch.Tensor, k: int) -> torch.Tensor:
    row = x.reshape(k)
    return row if row.stride(0) == 1 else row.contiguous()


def _launch(x: torch.Tensor, weight: torch.Tensor, config: dict[str, int], up: torch.Tensor | None = None,
            scales: torch.Tensor | None = None, *, norm_weight: torch.Tensor | None = None,
            squares: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
            squares_out: bool = False, swiglu_out: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """launch_gemv without the input checks (its callers made them)."""
    config, x, up = run_silu_first(config, x, up)
    n, k = weight.shape
    row = _unit_stride_row(x, k)
    up_row = row if up is None else _unit_stride_row(up, k)  # not read unless GATED
    y = torch.empty((*x.shape[:-1], n // 2 if swiglu_out else n), dtype=x.dtype, device=x.device)
    sums = torch.empty((*x.shape[:-1], squares_count(n)), dtype=torch.float32, device=x.device) if squares_out else None
    if n == 0:
        return (y, sums) if squares_out else y
    if k == 0 and norm_weight is not None:  # an empty row normalizes to nothing: the product is 0
        return y.zero_()
    launch = dict(config)
    block_n, block_k = launch.pop("BLOCK_N"), launch.pop("BLOCK_K")
    # A SWIGLU_OUT program makes BLOCK_N / 2 outputs from as many gate and up rows.
    outputs, outputs_per_program = (n // 2, block_n // 2) if swiglu_out else (n, block_n)
    programs = triton.cdiv(outputs, outputs_per_program)
    fusions = _split_k_arguments(x.device, n, k, block_k, programs, launch.pop("SPLITS", 1))
    if norm_weight is not None:
        fusions.update(norm_w_ptr=norm_weight, squares_ptr=squares, n_squares=squares.numel(), eps=float(eps), NORM=True,
                       SQUARES_BLOCK=triton.next_power_of_2(max(squares.numel(), 1)))
    if residual is not None:
        fusions.update(res_ptr=_unit_stride_row(residual, n), RESIDUAL=True)
    if squares_out:
        fusions.update(squares_out_ptr=sums, SQUARES_OUT=True)
    if swiglu_out:
        fusions.update(SWIGLU_OUT=True)
    with device_guard(x):
        kind = scales_kind(weight, scales)
        scale_args = {} if kind == NO_SCALES else dict(scale_ptr=scales, stride_sn=scales.stride(0), SCALES=kind)
        _gemv_kernel[(programs, fusions.get("SPLITS", 1))](
            row, up_row, weight, y, n, k, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
            EVEN_N=outputs % outputs_per_program == 0, EVEN_K=k % block_k == 0, GATED=up is not None, **scale_args, **launch, **fusions,
            **(pdl_launch(x, _gemv_kernel) if k else {}))  # (an empty W: nothing to prefetch)
    return (y, sums) if squares_out else y


def _split_k_arguments(device: torch.device, n: int, k: int, block_k: int, programs: int, splits: int) -> dict:
    """The kernel's split-K arguments for `splits` slices of K (fusion/split_k.py): none where K
    is one slice, or where no counters are to be had (first use inside a CUDA graph capture), and
    the launch then runs unsplit."""
    k_slice, splits = split_k.k_slices(k, block_k, splits)
    counters = split_k.tile_counters(device, programs) if splits > 1 else None
    if counters is None:
        return {}
    partial = torch.empty((splits, n), dtype=torch.float32, device=device)
    return dict(k_slice=k_slice, partial_ptr=partial, count_ptr=counters, SPLITS=splits)


# (device, N, K, row stride of W, dtype, gated[, FP8 weight's dtype, its SCALES]) -> the chosen
# candidate: a config dict or VENDOR, and the best times `choose` saw for the baseline (the
# vendor; for FP8 the first candidate) and for the choice.
_CHOICES: dict[tuple, dict[str, int] | str] = {}
_TIMINGS: dict[tuple, dict[str, float]] = {}


def choices() -> dict[tuple, dict[str, int] | str]:
    """What `choose` picked so far, per (device, N, K, W's row stride, dtype, gated)."""
    return dict(_CHOICES)


def vendor_linear(x: torch.Tensor, weight: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """What runs without Paiton's GEMV: torch's linear, after paiton.silu_mul's kernel when gated."""
    if up is None:
        return gemv_reference(x, weight)
    return torch.nn.functional.linear(silu_mul(x, up), weight)


def choose(x: torch.Tensor, weight: torch.Tensor, candidates: Sequence[dict[str, int]],
           time_ms: Callable[[Callable[[], object]], float] | None = None,
           up: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> dict[str, int] | str:
    """The fastest of `candidates` and torch's linear (after paiton.silu_mul with `up`) for this
    weight's shape, decided once per (device, shape, stride, dtype, gated): the card's entry in
    backends/measured_gemv.py where it has one, else timed: TIMING_ROUNDS rounds of every
    candidate in turn, each candidate's best round kept. While a CUDA graph is being captured
    nothing can be timed: the vendor's GEMM runs, and the choice is left for a later call.

    An FP8 weight (with its `scales`) has no vendor GEMM of one row: the fastest of `candidates`
    alone, timed with the scales (the first candidate, the table's untimed launch, runs during a
    capture and whenever none other is faster). A gated product (`up`) times each candidate in
    two forms: gated, and after paiton.silu_mul's kernel, plain (`silu_first`)."""
    fp8 = scales is not None
    key = (str(x.device), weight.shape[0], weight.shape[1], weight.stride(0), x.dtype, up is not None)
    if fp8:
        key += (weight.dtype, scales_kind(weight, scales))
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if not candidates:
        return VENDOR
    if not fp8:
        from paiton.backends.measured_gemv import measured_launch  # (backends imports this module)

        measured = measured_launch(x.device, *key[1:], candidates)
        if measured is not None:
            _CHOICES[key] = measured
            _TIMINGS[key] = {"source": "table"}
            return measured
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return candidates[0] if fp8 else VENDOR
    if time_ms is None and not timed_choices():  # untimed, kept: PAITON_TIMED_CHOICES=0
        _CHOICES[key], _TIMINGS[key] = (candidates[0] if fp8 else VENDOR), {"source": "untimed"}
        return _CHOICES[key]
    if up is not None:
        candidates = gated_forms(candidates)
    timed = time_candidates(x, weight, candidates, up, TIMING_ROUNDS, time_ms or _time_ms, scales)
    choice, best_ms = min(timed, key=lambda timing: timing[1])  # the baseline first: a tie keeps it
    baseline = "first candidate" if fp8 else "vendor"
    log.info("paiton gemv: [%d x %d] %s%s%s on %s: %s (%.1f us; %s %.1f us)", weight.shape[0], weight.shape[1],
             str(weight.dtype).removeprefix("torch.") + " weight, " if fp8 else "", x.dtype,
             " gated" if up is not None else "", x.device, choice, best_ms * 1e3, baseline, timed[0][1] * 1e3)
    _CHOICES[key] = choice
    _TIMINGS[key] = {"source": "timed", ("first_candidate_us" if fp8 else "vendor_us"): timed[0][1] * 1e3,
                     "chosen_us": best_ms * 1e3,
                     # every launch's best time, for results files (which launches to keep timing)
                     "candidate_times": [[candidate, round(ms * 1e3, 2)] for candidate, ms in timed]}
    return choice


def time_candidates(x: torch.Tensor, weight: torch.Tensor, candidates: Sequence[dict[str, int]], up: torch.Tensor | None,
                    rounds: int, time_ms: Callable[[Callable[[], object]], float] = _time_ms,
                    scales: torch.Tensor | None = None, swiglu_out: bool = False) -> list[tuple[dict[str, int] | str, float]]:
    """[(VENDOR, ms), (candidate, ms), ...]: each one's best time for one product over `rounds`
    rounds, every one timed once per round, in turn; a candidate this chip cannot launch
    (resources) is left out. Each timed run is one product over every copy of _cold_copies in
    turn, so the weights come from memory as in a decode step. With an FP8 weight's `scales`,
    or `swiglu_out` (launch_gemv's; torch's linear has no such form): the candidates alone,
    the first one required (it is the untimed launch)."""
    weights = _cold_copies(weight)
    runs: list[tuple[dict[str, int] | str, Callable[[], object]]] = []
    if scales is None and not swiglu_out:
        runs.append((VENDOR, lambda: [vendor_linear(x, w, up) for w in weights]))
    runs += [(config, lambda config=config: [launch_gemv(x, w, config, up, scales, swiglu_out=swiglu_out) for w in weights])
             for config in candidates]
    with device_guard(x):  # the timer's spin and events go to the current device: x's
        timed = best_times(runs, rounds, time_ms, required=runs[0][0], what=f"paiton gemv on {x.device}")
    return [(config, ms / len(weights)) for config, ms in timed]


def chosen_launches() -> list[dict]:
    """What `choose` picked so far, one record per shape (for result files: which kernel ran
    each one-row product): its source ("table": backends/measured_gemv.py, or "timed") and,
    timed, the best times it saw; FP8 weights' records name the weight's dtype."""
    return [dict(device=key[0], n=key[1], k=key[2], row_stride=key[3], dtype=str(key[4]).removeprefix("torch."), gated=key[5],
                 **({"weight_dtype": str(key[6]).removeprefix("torch.")} if len(key) > 6 else {}),
                 choice=choice, **_TIMINGS.get(key, {})) for key, choice in _CHOICES.items()]


def describe_choices() -> list[str]:
    """A line per choice `choose` made (for logs: which launch ran each one-row product, from the
    card's table or timed, with the times it saw)."""
    lines = []
    for record in chosen_launches():
        weight = record.get("weight_dtype", record["dtype"])
        times = ", ".join(f"{key.removesuffix('_us')} {value:.1f} us" for key, value in record.items() if key.endswith("_us"))
        lines.append(f"[{record['n']} x {record['k']}] {weight}{' gated' if record['gated'] else ''}: {record['choice']} "
                     f"({record['source']}{'; ' + times if times else ''})")
    return lines


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, candidates: Sequence[dict[str, int]],
                   up: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] with one row @ weight.T (with `up`: silu(x) * up @ weight.T): Paiton's kernel
    or the vendor's GEMM, whichever `choose` found faster for this shape (the card's measured
    table, or a timing at first use)."""
    _check_inputs(x, weight, up)
    config = choose(x, weight, candidates, up=up)
    if config == VENDOR:
        return vendor_linear(x, weight, up)
    return _launch(x, weight, config, up)

"""Row-wise FP8 quantization, one Triton kernel: each row of x to e4m3 with one fp32 scale.

    absmax[m] = max_k |x[m, k]|                          # in fp32 (exact)
    scale[m]  = absmax[m] / largest   (1 for a row of zeros, so it comes back as zeros)
    q[m, k]   = fp8(clamp(x[m, k] / scale[m], -largest, largest))   # round to nearest even
    x ~ q * scale[:, None]

`largest` is the format's: 448 for float8_e4m3fn, 240 for float8_e4m3fnuz (the MI300X's).
The same rule quantizes a weight per output channel (fusion/fp8_linear.quantize_weight calls
the reference below) and a decode step's activations per token, for torch._scaled_mm's
row-wise scales (fusion/fp8_paths.py): there every linear of several rows would otherwise need
an amax, a division and a cast as separate kernels, each a round trip of the activations.

The kernel: BLOCK_ROWS rows a program (rms_norm's launch sizes: a row up to 16384 wide stays in
registers, read once; wider ones are read twice, the second time from L2). Divisions are
IEEE-rounded (tl.div_rn; Triton's `/` is an approximate division on NVIDIA), so scales and
FP8 values equal torch's bit for bit.

Under Triton's interpreter (the CPU tests) the fp32 -> FP8 cast rounds wrongly (Triton 3.9's
interpreter neither carries a rounded-up mantissa into the exponent, 124.9 -> 64, nor rounds
ties to even): ROUND_IN_FP32 rounds each value onto the FP8 grid in fp32 arithmetic first, so
the cast is exact. A GPU converts with its own instruction (cvt.rn.satfinite on NVIDIA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paiton.fusion.pdl import pdl_launch, wait_for_previous_kernel
from paiton.fusion.rms_norm import rms_norm_launch_config
from paiton.fusion.triton_utils import as_rows, device_guard, is_interpreted

FP8_LARGEST = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
# The exponent of each format's smallest normal value (below it the grid's step stays 2**(e - 3)).
FP8_MIN_EXPONENT = {torch.float8_e4m3fn: -6, torch.float8_e4m3fnuz: -7}


def quantize_rows_reference(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in `dtype` with x's shape, scales [rows] fp32): the rule of the module docstring, in
    torch (its cast rounds to nearest even)."""
    if dtype not in FP8_LARGEST:
        raise ValueError(f"FP8 formats are {', '.join(map(str, FP8_LARGEST))}; got {dtype}")
    largest = FP8_LARGEST[dtype]
    values = x.float()
    absmax = values.abs().amax(dim=-1) if x.shape[-1] else values.new_zeros(x.shape[:-1])
    scales = torch.where(absmax > 0, absmax / largest, torch.ones_like(absmax))
    quantized = (values / scales[..., None]).clamp(-largest, largest).to(dtype)
    return quantized, scales.contiguous()


@triton.jit
def _round_to_fp8_grid(v, MIN_EXPONENT: tl.constexpr):
    """v (fp32, within the format's range) rounded to nearest even on the e4m3 grid (3 mantissa
    bits: a step of 2**(e - 3) for |v| in [2**e, 2**(e + 1)), 2**(MIN_EXPONENT - 3) below the
    normals), in fp32: adding 1.5 * 2**23 steps puts the sum where fp32's own spacing is one
    step, so IEEE addition does the rounding, ties to even; subtracting it again is exact. The
    magnitude is rounded and v's sign bit put back (a value rounded to zero keeps its sign, as
    torch's cast keeps it, -0.0 included: an fp16 activation that underflowed)."""
    magnitude = tl.abs(v)
    exponent = tl.maximum(((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, MIN_EXPONENT)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    shift = step * 12582912.0
    rounded = (magnitude + shift) - shift
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _load_block(x_rows, cols, row_mask, n_cols):
    """One [rows, cols] block of x in fp32 (0 where masked) and its mask."""
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    return tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _row_scale(absmax, LARGEST: tl.constexpr):
    return tl.where(absmax > 0, tl.div_rn(absmax, LARGEST), 1.0)


@triton.jit
def _store_quantized(x, scale, q_ptrs, mask, LARGEST: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                     ROUND_IN_FP32: tl.constexpr):
    q = tl.minimum(tl.maximum(tl.div_rn(x, scale[:, None]), -LARGEST), LARGEST)
    if ROUND_IN_FP32:
        q = _round_to_fp8_grid(q, MIN_EXPONENT)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, stride_xm, LARGEST: tl.constexpr,
                          MIN_EXPONENT: tl.constexpr, ROUND_IN_FP32: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                          BLOCK_COLS: tl.constexpr, NUM_COL_BLOCKS: tl.constexpr, PDL: tl.constexpr = False):
    """Program i: rows i * BLOCK_ROWS + [0, BLOCK_ROWS) of x [n_rows, n_cols] (row stride
    stride_xm, unit column stride) to q [n_rows, n_cols] (contiguous) and scale [n_rows].
    NUM_COL_BLOCKS == 1: each row in registers, read once; more: pass 1 takes the absmax,
    pass 2 reads the row again and quantizes it. PDL: launched programmatically (fusion/pdl.py)."""
    wait_for_previous_kernel(PDL)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * n_cols
    if NUM_COL_BLOCKS == 1:
        cols = tl.arange(0, BLOCK_COLS)
        x, mask = _load_block(x_rows, cols, row_mask, n_cols)
        scale = _row_scale(tl.max(tl.abs(x), axis=1), LARGEST)
        _store_quantized(x, scale, q_rows + cols[None, :], mask, LARGEST, MIN_EXPONENT, ROUND_IN_FP32)
    else:
        absmax = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for block in range(NUM_COL_BLOCKS):
            x, _ = _load_block(x_rows, block * BLOCK_COLS + tl.arange(0, BLOCK_COLS), row_mask, n_cols)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        scale = _row_scale(absmax, LARGEST)
        for block in range(NUM_COL_BLOCKS):
            cols = block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            x, mask = _load_block(x_rows, cols, row_mask, n_cols)
            _store_quantized(x, scale, q_rows + cols[None, :], mask, LARGEST, MIN_EXPONENT, ROUND_IN_FP32)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


def quantize_rows_launch_config(n_rows: int, n_cols: int) -> dict[str, int]:
    """Block sizes and warps: rms_norm's (the same reduction over a row, then one elementwise
    pass): rows up to 16384 wide in registers, programs of at least 4096 elements."""
    return rms_norm_launch_config(n_rows, n_cols)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in `dtype` with x's shape, contiguous; scales [x.shape[:-1]] fp32): x [..., K]
    (float32/16 or bfloat16) quantized per row as the module docstring says, by the kernel on a
    GPU (or in Triton's interpreter), by quantize_rows_reference on a CPU otherwise.
    `config`: launch keywords (default quantize_rows_launch_config)."""
    if dtype not in FP8_LARGEST:
        raise ValueError(f"FP8 formats are {', '.join(map(str, FP8_LARGEST))}; got {dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() < 1:
        raise ValueError(f"paiton quantize_rows: x [..., K] in float32/16 or bfloat16; got {tuple(x.shape)} {x.dtype}")
    if x.device.type == "cpu" and not is_interpreted(_quantize_rows_kernel):
        return quantize_rows_reference(x, dtype)
    rows = as_rows(x)
    n_rows, n_cols = rows.shape
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return q, scales
    if n_cols == 0:
        return q, scales.fill_(1.0)
    launch = dict(config or quantize_rows_launch_config(n_rows, n_cols))
    with device_guard(x):
        _quantize_rows_kernel[(triton.cdiv(n_rows, launch["BLOCK_ROWS"]),)](
            rows, q, scales, n_rows, n_cols, rows.stride(0), LARGEST=FP8_LARGEST[dtype],
            MIN_EXPONENT=FP8_MIN_EXPONENT[dtype], ROUND_IN_FP32=is_interpreted(_quantize_rows_kernel), **launch,
            **pdl_launch(x, _quantize_rows_kernel))
    return q, scales

"""A few rows times an FP8 weight: y = x @ dequantize(W8).T for 2 to 64 rows (a decode step at
batch 2-64), as one Triton kernel that reads the FP8 weight once.

Why: at a handful of rows a product is still a read of its weight; dequantizing the weight to
bf16 first (a full write and re-read) and calling the vendor's GEMM would read three times the
FP8 weight's bytes, more than the bf16 model itself. Here each program takes BLOCK_N rows of W
in [BLOCK_N, BLOCK_K] tiles along K, converts them to x's dtype in registers (exact: every
e4m3 value is a bf16/fp16 value), and multiplies them with all of x's rows (BLOCK_M >= M, so
the grid spans N only and W is read once) with the chip's matrix instructions, accumulating in
fp32. Scales per output row multiply the fp32 sums at the end; per 128 x 128 block, each
128-wide K tile's partial product as it is added (BLOCK_K = 128: one scale block per tile).
The output is rounded to x's dtype once.

Under Triton's interpreter (CPU tests) a bf16 `tl.dot` is wrong (ENV_NOTES: bf16 held as
uint16): DOT_FP32 makes the products in fp32 there, as decode attention's kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paiton.fusion.gemv import BLOCK_SCALES, SCALE_BLOCK, scales_kind
from paiton.fusion.triton_utils import device_guard, is_interpreted

MAX_ROWS = 64  # above this, the dequantized weight and the vendor's GEMM (compute-bound prefill)


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, stride_sn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALES: tl.constexpr,
                     SCALE_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr):
    """Program (n, m): y[m rows, n rows of W] over all of K; see the module docstring."""
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + cols[None, :]
        x = tl.load(x_rows + k, mask=(rows_m[:, None] < M) & (k < K), other=0.0)
        w = tl.load(w_rows + k, mask=(rows_n[:, None] < N) & (k < K), other=0.0, eviction_policy="evict_first")
        w = w.to(x.dtype)  # exact: e4m3 values are bf16 and fp16 values
        if DOT_FP32:
            part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w))
        if SCALES == 2:  # this K tile lies in one scale block (BLOCK_K divides SCALE_BLOCK)
            block = tl.load(scale_ptr + (rows_n // SCALE_BLOCK) * stride_sn + start // SCALE_BLOCK, mask=rows_n < N, other=0.0)
            part *= block[None, :]
        acc += part
    if SCALES == 1:
        acc *= tl.load(scale_ptr + rows_n, mask=rows_n < N, other=0.0)[None, :]
    y = y_ptr + rows_m.to(tl.int64)[:, None] * stride_ym + rows_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rows_m[:, None] < M) & (rows_n[None, :] < N))


def fp8_gemm_config(rows: int) -> dict[str, int]:
    """Block sizes for `rows` rows of x: BLOCK_M the next power of two from 16 (tl.dot's smallest)
    up to 64, 64-row W tiles 128 wide (one scale block), 4 warps."""
    block_m = max(16, triton.next_power_of_2(rows))
    return dict(BLOCK_M=min(block_m, MAX_ROWS), BLOCK_N=64, BLOCK_K=SCALE_BLOCK, num_warps=4, num_stages=3)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [..., K] (any number of rows; BLOCK_M rows per program) @ dequantize(weight, scales).T
    in x's dtype. `config`: launch keywords (default fp8_gemm_config)."""
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"paiton fp8_gemm: x [..., K] and W [N, K] with unit stride along K; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)} strides {weight.stride()}")
    kind = scales_kind(weight, scales)
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        launch = dict(config or fp8_gemm_config(m))
        block_m, block_n = launch["BLOCK_M"], launch["BLOCK_N"]
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        with device_guard(x):
            _fp8_gemm_kernel[grid](rows, weight, scales, y, m, n, k, rows.stride(0), weight.stride(0), y.stride(0),
                                   scales.stride(0) if kind == BLOCK_SCALES else 0, SCALES=kind, SCALE_BLOCK=SCALE_BLOCK,
                                   DOT_FP32=is_interpreted(_fp8_gemm_kernel) or x.dtype == torch.float32, **launch)
    return y.reshape(*x.shape[:-1], n)


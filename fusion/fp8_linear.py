"""FP8 (e4m3) weights: quantizing, dequantizing, and the linear over packed FP8 weights.

A decode step at batch 1 reads every weight once, so its time is the weights' bytes over the
memory's bandwidth: e4m3 weights (one byte) halve the bf16 step's floor. Format per chip:
float8_e4m3fn (largest value 448) on NVIDIA sm_89 and newer; float8_e4m3fnuz (largest 240,
another exponent bias: the MI300X's format) on gfx942; sm_80 (A100) has no FP8 arithmetic and
no FP8 conversion in Triton: quantizing for it is an error that names the chip (backends/
lowering.py's table).

Scales: one fp32 per output channel (`absmax(W[n, :]) / largest`, what `quantize_fp8` makes),
or one per 128 x 128 block (public FP8 checkpoints' `weight_scale_inv`, loaded as they are).
W ~ W8 * scale, row by row or block by block.

Op: paiton::fp8_linear(x, [W8_1, ..., W8_n], [s_1, ..., s_n]) -> x @ dequantize(cat(W8_i), cat(s_i)).T
in x's dtype. Like paiton::packed_linear, the weights are consecutive row blocks of one
buffer (passes/merged_projections.py packs q/k/v and gate/up, and their scales, once) and the
op checks that they are. One row (a decode step at batch 1): Paiton's GEMV dequantizes in
registers, accumulates in fp32 and applies the scales to the sums (fusion/gemv.py, SCALES);
2 to 64 rows (decode at batch 2-64): Paiton's FP8 GEMM (fusion/fp8_gemm.py), which reads the
FP8 weight once and multiplies it in registers with the chip's matrix instructions; more rows
(prefill, compute-bound), or a chip without Paiton's kernels: the weight dequantized to x's
dtype, then torch's linear (weight-only FP8, correct everywhere). On CPU that is the
reference path, except under Triton's interpreter (the tests), where the kernels run.
Op: paiton::silu_mul_fp8_linear(gate, up, weights, scales): fp8_linear(silu_mul(gate, up), ...),
SwiGLU applied inside a one-row GEMV (passes/silu_mul_linear.py).
"""

from __future__ import annotations

import torch

from paiton.fusion.fp8_gemm import MAX_ROWS, fp8_gemm
from paiton.fusion.gemv import BLOCK_SCALES, FP8_DTYPES, ROW_SCALES, SCALE_BLOCK, scales_kind
from paiton.fusion.packed_linear import packed_weight
from paiton.fusion.swiglu import silu_mul
from paiton.fusion.triton_utils import is_interpreted

FP8_LARGEST = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
FP8_FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [N, K] in `dtype`, scales [N] fp32): per output channel, scale = absmax / largest
    (1 for an all-zero row), W8 = W / scale rounded to nearest (torch's cast)."""
    if dtype not in FP8_LARGEST:
        raise ValueError(f"FP8 formats are {', '.join(map(str, FP8_LARGEST))}; got {dtype}")
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight takes a 2-D weight [N, K], got {tuple(weight.shape)}")
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / FP8_LARGEST[dtype], torch.ones_like(absmax))
    quantized = (w / scales[:, None]).clamp(-FP8_LARGEST[dtype], FP8_LARGEST[dtype]).to(dtype)
    return quantized, scales.contiguous()


def dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W8 * scales in fp32, rounded to `dtype` once: per row ([N] or [N, 1]) or per 128 x 128
    block ([ceil(N / 128), ceil(K / 128)])."""
    kind = scales_kind(weight, scales)
    w = weight.float()
    if kind == ROW_SCALES:
        return (w * scales.reshape(-1, 1)).to(dtype)
    n, k = weight.shape
    full = scales.repeat_interleave(SCALE_BLOCK, 0)[:n].repeat_interleave(SCALE_BLOCK, 1)[:, :k]
    return (w * full).to(dtype)


def packed_scales(weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """The scales of packed weights as one tensor: row scales [sum N_i] or block scales
    [sum N_i / 128, K / 128], from consecutive blocks of one buffer (an error if they are not)."""
    if len(scales) != len(weights):
        raise ValueError(f"paiton fp8_linear: {len(weights)} weights and {len(scales)} scale tensors")
    kinds = {scales_kind(w, s) for w, s in zip(weights, scales)}
    if len(kinds) != 1:
        raise ValueError("paiton fp8_linear: the weights' scales must all be per row or all per block")
    if len(scales) == 1:
        return scales[0]
    if kinds == {BLOCK_SCALES} and any(w.shape[0] % SCALE_BLOCK for w in weights[:-1]):
        raise ValueError(f"paiton fp8_linear: block-scaled weights pack only in multiples of {SCALE_BLOCK} rows")
    rows = [s.reshape(s.shape[0], -1) for s in scales]  # [N_i, 1] or [B_i, Kb]: 2-D row blocks
    return packed_weight(rows).reshape(-1) if kinds == {ROW_SCALES} else packed_weight(rows)


def _check_inputs(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
    if not weights or any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        raise ValueError(f"paiton fp8_linear: x [..., K] and 2-D weights [N_i, K]; got {tuple(x.shape)}, "
                         f"{[tuple(w.shape) for w in weights]}")
    if any(w.dtype not in FP8_DTYPES or w.dtype != weights[0].dtype for w in weights):
        raise ValueError(f"paiton fp8_linear: the weights are all of one FP8 dtype; got {sorted({str(w.dtype) for w in weights})}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or any(w.device != x.device for w in weights):
        raise ValueError(f"paiton fp8_linear: x is float32/16 or bfloat16 on the weights' device; got {x.dtype} on {x.device}")
    if len(scales) != len(weights):
        raise ValueError(f"paiton fp8_linear: {len(weights)} weights and {len(scales)} scale tensors")
    for w, s in zip(weights, scales):
        scales_kind(w, s)


def _paiton_kernels(x: torch.Tensor) -> dict | None:
    """The chip's fp8_linear parameters if Paiton's kernels run for it (on CPU only under Triton's
    interpreter), else None."""
    from paiton.backends.lowering import INDUCTOR, lowering_for
    from paiton.backends.target import detect_target
    from paiton.fusion import gemv

    if x.device.type == "cpu":
        return {"one_row": gemv.INTERPRETER_CONFIG} if is_interpreted(gemv._gemv_kernel) else None
    lowering = lowering_for("fp8_linear", detect_target(x.device))
    return None if lowering.implementation == INDUCTOR else lowering.params


def _kernel_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, up: torch.Tensor | None = None):
    """The product through Paiton's kernels: one row, the GEMV; 2 to MAX_ROWS rows, the FP8 GEMM
    (SwiGLU applied first); None where neither runs (more rows, or no kernels on this chip)."""
    rows = x.numel() // max(x.shape[-1], 1)
    params = _paiton_kernels(x) if rows <= MAX_ROWS else None
    if params is None:
        return None
    if rows == 1:
        from paiton.fusion import gemv

        return gemv.launch_gemv(x, weight, params["one_row"], up=up, scales=scales)
    return fp8_gemm(x if up is None else silu_mul(x, up), weight, scales)


@torch.library.custom_op("paiton::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    _check_inputs(x, weights, scales)
    weight, scale = packed_weight(weights), packed_scales(weights, scales)
    y = _kernel_product(x, weight, scale)
    return y if y is not None else torch.nn.functional.linear(x, dequantize(weight, scale, x.dtype))


@fp8_linear.register_fake
def _fp8_linear_fake(x, weights, scales):
    _check_inputs(x, weights, scales)
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@torch.library.custom_op("paiton::silu_mul_fp8_linear", mutates_args=())
def silu_mul_fp8_linear(gate: torch.Tensor, up: torch.Tensor, weights: list[torch.Tensor],
                        scales: list[torch.Tensor]) -> torch.Tensor:
    """fp8_linear(silu_mul(gate, up), weights, scales), SwiGLU applied inside a one-row GEMV."""
    _check_inputs(gate, weights, scales)
    weight, scale = packed_weight(weights), packed_scales(weights, scales)
    if gate.shape == up.shape and gate.dtype == up.dtype:  # else silu_mul below raises the error
        y = _kernel_product(gate, weight, scale, up)
        if y is not None:
            return y
    return torch.nn.functional.linear(silu_mul(gate, up), dequantize(weight, scale, gate.dtype))


@silu_mul_fp8_linear.register_fake
def _silu_mul_fp8_linear_fake(gate, up, weights, scales):
    _check_inputs(gate, weights, scales)
    return gate.new_empty((*gate.shape[:-1], sum(w.shape[0] for w in weights)))

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
registers, accumulates in fp32 and applies the scales to the sums (fusion/gemv.py, SCALES).
Several rows (decode at batch 2 and more, prefill): one of three products, chosen per shape
among the chip's (fusion/fp8_paths.py, timed on the GPU once per shape): Paiton's FP8 GEMM
(2-64 rows: reads the FP8 weight once, multiplies in x's dtype on the matrix instructions),
torch._scaled_mm (activations quantized per token, FP8 x FP8 on the tensor cores), or the
weight dequantized to x's dtype and torch's linear (weight-only FP8, correct everywhere: the
only path on a chip without Paiton's kernels). On CPU that last one is the path, except
under Triton's interpreter (the tests), where the GEMV and the FP8 GEMM run.
Op: paiton::silu_mul_fp8_linear(gate, up, weights, scales): fp8_linear(silu_mul(gate, up), ...),
SwiGLU applied inside a one-row GEMV (passes/silu_mul_linear.py).
Op: paiton::fp8_linear_silu_mul(x, [W8_gate, W8_up], [s_gate, s_up]): silu_mul of
fp8_linear(x, ...)'s two halves, for 2-64 rows (a decode step's gate/up at batch 2-64,
passes/swiglu_out.py): the FP8 GEMM's launch applies SwiGLU in its last step where its choice
times that faster than the plain launch and silu_mul's kernel after it (fusion/few_rows_gemm.py
SWIGLU_OUT); the other paths run silu_mul's kernel after their product.
"""

from __future__ import annotations

import torch

from paiton.fusion.fp8_paths import DEQUANTIZE, FP8_GEMM, several_rows_product
from paiton.fusion.fp8_paths import dequantize  # noqa: F401  (the weights' inverse, beside quantize_weight)
from paiton.fusion.gemv import BLOCK_SCALES, FP8_DTYPES, ROW_SCALES, SCALE_BLOCK, scales_kind
from paiton.fusion.packed_linear import packed_weight
from paiton.fusion.quantize_rows import FP8_LARGEST, quantize_rows_reference  # noqa: F401  (FP8_LARGEST: exported)
from paiton.fusion.swiglu import silu_mul
from paiton.fusion.triton_utils import is_interpreted

FP8_FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [N, K] in `dtype`, scales [N] fp32): per output channel, scale = absmax / largest
    (1 for an all-zero row), W8 = W / scale rounded to nearest (torch's cast): the row rule of
    fusion/quantize_rows.py, which quantizes activations per token the same way."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight takes a 2-D weight [N, K], got {tuple(weight.shape)}")
    return quantize_rows_reference(weight, dtype)


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
    interpreter: the GEMV, the FP8 GEMM), else None."""
    from paiton.backends.lowering import INDUCTOR, lowering_for
    from paiton.backends.target import detect_target
    from paiton.fusion import gemv

    if x.device.type == "cpu":
        interpreted = is_interpreted(gemv._gemv_kernel)
        return {"one_row": gemv.INTERPRETER_CONFIG, "several_rows": (FP8_GEMM, DEQUANTIZE)} if interpreted else None
    lowering = lowering_for("fp8_linear", detect_target(x.device))
    return None if lowering.implementation == INDUCTOR else lowering.params


def one_row_launch(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, up: torch.Tensor | None,
                   params: dict | None) -> dict | None:
    """The GEMV launch (fusion/gemv.py) the product of x over this FP8 weight takes where x is one
    row and the chip has Paiton's kernels (`params`: _paiton_kernels(x)), else None: the table's
    untimed launch, or where it lists candidates (on a GPU) the one timed fastest for the shape
    at first use (never the vendor's GEMM: FP8 has none of one row)."""
    if x.numel() // max(x.shape[-1], 1) != 1 or params is None:
        return None
    if x.device.type != "cpu" and params.get("one_row_candidates"):
        from paiton.fusion import gemv

        return gemv.choose(x, weight, params["one_row_candidates"], up=up, scales=scales)
    return params["one_row"]


def _product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantize(weight, scales).T (with `up`: silu_mul(x, up) first): one row on a chip
    with Paiton's kernels, the GEMV (SwiGLU applied as it loads); otherwise the path
    fusion/fp8_paths.choose_path takes among the chip's (DEQUANTIZE alone without kernels)."""
    params = _paiton_kernels(x)
    launch = one_row_launch(x, weight, scales, up, params)
    if launch is not None:
        from paiton.fusion import gemv

        return gemv.launch_gemv(x, weight, launch, up=up, scales=scales)
    paths = params["several_rows"] if params is not None else (DEQUANTIZE,)
    return several_rows_product(x if up is None else silu_mul(x, up), weight, scales, paths)


@torch.library.custom_op("paiton::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    _check_inputs(x, weights, scales)
    return _product(x, packed_weight(weights), packed_scales(weights, scales))


@fp8_linear.register_fake
def _fp8_linear_fake(x, weights, scales):
    _check_inputs(x, weights, scales)
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@torch.library.custom_op("paiton::silu_mul_fp8_linear", mutates_args=())
def silu_mul_fp8_linear(gate: torch.Tensor, up: torch.Tensor, weights: list[torch.Tensor],
                        scales: list[torch.Tensor]) -> torch.Tensor:
    """fp8_linear(silu_mul(gate, up), weights, scales), SwiGLU applied inside a one-row GEMV."""
    _check_inputs(gate, weights, scales)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        silu_mul(gate, up)  # raises silu_mul's error for these inputs
    return _product(gate, packed_weight(weights), packed_scales(weights, scales), up)


@silu_mul_fp8_linear.register_fake
def _silu_mul_fp8_linear_fake(gate, up, weights, scales):
    _check_inputs(gate, weights, scales)
    return gate.new_empty((*gate.shape[:-1], sum(w.shape[0] for w in weights)))


def _check_gate_up(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
    _check_inputs(x, weights, scales)
    if len(weights) != 2 or weights[0].shape != weights[1].shape:
        raise ValueError(f"paiton fp8_linear_silu_mul: two weights of one shape, gate's and up's; got "
                         f"{[tuple(w.shape) for w in weights]}")


@torch.library.custom_op("paiton::fp8_linear_silu_mul", mutates_args=())
def fp8_linear_silu_mul(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """silu_mul(gate, up) of (gate, up) = fp8_linear(x, [W8_gate, W8_up], scales).chunk(2, -1),
    SwiGLU in the FP8 GEMM's last step where that is faster (module doc)."""
    _check_gate_up(x, weights, scales)
    weight, packed = packed_weight(weights), packed_scales(weights, scales)
    if x.numel() == x.shape[-1]:  # one row: the product as fp8_linear makes it, then silu_mul
        return silu_mul(*_product(x, weight, packed).chunk(2, dim=-1))
    params = _paiton_kernels(x)
    paths = params["several_rows"] if params is not None else (DEQUANTIZE,)
    return several_rows_product(x, weight, packed, paths, swiglu_out=True)


@fp8_linear_silu_mul.register_fake
def _fp8_linear_silu_mul_fake(x, weights, scales):
    _check_gate_up(x, weights, scales)
    return x.new_empty((*x.shape[:-1], weights[0].shape[0]))

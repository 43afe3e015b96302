"""A decode step's RMSNorms inside its one-row products: the norm in the product that reads its
output, the residual add in the product whose output it adds.

Why: at batch 1 a Qwen3 layer is four products with two fused add + RMSNorm kernels between
them (after o_proj, and after down_proj for the next layer). Each norm is a kernel of about
2 us plus its gap to the next, in a step whose products take the rest: Qwen3-32B's FP8 step
on an H100 spent 0.26 ms in its 129 norms (bench/results/NOTES.md, fifteenth session), which
an H200's faster memory does not shrink. Here the norm kernel goes away:

    summed, squares = paiton.linear_add(attn, None, [W_o], [], residual)   # attn @ W_o.T + residual
    out = paiton.rms_norm_linear(summed, squares, w_norm, eps, [W_gate, W_up], [])   # rms_norm(summed) @ W.T

(passes/norm_linear.py). The GEMV (fusion/gemv.py) adds the residual to its outputs as it
writes them (RESIDUAL) and leaves the sums of their squares, one per 4 outputs (SQUARES_OUT);
the product after the norm reads those sums (a few KB, loaded before its loop and added after
it), multiplies each piece of its input by the norm's weight as it loads it, and its row sums
by 1 / rms at the end (NORM).

Ops (each over packed weights as paiton.packed_linear, or FP8 weights with their scales as
paiton.fp8_linear: `scales` empty for a weight in x's dtype):
* paiton::rms_norm_linear(x, squares, norm_weight, eps, weights, scales) -> rms_norm(x) @ W.T
* paiton::linear_add(x, up, weights, scales, residual) -> (x @ W.T + residual, the partial sums
  of its squares) (with `up`: silu_mul(x, up) @ W.T + residual, the gated down_proj).

One row on a chip whose table has the one-row GEMV: one launch of it, with the launch the
unfused product of that shape runs (measured or timed; fusion/gemv.choose). Anywhere else
(several rows, the vendor's GEMM chosen for the shape, no GEMV on the chip): the unfused ops in
turn, so results are the same ops' results. Numerics: the residual add is eager's bit for bit;
the norm rounds in other places than eager's (fusion/gemv.py's NORM: about 2^-9 relative apart
in bf16), and its sum of squares is taken in another (fixed) order.
"""

from __future__ import annotations

import torch

from paiton.fusion import fp8_linear as _fp8_linear
from paiton.fusion import packed_linear as _packed_linear
from paiton.fusion import rms_norm as _rms_norm  # noqa: F401  (registers torch.ops.paiton.rms_norm)
from paiton.fusion.triton_utils import is_interpreted


def _check_product_inputs(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
    """packed_linear's checks, or fp8_linear's with `scales`."""
    if scales:
        _fp8_linear._check_inputs(x, weights, scales)
    else:
        _packed_linear._check_inputs(x, weights)


def _product_inputs(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]):
    """(the packed weight, its packed scales or None), after the checks of packed_linear or fp8_linear."""
    _check_product_inputs(x, weights, scales)
    packed_scales = _fp8_linear.packed_scales(weights, scales) if scales else None
    return _packed_linear.packed_weight(weights), packed_scales


def one_row_launch(x: torch.Tensor, weight: torch.Tensor, up: torch.Tensor | None = None,
                   scales: torch.Tensor | None = None) -> dict[str, int] | None:
    """The GEMV launch that the unfused product of one row runs for this weight (paiton.packed_linear's,
    silu_mul_packed_linear's or fp8_linear's choice), or None where that product is not Paiton's
    GEMV: several rows, a chip whose table has none, the vendor's GEMM chosen for the shape, a
    CPU outside Triton's interpreter."""
    from paiton.fusion import gemv

    if scales is not None:
        return _fp8_linear.one_row_launch(x, weight, scales, up, _fp8_linear._paiton_kernels(x))
    if x.numel() != x.shape[-1]:
        return None
    candidates = _packed_linear._table_candidates(x, "one_row_linear" if up is None else "silu_mul_linear")
    if not candidates:
        return None
    if x.device.type == "cpu":
        return gemv.INTERPRETER_CONFIG if is_interpreted(gemv._gemv_kernel) else None
    choice = gemv.choose(x, weight, candidates, up=up)
    return None if choice == gemv.VENDOR else choice


def _unfused_product(x: torch.Tensor, up: torch.Tensor | None, weights: list[torch.Tensor],
                     scales: list[torch.Tensor]) -> torch.Tensor:
    ops = torch.ops.paiton
    if scales:
        return ops.fp8_linear(x, weights, scales) if up is None else ops.silu_mul_fp8_linear(x, up, weights, scales)
    return ops.packed_linear(x, weights) if up is None else ops.silu_mul_packed_linear(x, up, weights)


def _output_shape(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[int, ...]:
    return (*x.shape[:-1], sum(w.shape[0] for w in weights))


@torch.library.custom_op("paiton::rms_norm_linear", mutates_args=())
def rms_norm_linear(x: torch.Tensor, squares: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """paiton.rms_norm(x, norm_weight, eps) @ W.T over packed (or FP8, with `scales`) weights,
    `squares` being what paiton.linear_add left beside x (partial sums of x's squares); the norm
    inside the one-row GEMV where the product is one (fusion/gemv.py's NORM: its rounding)."""
    from paiton.fusion import gemv

    weight, packed_scales = _product_inputs(x, weights, scales)
    fusable = (norm_weight.dtype == x.dtype and norm_weight.shape == (x.shape[-1],)  # else the unfused ops raise
               and norm_weight.device == squares.device == x.device)
    if fusable and squares.shape == (*x.shape[:-1], gemv.squares_count(x.shape[-1])) and squares.dtype == torch.float32:
        launch = one_row_launch(x, weight, scales=packed_scales)
        if launch is not None:
            return gemv.launch_gemv(x, weight, launch, scales=packed_scales, norm_weight=norm_weight,
                                    squares=squares.contiguous(), eps=eps)
    return _unfused_product(torch.ops.paiton.rms_norm(x, norm_weight, eps), None, weights, scales)


@rms_norm_linear.register_fake
def _rms_norm_linear_fake(x, squares, norm_weight, eps, weights, scales):
    _check_product_inputs(x, weights, scales)
    return x.new_empty(_output_shape(x, weights))


def sums_of_squares(y: torch.Tensor) -> torch.Tensor:
    """What the GEMV's SQUARES_OUT leaves for y, computed by torch (fp32, one sum per
    SQUARES_GRAIN values of the last dimension): linear_add's outputs where no GEMV runs."""
    from paiton.fusion import gemv

    n = y.shape[-1]
    squared = y.float().square()
    padded = torch.nn.functional.pad(squared, (0, gemv.squares_count(n) * gemv.SQUARES_GRAIN.value - n))
    return padded.reshape(*y.shape[:-1], gemv.squares_count(n), gemv.SQUARES_GRAIN.value).sum(-1)


@torch.library.custom_op("paiton::linear_add", mutates_args=())
def linear_add(x: torch.Tensor, up: torch.Tensor | None, weights: list[torch.Tensor], scales: list[torch.Tensor],
               residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y = x @ W.T + residual, partial sums of y's squares: [..., ceil(N / 4)] fp32) over packed
    (or FP8, with `scales`) weights; with `up`, silu_mul(x, up) @ W.T + residual (the gated
    down_proj). The add inside the one-row GEMV where the product is one, which also sums the
    squares the next norm needs (paiton.rms_norm_linear)."""
    from paiton.fusion import gemv

    weight, packed_scales = _product_inputs(x, weights, scales)
    _check_residual(x, weights, residual)
    fusable = residual.device == x.device
    if up is not None:
        fusable &= up.shape == x.shape and up.dtype == x.dtype and up.device == x.device
    if fusable:
        launch = one_row_launch(x, weight, up=up, scales=packed_scales)
        if launch is not None and launch["BLOCK_N"] % gemv.SQUARES_GRAIN.value == 0:
            return gemv.launch_gemv(x, weight, launch, up=up, scales=packed_scales, residual=residual, squares_out=True)
    summed = _unfused_product(x, up, weights, scales) + residual
    return summed, sums_of_squares(summed)


def _check_residual(x: torch.Tensor, weights: list[torch.Tensor], residual: torch.Tensor) -> None:
    """The residual has the product's shape and x's dtype: no broadcast, no promotion (the sum is
    the residual stream, whose shape and dtype do not change)."""
    if residual.shape != _output_shape(x, weights) or residual.dtype != x.dtype:
        raise ValueError(f"paiton linear_add: the residual is the product's shape {list(_output_shape(x, weights))} in "
                         f"x's dtype {x.dtype}; got {list(residual.shape)} {residual.dtype}")


@linear_add.register_fake
def _linear_add_fake(x, up, weights, scales, residual):
    from paiton.fusion import gemv

    _check_product_inputs(x, weights, scales)
    _check_residual(x, weights, residual)
    shape = _output_shape(x, weights)
    return x.new_empty(shape), x.new_empty((*shape[:-1], gemv.squares_count(shape[-1])), dtype=torch.float32)

"""One matrix product against weights packed as consecutive row blocks of one buffer.

Op: paiton::packed_linear(x, [W_1, ..., W_n]) -> x @ cat(W_1, ..., W_n).T, computed as ONE
GEMM against the [sum N_i, K] matrix the weights form when they lie, in this order, as
consecutive rows of one buffer that W_1 starts (passes/merged_projections.py packs q/k/v
and gate/up weights that way). No concatenation happens: the op checks that the weights are
packed and views the buffer.

Why an op rather than `linear(x, as_strided(W_1, ...))` in the graph: the graph is traced
before the weights are packed (packing changes their storage offsets, which the tracer has
already recorded), so the traced graph cannot look past W_1's own rows. The op's fake
implementation needs only shapes. Every weight is an argument, although only W_1's address
is used: each call checks that they are still packed (a parameter replaced after compiling is
an error, not a silently stale product), and CUDA graph trees see all of their addresses.
The product is the same cuBLAS / hipBLASLt call `linear` makes, except for an input of one
row (a decode step at batch 1) on a chip whose lowering table has a one-row linear: there it is
fusion/gemv.py's, Paiton's GEMV or the vendor's GEMM, whichever is faster for the shape (the
card's measured table in backends/measured_gemv.py, or a timing at first use); and for 2 to 64
rows (decode at batch 2-64) on a chip whose table has a few-rows linear: fusion/few_rows_gemm.py's
kernel or the vendor's GEMM, whichever was faster for the shape and row count, timed at first use.
passes/one_row_linear.py also sends single linears of a decode step here, as `packed_linear(x, [W])`.

Op: paiton::silu_mul_packed_linear(gate, up, [W_1, ...]) -> packed_linear(silu_mul(gate, up),
[W_1, ...]). For one row, on a chip whose table has a one-row linear, the GEMV applies SwiGLU
while it loads its input: down_proj at batch 1 without the silu_mul kernel before it
(passes/silu_mul_linear.py); for 2 to 64 rows, on a chip whose table has a few-rows linear, the
few-rows GEMM does the same where the timing finds it faster than silu_mul and the vendor's GEMM.
Otherwise it is the two ops in turn.

Op: paiton::packed_linear_silu_mul(x, [W_gate, W_up]) -> silu_mul(*packed_linear(x, [W_gate,
W_up]).chunk(2, -1)): SwiGLU on the gate/up product's halves, for 2 to 64 rows on a chip whose
table has a few-rows linear in the product's last step (fusion/few_rows_gemm.py SWIGLU_OUT) where
the timing finds it faster than the plain product and silu_mul's kernel after it
(passes/swiglu_out.py: a decode step's MLP at batch 2-64 without that kernel; its down_proj then
runs plain). Otherwise it is the two ops in turn.
"""

from __future__ import annotations

import torch

from paiton.fusion.swiglu import silu_mul
from paiton.fusion.triton_utils import is_interpreted


def packed_weight(weights: list[torch.Tensor]) -> torch.Tensor:
    """The [sum N_i, K] view of the buffer the weights are packed in; an error if they are not."""
    first = weights[0]
    in_features, start = first.shape[1], first.storage_offset()
    offset = start
    storage = first.untyped_storage().data_ptr()
    for index, w in enumerate(weights):
        if w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset or not w.is_contiguous():
            raise RuntimeError(
                f"paiton packed_linear: weight {index} {tuple(w.shape)} is not where the packed buffer has it "
                f"(expected rows {(offset - start) // max(in_features, 1)}.. of the buffer that weight 0 starts). Were the "
                "model's parameters replaced after compiling? Call torch._dynamo.reset() and compile again."
            )
        offset += w.numel()
    return first.as_strided(((offset - start) // in_features, in_features), (in_features, 1), start)


def _check_inputs(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    if not weights or any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        raise ValueError(
            f"paiton packed_linear: x [..., K] and 2-D weights [N_i, K]; got {tuple(x.shape)}, "
            f"{[tuple(w.shape) for w in weights]}"
        )
    if any(w.dtype != x.dtype or w.device != x.device for w in weights):
        raise ValueError(f"paiton packed_linear: x and the weights need one dtype and device; got {x.dtype}, "
                         f"{sorted({str(w.dtype) for w in weights})}")


def _table_candidates(x: torch.Tensor, op: str) -> tuple | None:
    """The launches of Paiton's kernel to time for `op` (one_row_linear, silu_mul_linear,
    few_rows_linear) on x's chip, or None where the chip's table leaves `op` to the
    vendor/Inductor."""
    from paiton.backends.lowering import INDUCTOR, lowering_for
    from paiton.backends.target import detect_target

    lowering = lowering_for(op, detect_target(x.device))
    return None if lowering.implementation == INDUCTOR else lowering.params.get("candidates", ())


def _one_row_gemv(x: torch.Tensor, weight: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor | None:
    """The product through fusion/gemv.py where x is one row and the chip's table has a one-row
    linear (on CPU only under Triton's interpreter, for the tests); else None."""
    if x.numel() != x.shape[-1]:
        return None
    candidates = _table_candidates(x, "one_row_linear" if up is None else "silu_mul_linear")
    if not candidates:
        return None
    from paiton.fusion import gemv

    if x.device.type != "cpu":
        return gemv.one_row_linear(x, weight, candidates, up=up)
    if is_interpreted(gemv._gemv_kernel):
        return gemv.launch_gemv(x, weight, gemv.INTERPRETER_CONFIG, up=up)
    return None


def _several_rows(x: torch.Tensor, weight: torch.Tensor, up: torch.Tensor | None = None,
                  swiglu_out: bool = False) -> torch.Tensor:
    """x @ weight.T (with `up`: silu_mul(x, up) @ weight.T; with `swiglu_out`: silu_mul of the
    gate/up product's halves) for x of any number of rows but one: for 2 to 64 rows on a chip
    whose table has a few-rows linear, fusion/few_rows_gemm.py's choice, the gated one applying
    SwiGLU as it loads x, the swiglu_out one in its last step (on CPU only under Triton's
    interpreter, for the tests); otherwise torch's linear (with silu_mul before or after)."""
    from paiton.fusion import few_rows_gemm

    rows = x.numel() // max(x.shape[-1], 1)
    runs_here = x.device.type != "cpu" or is_interpreted(few_rows_gemm._few_rows_gemm_kernel)
    if 1 < rows <= few_rows_gemm.MAX_ROWS and runs_here:
        candidates = _table_candidates(x, "few_rows_linear")
        if candidates is not None:
            return few_rows_gemm.few_rows_linear(x, weight, candidates, up=up, swiglu_out=swiglu_out)
    if swiglu_out:
        return few_rows_gemm.vendor_swiglu_out(x, weight)
    return torch.nn.functional.linear(x if up is None else silu_mul(x, up), weight)


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T: the one-row GEMV's choice for one row, else _several_rows'."""
    y = _one_row_gemv(x, weight)
    return y if y is not None else _several_rows(x, weight)


@torch.library.custom_op("paiton::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    _check_inputs(x, weights)
    return _product(x, packed_weight(weights))


@packed_linear.register_fake
def _packed_linear_fake(x, weights):
    _check_inputs(x, weights)
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@torch.library.custom_op("paiton::silu_mul_packed_linear", mutates_args=())
def silu_mul_packed_linear(gate: torch.Tensor, up: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """packed_linear(silu_mul(gate, up), weights), SwiGLU applied inside a one-row GEMV or a
    few-rows GEMM."""
    _check_inputs(gate, weights)
    weight = packed_weight(weights)
    if gate.shape != up.shape or gate.dtype != up.dtype:  # silu_mul raises the error
        return _several_rows(silu_mul(gate, up), weight)
    y = _one_row_gemv(gate, weight, up)
    return y if y is not None else _several_rows(gate, weight, up)


@silu_mul_packed_linear.register_fake
def _silu_mul_packed_linear_fake(gate, up, weights):
    _check_inputs(gate, weights)
    return gate.new_empty((*gate.shape[:-1], sum(w.shape[0] for w in weights)))


def _check_gate_up(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    _check_inputs(x, weights)
    if len(weights) != 2 or weights[0].shape != weights[1].shape:
        raise ValueError(f"paiton packed_linear_silu_mul: two weights of one shape, gate's and up's; got "
                         f"{[tuple(w.shape) for w in weights]}")


@torch.library.custom_op("paiton::packed_linear_silu_mul", mutates_args=())
def packed_linear_silu_mul(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """silu_mul(gate, up) of (gate, up) = packed_linear(x, [W_gate, W_up]).chunk(2, -1), SwiGLU
    in a few-rows GEMM's last step where that is faster (module doc)."""
    _check_gate_up(x, weights)
    weight = packed_weight(weights)
    if x.numel() == x.shape[-1]:  # one row: the product as packed_linear makes it, then silu_mul
        return silu_mul(*_product(x, weight).chunk(2, dim=-1))
    return _several_rows(x, weight, swiglu_out=True)


@packed_linear_silu_mul.register_fake
def _packed_linear_silu_mul_fake(x, weights):
    _check_gate_up(x, weights)
    return x.new_empty((*x.shape[:-1], weights[0].shape[0]))

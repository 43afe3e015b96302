"""SwiGLU on a decode step's gate/up product at batch 2-64 -> one `paiton.packed_linear_silu_mul` op
(FP8 weights: `paiton.fp8_linear_silu_mul`).

At batch 2 to 64 a decode step's MLP is (after the merged projections, few-rows linear and
SwiGLU passes)::

    gate_up = paiton.packed_linear(x, [W_gate, W_up])          # [..., 1, 2I]
    act = paiton.silu_mul(narrow(gate_up, -1, 0, I), narrow(gate_up, -1, I, I))
    out = paiton.packed_linear(act, [W_down])

Fused::

    act = paiton.packed_linear_silu_mul(x, [W_gate, W_up])
    out = paiton.packed_linear(act, [W_down])

Why: silu_mul is a kernel of its own between the two products, about 2.5 us a layer at
Qwen3-32B's batch 32 on an H100 (162 us of a 24.4 ms step; bench/results/NOTES.md, thirty-first
session). The few-rows GEMM (fusion/few_rows_gemm.py SWIGLU_OUT) can pair each gate row with its
up row in one program and apply SwiGLU once per output after the sums. The other place for it,
down_proj's loads (passes/silu_mul_linear.py's gated product), recomputes SwiGLU in each of
down_proj's 80-320 programs and lost to silu_mul + a plain product at every row count timed on an
H100 (3862dd6); at one row it stays there (the GEMV's gated loads win at batch 1). The op's
launcher still times the plain product followed by silu_mul's kernel against the fused launch
(few_rows_gemm.swiglu_out_forms), so a card where the fused loop is slower keeps the two kernels.
On an H100 the fused launch won at Qwen3-32B's gate/up at 2-64 rows (3-10 us a layer), and the
batch-32 decode step went from 24.53 to 24.31 ms (bench/results/NOTES.md, thirty-second session).

FP8 weights (models/fp8.py) make the same graph with `paiton.fp8_linear(x, [W8_gate, W8_up],
[s_gate, s_up])` as the product: the FP8 GEMM's launch takes SWIGLU_OUT as the bf16 one does,
timed against itself plain + silu_mul (fusion/fp8_paths.py's FP8_GEMM path; the other FP8 paths
run silu_mul's kernel after their product). Why for FP8 too: the activations are bf16 either way,
so the silu_mul kernel it saves costs what bf16's does (2.5 us a layer at 32B's batch 32), against
a gate/up product of half the bytes. On an H100 (bfcbe2d) 32B's FP8 gate/up at 32 rows took 106.8
us fused against 107.6 plain + silu_mul, and the batch-32 FP8 decode step went from 16.25 to 15.98
ms (bench/results/NOTES.md, thirty-third session).

Runs after SwiGLUPass and before SiluMulLinearPass on the ATen graph. Rewritten: a silu_mul
whose gate and up are the two halves (narrows of the last dim, gate first) of one packed_linear
or fp8_linear of two equal weights, of a decode step's rows (passes/few_rows_linear.py's
is_decode_rows: [..., 1, K], 2-64 rows or a dynamic batch), where the halves and the product
have no other users. Left alone: one row (the GEMV's gated down_proj), prefill rows, halves used
elsewhere or in the other order (silu of the second half), anything but the product's two
halves. On chips whose lowering table leaves few-rows linears to the vendor (AMD) the pass does
not run.
"""

from __future__ import annotations

import torch

from paiton.passes.decode_attention import bound_args, is_call, val
from paiton.passes.few_rows_linear import is_decode_rows
from paiton.passes.paiton_pass import PaitonPass

aten = torch.ops.aten


def narrowed_range(node) -> tuple[torch.fx.Node, int, int] | None:
    """(the tensor, start, end) of a narrow, or a slice of step 1, of the last dimension (static
    bounds); else None."""
    if not is_call(node, aten.slice.Tensor, aten.narrow.default):
        return None
    args = bound_args(node)  # (a slice's omitted arguments: its schema's defaults)
    source, dim, start = args["self"], args["dim"], args["start"]
    if is_call(node, aten.slice.Tensor):
        end, step = args["end"], args["step"]
    else:
        end, step = (start + args["length"] if isinstance(start, int) and isinstance(args["length"], int) else None), 1
    value = val(source)
    if not isinstance(value, torch.Tensor) or not isinstance(value.shape[-1], int):
        return None
    width = value.shape[-1]
    start, end = 0 if start is None else start, width if end is None else end
    if not all(isinstance(v, int) for v in (dim, start, end, step)) or step != 1 or dim not in (-1, value.dim() - 1):
        return None
    return source, start, min(end, width)


class SwiGLUOutPass(PaitonPass):
    """`options={"paiton.swiglu_out": False}` switches it off."""

    name = "swiglu_out"
    fused_op = "few_rows_linear"
    depends_on = ("paiton.fusion.packed_linear", "paiton.fusion.fp8_linear", "paiton.passes.decode_attention",
                  "paiton.passes.few_rows_linear")

    def apply(self, graph: torch.fx.Graph) -> int:
        import paiton.fusion.fp8_linear  # noqa: F401  (registers the ops)
        import paiton.fusion.packed_linear  # noqa: F401
        import paiton.fusion.swiglu  # noqa: F401

        ops = torch.ops.paiton
        fused_ops = {ops.packed_linear.default: ops.packed_linear_silu_mul.default,
                     ops.fp8_linear.default: ops.fp8_linear_silu_mul.default}
        rewritten = 0
        for node in list(graph.nodes):
            if not is_call(node, torch.ops.paiton.silu_mul.default):
                continue
            swiglu = bound_args(node)
            halves = [narrowed_range(swiglu[name]) for name in ("gate", "up")]
            if None in halves or halves[0][0] is not halves[1][0]:
                continue
            product = halves[0][0]
            fused_op = fused_ops.get(product.target) if product.op == "call_function" else None
            if fused_op is None:
                continue
            args = bound_args(product)
            weights = args["weights"]
            if len(weights) != 2 or not all(isinstance(val(w), torch.Tensor) for w in weights):
                continue
            inner = val(weights[0]).shape[0]
            if val(weights[1]).shape != val(weights[0]).shape or [h[1:] for h in halves] != [(0, inner), (inner, 2 * inner)]:
                continue
            half_nodes = {swiglu["gate"], swiglu["up"]}
            if set(product.users) != half_nodes or any(set(h.users) != {node} for h in half_nodes):
                continue
            if not is_decode_rows(val(args["x"])):
                continue
            operands = (args["x"], weights) + ((args["scales"],) if "scales" in args else ())
            with graph.inserting_before(node):
                fused = graph.call_function(fused_op, operands)
            fused.meta.update({key: value for key, value in node.meta.items() if key != "eager_input_vals"})
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            for half in half_nodes:
                graph.erase_node(half)
            graph.erase_node(product)
            rewritten += 1
        return rewritten

"""SwiGLU feeding a decode step's product -> one `paiton.silu_mul_packed_linear` op.

At batch 1 to 64 a decode step's MLP ends in (after the SwiGLU and one-row / few-rows linear
passes)::

    act = paiton.silu_mul(gate, up)              # gate, up: halves of the gate/up product
    out = paiton.packed_linear(act, [W_down])    # Paiton's GEMV (one row) or few-rows GEMM

Fused::

    out = paiton.silu_mul_packed_linear(gate, up, [W_down])

The GEMV (fusion/gemv.py) or the few-rows GEMM (fusion/few_rows_gemm.py), both GATED, computes
silu(gate) * up as it loads its input, rounded as silu_mul rounds it, so the step loses one
kernel launch per layer and the write and re-read of the activation; at 2-64 rows where the
timing finds that faster than silu_mul and then the vendor's GEMM or the same kernel plain (a
choice of its own per shape and rows, so the plain form stays where it is faster).
Runs after SwiGLUPass on the ATen graph. Rewritten: a silu_mul whose only user is a
packed_linear of one row (every leading dimension static and 1) or of a decode step's few rows
(passes/few_rows_linear.py's is_decode_rows: [..., 1, K], 2-64 rows or a dynamic batch), or an
fp8_linear of one row (FP8 weights: -> `paiton.silu_mul_fp8_linear`, the FP8 GEMV gated). Left
alone: an fp8_linear of several rows (fusion/fp8_linear.py's products take no gate), other row
counts (prefill), an activation with other users (it must exist anyway), a product fed by
anything else. On chips whose lowering table leaves one-row linears to Inductor (AMD) the pass
does not run. At 2-64 rows passes/swiglu_out.py runs first and takes the silu_mul of a merged
gate/up product's halves (SwiGLU in that product's last step); this pass gets the few-rows ones it
leaves (gate and up not merged, or that pass switched off).
"""

from __future__ import annotations

import torch

from paiton.passes.decode_attention import bound_args, is_call, val
from paiton.passes.few_rows_linear import is_decode_rows
from paiton.passes.one_row_linear import is_one_row
from paiton.passes.paiton_pass import PaitonPass


class SiluMulLinearPass(PaitonPass):
    name = "silu_mul_linear"
    fused_op = "silu_mul_linear"
    depends_on = ("paiton.fusion.packed_linear", "paiton.passes.decode_attention", "paiton.passes.one_row_linear",
                  "paiton.passes.few_rows_linear")

    def apply(self, graph: torch.fx.Graph) -> int:
        import paiton.fusion.fp8_linear  # noqa: F401  (registers the ops)
        import paiton.fusion.packed_linear  # noqa: F401

        rewritten = 0
        for node in list(graph.nodes):
            fp8 = is_call(node, torch.ops.paiton.fp8_linear.default)
            if not (fp8 or is_call(node, torch.ops.paiton.packed_linear.default)):
                continue
            # By schema name: the pattern matcher's replacements pass arguments as keywords.
            product = bound_args(node)
            act = product["x"]
            if not is_call(act, torch.ops.paiton.silu_mul.default) or len(act.users) != 1:
                continue
            if not (is_one_row(val(act)) or (not fp8 and is_decode_rows(val(act)))):
                continue
            swiglu = bound_args(act)
            with graph.inserting_before(node):
                if fp8:  # FP8 weights (models/fp8.py): the FP8 GEMV, gated
                    fused = graph.call_function(torch.ops.paiton.silu_mul_fp8_linear.default,
                                                (swiglu["gate"], swiglu["up"], product["weights"], product["scales"]))
                else:
                    fused = graph.call_function(torch.ops.paiton.silu_mul_packed_linear.default,
                                                (swiglu["gate"], swiglu["up"], product["weights"]))
            # The product's metadata (its value, source), less the inputs eager saw for packed_linear's
            # schema: Inductor would lay this op's arguments out by those.
            fused.meta.update({key: value for key, value in node.meta.items() if key != "eager_input_vals"})
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            graph.erase_node(act)
            rewritten += 1
        return rewritten


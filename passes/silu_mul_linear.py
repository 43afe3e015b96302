"""SwiGLU feeding a one-row product -> one `paiton.silu_mul_packed_linear` op.

At batch 1 a decode step's MLP ends in (after the SwiGLU and one-row linear passes)::

    act = paiton.silu_mul(gate, up)              # gate, up: halves of the gate/up product
    out = paiton.packed_linear(act, [W_down])    # one row: Paiton's GEMV

Fused::

    out = paiton.silu_mul_packed_linear(gate, up, [W_down])

The GEMV computes silu(gate) * up as it loads its input (fusion/gemv.py, GATED), rounded as
silu_mul rounds it, so the step loses one kernel launch per layer and the write and re-read of
the activation. Runs after SwiGLUPass on the ATen graph. Rewritten: a silu_mul whose only user
is a packed_linear of one row (every leading dimension static and 1), or an fp8_linear of one
row (FP8 weights: -> `paiton.silu_mul_fp8_linear`, the FP8 GEMV gated). Left alone: several
rows or a dynamic row count (the GEMV is for one row; a GEMM gains nothing here), an
activation with other users (it must exist anyway), a packed_linear fed by anything else. On
chips whose lowering table leaves one-row linears to Inductor (AMD) the pass does not run.
"""

from __future__ import annotations

import torch

from paiton.passes.decode_attention import bound_args, is_call, val
from paiton.passes.one_row_linear import is_one_row
from paiton.passes.paiton_pass import PaitonPass


class SiluMulLinearPass(PaitonPass):
    name = "silu_mul_linear"
    fused_op = "silu_mul_linear"
    depends_on = ("paiton.fusion.packed_linear", "paiton.passes.decode_attention", "paiton.passes.one_row_linear")

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
            if not is_call(act, torch.ops.paiton.silu_mul.default) or len(act.users) != 1 or not is_one_row(val(act)):
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


"""All-reduce + residual add + RMSNorm -> one `paiton.all_reduce_add_rms_norm` op (tensor parallel).

After the fused add + RMSNorm pass, a tensor-parallel decoder layer (models/tensor_parallel.py)
reads, after each row-parallel product::

    summed = wait_tensor(all_reduce(partial, "sum", group))          # torch's functional collective
    out, residual = paiton.fused_add_rms_norm(summed, residual, w, eps)

Fused::

    out, residual = paiton.all_reduce_add_rms_norm(partial, residual, w, eps, group)

(fusion/all_reduce_add_rms_norm.py): the norm kernel runs on the reduced buffer right after the
collective, nothing between. Rewritten: a fused_add_rms_norm one of whose two inputs (the add
is either way round) is the wait_tensor of a "sum" all_reduce used by nothing else. Left alone: another reduction (avg,
max), an all-reduce result read elsewhere too, an add of a tensor that was not all-reduced.
"""

from __future__ import annotations

import torch

from paiton.passes.decode_attention import bound_args, is_call
from paiton.passes.paiton_pass import PaitonPass


class AllReduceAddRMSNormPass(PaitonPass):
    name = "all_reduce_add_rms_norm"
    fused_op = "all_reduce_add_rms_norm"
    depends_on = ("paiton.fusion.all_reduce_add_rms_norm", "paiton.passes.decode_attention")

    def apply(self, graph: torch.fx.Graph) -> int:
        import paiton.fusion.all_reduce_add_rms_norm  # noqa: F401  (registers the op)

        functional = torch.ops._c10d_functional
        rewritten = 0
        for node in list(graph.nodes):
            if not is_call(node, torch.ops.paiton.fused_add_rms_norm.default):
                continue
            args = bound_args(node)
            # Either operand of the add: transformers writes `residual + attn_output` (x + r is r + x exactly).
            for waited, other in ((args["x"], args["residual"]), (args["residual"], args["x"])):
                reduce = waited.args[0] if is_call(waited, functional.wait_tensor.default) else None
                if len(waited.users) == 1 and is_call(reduce, functional.all_reduce.default) and len(reduce.users) == 1:
                    break
            else:
                continue
            partial, op, group_name = reduce.args[:3]
            if op != "sum" or not isinstance(group_name, str):
                continue
            with graph.inserting_before(node):
                fused = graph.call_function(torch.ops.paiton.all_reduce_add_rms_norm.default,
                                            (partial, other, args["weight"], args["eps"], group_name))
            fused.meta.update({key: value for key, value in node.meta.items() if key != "eager_input_vals"})
            node.replace_all_uses_with(fused)
            for dead in (node, waited, reduce):
                graph.erase_node(dead)
            rewritten += 1
        return rewritten


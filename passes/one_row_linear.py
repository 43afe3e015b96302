"""Linears whose input is one row -> paiton.packed_linear(x, [W]), whose one-row lowering is
Paiton's GEMV.

At batch 1 a decode step's linears multiply one row by a weight: a matrix-vector product,
bound by reading the weight. The merged projections (q/k/v, gate/up) already go through
paiton.packed_linear; this pass sends the others there too (o_proj, down_proj, and the lm_head
on the last position), so the op's one-row path (fusion/gemv.py: Paiton's kernel or the
vendor's GEMM, whichever is faster for the shape, measured or timed) applies to every weight of
the step. Without it, Inductor turns a one-row `mm` into its own reduction kernel, which ran
o_proj and down_proj at 55-80% of the copy rate on an H200 (bench/results/NOTES.md).

Like merged_projections, it runs on Dynamo's graph (the one place where a weight is known to be
a parameter) and after it. Rewritten: `linear(x, W)` without bias, W a 2-D `nn.Parameter`
input with unit stride along K, x of W's dtype with exactly one row (every leading dimension
static and 1). Left alone: a bias, several rows (prefill, batch > 1) or a dynamic row count,
a weight computed in the graph or not a parameter, graphs under autocast. On chips whose
lowering table leaves one-row linears to Inductor (AMD, until timed there) the pass does not
run.
"""

from __future__ import annotations

import torch

from paiton.passes.merged_projections import (
    _linear_weight,
    _placeholders,
    _set_example_values,
    _uses_autocast,
    finish_rewrite,
)


class LinearToPackedLinearPass:
    """Runs on Dynamo's graph with the example inputs: linears whose input `takes` -> packed_linear
    (x, [W]). Subclasses say which inputs (`takes`) and name the pass."""

    name = ""
    fused_op = ""

    def takes(self, x) -> bool:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> int:
        import paiton.fusion.packed_linear  # noqa: F401  (registers torch.ops.paiton.packed_linear)

        if _uses_autocast(gm.graph):
            return 0
        inputs = {node: value for node, value in zip(_placeholders(gm.graph), example_inputs)}
        rewritten = 0
        for node in list(gm.graph.nodes):
            weight = _linear_weight(node, inputs)
            if weight is None or weight.stride(1) != 1:
                continue
            x = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
            if not isinstance(x, torch.Tensor) or x.shape[-1] != weight.shape[1] or not self.takes(x):
                continue
            with gm.graph.inserting_before(node):
                product = gm.graph.call_function(torch.ops.paiton.packed_linear.default, (node.args[0], [node.args[1]]))
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
            _set_example_values([product])
            rewritten += 1
        return finish_rewrite(gm, rewritten)

    def after_compile(self) -> None:
        """Nothing to do: single weights need no packing."""


class OneRowLinearPass(LinearToPackedLinearPass):
    """`options={"paiton.one_row_linear": False}` switches it off."""

    name = "one_row_linear"
    fused_op = "one_row_linear"

    def takes(self, x) -> bool:
        return is_one_row(x)


def is_one_row(value) -> bool:
    """A tensor (or fake tensor) of one row: every leading dimension static and 1."""
    if not isinstance(value, torch.Tensor) or value.dim() < 1:
        return False
    return all(isinstance(size, int) and size == 1 for size in value.shape[:-1])

"""Linears of a decode step at batch 2 to 64 -> paiton.packed_linear(x, [W]), whose lowering
for 2-64 rows is Paiton's few-rows GEMM or the vendor's, whichever was faster for the shape.

At a few rows a decode step's linears are still reads of their weights (fusion/few_rows_gemm.py
says why a kernel that reads W once beats cuBLAS there). The merged projections (q/k/v,
gate/up) already go through paiton.packed_linear; this pass sends o_proj, down_proj and the
lm_head of a decode step there too, as passes/one_row_linear.py does at batch 1.

A decode step's input: x [..., 1, K], a single position per sequence, with at least one more
leading dimension: a static row count of 2 to 64 (a loop's fixed batch), or a symbolic one (a
graph compiled for every batch size, as the serving engine's; the op takes torch's linear at
run time above 64 rows). Left alone: one row (one_row_linear's), a sequence dimension other
than a static 1 (prefill: [1, T, K]), a static row count over 64, 2-D inputs, a bias, a weight
computed in the graph or not a parameter, graphs under autocast. On chips whose lowering table
leaves these linears to Inductor (AMD, until timed there) the pass does not run.
"""

from __future__ import annotations

import math

import torch

from paiton.fusion.few_rows_gemm import MAX_ROWS
from paiton.passes.one_row_linear import LinearToPackedLinearPass, is_one_row


class FewRowsLinearPass(LinearToPackedLinearPass):
    """`options={"paiton.few_rows_linear": False}` switches it off."""

    name = "few_rows_linear"
    fused_op = "few_rows_linear"

    def takes(self, x) -> bool:
        return is_decode_rows(x)


def is_decode_rows(value) -> bool:
    """A decode step's input of several rows: [..., 1, K] with a static 1 as its position
    dimension and leading dimensions that are symbolic or multiply to 2..MAX_ROWS."""
    if not isinstance(value, torch.Tensor) or value.dim() < 3 or is_one_row(value):
        return False
    positions, leading = value.shape[-2], value.shape[:-2]
    if not (isinstance(positions, int) and positions == 1):
        return False
    if all(isinstance(size, int) for size in leading):
        return 1 < math.prod(leading) <= MAX_ROWS
    return True

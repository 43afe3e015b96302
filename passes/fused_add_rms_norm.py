"""Residual add followed by RMSNorm -> one `paiton.fused_add_rms_norm` op.

Unfused (every Qwen3 decoder layer's post-attention norm, the next layer's input norm, and
the final norm)::

    summed = add(x, residual)
    out    = <RMSNorm of summed, any form passes/rms_norm.py matches>
    ... users of out, users of summed (the residual stream)

Fused::

    out, summed = paiton.fused_add_rms_norm(x, residual, weight, eps)

The kernel reads x and residual once and writes both outputs: the sum is not re-read from
memory for the norm. Runs before the plain RMSNorm pass, whose pattern is a subset of this
one. Left alone: an add that broadcasts (shapes differ), mixed dtypes, and every near miss of
the RMSNorm pattern.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass

from paiton.passes.matcher_utils import bound_value, is_python_number, register_fusion, same_shape
from paiton.passes.paiton_pass import PatternFusionPass
from paiton.passes.rms_norm import FUSED_DTYPES, normable, rms_norm_variants


def make_add_rms_norm(rms_norm):
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        summed = x + residual
        return rms_norm(summed, weight, eps), summed

    add_rms_norm.__name__ = f"add_{rms_norm.__name__}"
    return add_rms_norm


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    out, summed = torch.ops.paiton.fused_add_rms_norm(x, residual, weight, eps)
    return out, summed


class FusedAddRMSNormPass(PatternFusionPass):
    name = "fused_add_rms_norm"
    fused_op = "fused_add_rms_norm"
    depends_on = PatternFusionPass.depends_on + ("paiton.fusion.rms_norm", "paiton.passes.rms_norm")

    @classmethod
    def register_patterns(cls, pm_pass: PatternMatcherPass, key=None) -> None:
        import paiton.fusion.rms_norm  # noqa: F401  (registers torch.ops.paiton.fused_add_rms_norm)

        for dtype in FUSED_DTYPES:

            def extra_check(match: Match, dtype=dtype) -> bool:
                x, residual = bound_value(match, "x"), bound_value(match, "residual")
                return (
                    is_python_number(bound_value(match, "eps"))
                    and normable(x, bound_value(match, "weight"), dtype)
                    and isinstance(residual, torch.Tensor)
                    and residual.dtype == dtype
                    and same_shape(x, residual)
                )

            example_inputs = [torch.empty(2, 16, dtype=dtype), torch.empty(2, 16, dtype=dtype), torch.empty(16, dtype=dtype)]
            for rms_norm in rms_norm_variants():
                register_fusion(
                    pm_pass,
                    make_add_rms_norm(rms_norm),
                    fused_add_rms_norm,
                    example_inputs,
                    scalars=["eps"],
                    extra_check=extra_check,
                )

"""SwiGLU's elementwise half -> one `paiton.silu_mul` op.

Unfused, Qwen3MLP's `act_fn(gate_proj(x)) * up_proj(x)` after Inductor's decompositions
(bf16/fp16; fp32 has no casts)::

    g   = convert_element_type(gate, float32)
    s   = convert_element_type(div(g, add(exp(neg(g)), 1)), gate.dtype)     # silu
    out = mul(s, up)                                                         # or mul(up, s)

Fused::

    out = paiton.silu_mul(gate, up)

gate and up are whatever feeds the pattern: two matmul outputs, or two column slices of the
merged gate/up matmul (which the kernel reads in place). Left alone: gate and up of different
shapes (broadcasting) or dtypes, another activation, the multiply before the cast.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass

from paiton.passes.matcher_utils import bound_value, register_fusion, same_shape
from paiton.passes.paiton_pass import PatternFusionPass
from paiton.passes.rms_norm import FUSED_DTYPES


def silu_times_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def up_times_silu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return up * torch.nn.functional.silu(gate)


def fused_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.ops.paiton.silu_mul(gate, up)


class SwiGLUPass(PatternFusionPass):
    name = "swiglu"
    fused_op = "silu_mul"
    depends_on = PatternFusionPass.depends_on + ("paiton.fusion.swiglu", "paiton.passes.rms_norm")

    @classmethod
    def register_patterns(cls, pm_pass: PatternMatcherPass, key=None) -> None:
        import paiton.fusion.swiglu  # noqa: F401  (registers torch.ops.paiton.silu_mul)

        for dtype in FUSED_DTYPES:

            def extra_check(match: Match, dtype=dtype) -> bool:
                gate, up = bound_value(match, "gate"), bound_value(match, "up")
                return (
                    isinstance(gate, torch.Tensor)
                    and isinstance(up, torch.Tensor)
                    and gate.dtype == up.dtype == dtype
                    and gate.device == up.device
                    and same_shape(gate, up)
                )

            example_inputs = [torch.empty(2, 16, dtype=dtype), torch.empty(2, 16, dtype=dtype)]
            for search in (silu_times_up, up_times_silu):
                register_fusion(pm_pass, search, fused_silu_mul, example_inputs, extra_check=extra_check)

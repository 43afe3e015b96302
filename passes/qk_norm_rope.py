"""Per-head q/k RMSNorm + rotary embedding -> one `paiton.qk_norm_rope` op.

Runs after the RMSNorm pass and starts from its output. Unfused (Qwen3Attention with
apply_rotary_pos_emb; D = head_dim, the slices at D/2 spelled out)::

    q = permute(paiton.rms_norm(q, q_weight, eps), [0, 2, 1, 3])      # [B, H, S, D]
    k = permute(paiton.rms_norm(k, k_weight, eps), [0, 2, 1, 3])
    cos, sin = unsqueeze(cos, 1), unsqueeze(sin, 1)                    # [B, 1, S, D]
    q_out = add(mul(q, cos), mul(cat([neg(slice(q, 3, D/2, end)), slice(q, 3, 0, D/2)], -1), sin))
    k_out = (the same for k)

Fused::

    q_out, k_out = paiton.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)

The slice bounds are literals of the traced pattern, so patterns are traced per head_dim
found in the graph (the head_dims of its 4-D RMSNorms). Left alone: RoPE with interleaved
pairs (a different rotate), q and k rotated with different cos/sin, norms with different eps,
a partial rotary dim, cos/sin that do not broadcast as [B or 1, S, D].
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass

from paiton.fusion.qk_norm_rope import rotate_half
from paiton.passes.matcher_utils import bound_value, is_python_number, register_fusion, same_size
from paiton.passes.paiton_pass import PatternFusionPass
from paiton.passes.rms_norm import FUSED_DTYPES

RMS_NORM_OP = "paiton.rms_norm.default"


def norm_then_rope(q, k, q_weight, k_weight, cos, sin, eps):
    q = torch.ops.paiton.rms_norm(q, q_weight, eps).transpose(1, 2)
    k = torch.ops.paiton.rms_norm(k, k_weight, eps).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def fused_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    q_out, k_out = torch.ops.paiton.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    return q_out, k_out


def rotary_inputs_fit(match: Match) -> bool:
    q, k = bound_value(match, "q"), bound_value(match, "k")
    cos, sin = bound_value(match, "cos"), bound_value(match, "sin")
    q_weight, k_weight = bound_value(match, "q_weight"), bound_value(match, "k_weight")
    tensors = (q, k, cos, sin, q_weight, k_weight)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or not is_python_number(bound_value(match, "eps")):
        return False
    if q.dtype not in FUSED_DTYPES or any(t.dtype != q.dtype or t.device != q.device for t in tensors):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return False
    batch, seq, _, head_dim = q.shape
    same = same_size
    return (
        same(k.shape[0], batch) and same(k.shape[1], seq) and same(k.shape[3], head_dim)
        and all((same(t.shape[0], batch) or same(t.shape[0], 1)) and same(t.shape[1], seq) and same(t.shape[2], head_dim)
                for t in (cos, sin))
        and all(w.dim() == 1 and same(w.shape[0], head_dim) for w in (q_weight, k_weight))
    )


class QKNormRoPEPass(PatternFusionPass):
    name = "qk_norm_rope"
    fused_op = "qk_norm_rope"
    depends_on = PatternFusionPass.depends_on + ("paiton.fusion.qk_norm_rope", "paiton.passes.rms_norm")

    @classmethod
    def pattern_keys(cls, graph: torch.fx.Graph) -> set:
        head_dims = set()
        for node in graph.nodes:
            value = node.meta.get("val")
            if node.op == "call_function" and str(node.target) == RMS_NORM_OP and isinstance(value, torch.Tensor):
                if value.dim() == 4 and isinstance(value.shape[-1], int) and value.shape[-1] % 2 == 0:
                    head_dims.add(value.shape[-1])
        return head_dims

    @classmethod
    def register_patterns(cls, pm_pass: PatternMatcherPass, key=None) -> None:
        import paiton.fusion.qk_norm_rope  # noqa: F401  (registers torch.ops.paiton.qk_norm_rope)
        import paiton.fusion.rms_norm  # noqa: F401

        head_dim = key
        # The pattern has no casts: one trace serves every dtype (the check verifies dtypes).
        example_inputs = [
            torch.empty(2, 3, 4, head_dim), torch.empty(2, 3, 2, head_dim),
            torch.empty(head_dim), torch.empty(head_dim),
            torch.empty(2, 3, head_dim), torch.empty(2, 3, head_dim),
        ]
        register_fusion(
            pm_pass, norm_then_rope, fused_qk_norm_rope, example_inputs, scalars=["eps"], extra_check=rotary_inputs_fit
        )

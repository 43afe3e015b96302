"""RMSNorm -> one `paiton.rms_norm` op.

Unfused, as transformers' Qwen3RMSNorm (and the q_norm/k_norm over head_dim on [B, S, H, D])
lowers to ATen, for bf16/fp16 inputs (fp32 inputs have no casts)::

    h   = convert_element_type(x, float32)
    var = mean(pow(h, 2), [-1], keepdim=True)      # or mul(h, h): hand-written models
    y   = mul(h, rsqrt(add(var, eps)))
    out = mul(weight, convert_element_type(y, x.dtype))   # or mul(y, weight)

Fused::

    out = paiton.rms_norm(x, weight, eps)

eps is whatever constant the graph adds. Left alone (near misses): a mean over another dim,
a square other than pow(2)/mul(h, h), no rsqrt, the weight multiplied before the cast back,
a tensor eps, a weight that is not 1-D over the last dim or not of the input's dtype, an
input whose dtype differs from the pattern's casts.
"""

from __future__ import annotations

import itertools

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass

from paiton.passes.matcher_utils import bound_value, is_python_number, register_fusion, same_size
from paiton.passes.paiton_pass import PatternFusionPass

# The input dtypes Paiton fuses: the model's compute dtype.
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# How models write the two spots where RMSNorm implementations differ.
SQUARE_FORMS = ("pow", "mul")  # h.pow(2) (transformers, Liger, vLLM) / h * h (gpt-fast)
WEIGHT_SIDES = ("left", "right")  # weight * y (transformers) / y * weight (gpt-fast)


def make_rms_norm(square: str, weight_side: str):
    """RMSNorm written one of the ways models write it, as a plain function of (x, weight, eps)."""

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.to(torch.float32)
        squared = h.pow(2) if square == "pow" else h * h
        y = (h * torch.rsqrt(squared.mean(-1, keepdim=True) + eps)).to(x.dtype)
        return weight * y if weight_side == "left" else y * weight

    rms_norm.__name__ = f"rms_norm_{square}_weight_{weight_side}"
    return rms_norm


def rms_norm_variants():
    """Every (square form, weight side) combination Paiton matches."""
    return [make_rms_norm(square, side) for square, side in itertools.product(SQUARE_FORMS, WEIGHT_SIDES)]


def normable(x, weight, dtype: torch.dtype) -> bool:
    """x and weight are `dtype` tensors, weight 1-D over x's last dim, on x's device.

    Same dtype for both: with a bf16 weight on an fp32 input the fp32 pattern also matches the
    inside of `(weight * normed_fp32).to(bf16)` (weight applied before the cast back); fusing
    it would be exact, but it is not the norm the pattern describes, so it is left alone.
    """
    return (
        isinstance(x, torch.Tensor)
        and isinstance(weight, torch.Tensor)
        and x.dtype == dtype
        and weight.dtype == dtype
        and x.dim() >= 1
        and weight.dim() == 1
        and same_size(weight.shape[0], x.shape[-1])
        and weight.device == x.device
    )


def rms_norm_example_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.empty(2, 16, dtype=dtype), torch.empty(16, dtype=dtype)]


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.paiton.rms_norm(x, weight, eps)


class RMSNormPass(PatternFusionPass):
    name = "rms_norm"
    fused_op = "rms_norm"
    depends_on = PatternFusionPass.depends_on + ("paiton.fusion.rms_norm",)

    @classmethod
    def register_patterns(cls, pm_pass: PatternMatcherPass, key=None) -> None:
        import paiton.fusion.rms_norm  # noqa: F401  (registers torch.ops.paiton.rms_norm)

        for dtype in FUSED_DTYPES:

            def extra_check(match: Match, dtype=dtype) -> bool:
                return is_python_number(bound_value(match, "eps")) and normable(
                    bound_value(match, "x"), bound_value(match, "weight"), dtype
                )

            for search in rms_norm_variants():
                register_fusion(
                    pm_pass,
                    search,
                    fused_rms_norm,
                    rms_norm_example_inputs(dtype),
                    scalars=["eps"],
                    extra_check=extra_check,
                )

"""A tensor-parallel layer's sum over the ranks, the residual add and the next RMSNorm, as one op.

In a tensor-parallel Qwen3 (models/tensor_parallel.py) every o_proj and down_proj ends with an
all-reduce of its partial sums, and the residual add + RMSNorm follows::

    summed = wait_tensor(all_reduce(partial, "sum", group))
    out, residual = paiton.fused_add_rms_norm(summed, residual, weight, eps)

Op: paiton::all_reduce_add_rms_norm(partial, residual, weight, eps, group_name) -> (out, residual):
the all-reduce (torch's functional collective over the group: NCCL on GPUs, gloo on CPU), then
the fused add + RMSNorm kernel on the reduced buffer as it lies, with no copy between and no
other kernel scheduled between them. (A one-shot all-reduce over symmetric memory, with the add
and the norm in the same kernel, would go here where torch offers one without NVLink
multicast; not built yet.)
"""

from __future__ import annotations

import torch

import paiton.fusion.rms_norm  # noqa: F401  (registers torch.ops.paiton.fused_add_rms_norm)


def _reduced(partial: torch.Tensor, group_name: str) -> torch.Tensor:
    reduced = torch.ops._c10d_functional.all_reduce(partial, "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(reduced)


@torch.library.custom_op("paiton::all_reduce_add_rms_norm", mutates_args=())
def all_reduce_add_rms_norm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * normalize(all_reduce(partial) + residual), all_reduce(partial) + residual)."""
    return torch.ops.paiton.fused_add_rms_norm(_reduced(partial, group_name), residual, weight, eps)


@all_reduce_add_rms_norm.register_fake
def _all_reduce_add_rms_norm_fake(partial, residual, weight, eps, group_name):
    return torch.ops.paiton.fused_add_rms_norm(partial, residual, weight, eps)

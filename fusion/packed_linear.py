"""One matrix product against weights packed as consecutive row blocks of one buffer.

Op: paiton::packed_linear(x, first_weight, out_features) -> x @ W.T, where W is the
[out_features, K] matrix that starts at `first_weight` (a view at offset 0 of its storage)
and runs on through the rows of the weights packed after it (see
passes/merged_projections.py, which packs q/k/v and gate/up weights this way).

Why an op rather than `linear(x, as_strided(first_weight, ...))` in the graph: the graph is
traced before the weights are packed (packing changes their storage offsets, which the
tracer has already recorded), so the traced graph cannot look past `first_weight`'s own
rows. The op's fake implementation needs only shapes; at run time it checks that the buffer
really holds `out_features` rows, then calls the same matrix product `linear` would
(cuBLAS / hipBLASLt on GPUs: no Triton kernel beats it for a plain GEMM here).
"""

from __future__ import annotations

import torch


def packed_weight(first_weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """The [out_features, K] matrix whose first rows are `first_weight`."""
    in_features = first_weight.shape[1]
    available = first_weight.untyped_storage().nbytes() // first_weight.element_size()
    if first_weight.storage_offset() != 0 or not first_weight.is_contiguous() or available < out_features * in_features:
        raise RuntimeError(
            f"paiton packed_linear: the weight {tuple(first_weight.shape)} does not start a packed buffer of "
            f"{out_features} rows (storage holds {available // max(in_features, 1)} rows at offset "
            f"{first_weight.storage_offset()}). Were the model's parameters replaced after compiling? "
            "Call torch._dynamo.reset() and compile again."
        )
    return first_weight.as_strided((out_features, in_features), (in_features, 1), 0)


def _check_inputs(x: torch.Tensor, first_weight: torch.Tensor, out_features: int) -> None:
    if first_weight.dim() != 2 or x.shape[-1] != first_weight.shape[1]:
        raise ValueError(
            f"paiton packed_linear: x [..., K] and a 2-D weight [N, K]; got {tuple(x.shape)}, {tuple(first_weight.shape)}"
        )
    if out_features < first_weight.shape[0] or x.dtype != first_weight.dtype:
        raise ValueError(
            f"paiton packed_linear: out_features ({out_features}) below the first weight's rows, or dtypes "
            f"differ ({x.dtype}, {first_weight.dtype})"
        )


@torch.library.custom_op("paiton::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, first_weight: torch.Tensor, out_features: int) -> torch.Tensor:
    _check_inputs(x, first_weight, out_features)
    return torch.nn.functional.linear(x, packed_weight(first_weight, out_features))


@packed_linear.register_fake
def _packed_linear_fake(x, first_weight, out_features):
    _check_inputs(x, first_weight, out_features)
    return x.new_empty((*x.shape[:-1], out_features))

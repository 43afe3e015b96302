"""FP8 weights for a Qwen3 model: `quantize_fp8(model)` and the linear module it puts in.

    import paiton
    paiton.quantize_fp8(model)                       # every decoder linear's weight to e4m3, in place
    compiled = torch.compile(model, backend="paiton")

Each decoder `nn.Linear` (q/k/v/o, gate/up/down; no bias, as Qwen3's) becomes an `Fp8Linear`:
its weight in the chip's FP8 format (float8_e4m3fn; float8_e4m3fnuz on an MI300X) with one fp32
scale per output channel (absmax / the format's largest value), and a forward that calls
`paiton.fp8_linear` (fusion/fp8_linear.py): on a GPU at batch 1 Paiton's GEMV, which
dequantizes in registers. Embeddings, norms and the lm_head keep the model's dtype unless
`include_lm_head` says otherwise. A chip without FP8 (sm_80, gfx90a) is refused by name.

The compiled graph holds `paiton.fp8_linear(x, [W8], [s])` where a bf16 model has
`linear(x, W)`: Paiton's passes take it as they take a linear (merged q/k/v and gate/up over
packed FP8 weights and scales, SwiGLU into down_proj's one-row GEMV).
"""

from __future__ import annotations

import torch

from paiton.fusion import fp8_linear as _fp8_ops  # noqa: F401  (registers torch.ops.paiton.fp8_linear)
from paiton.fusion.fp8_linear import FP8_FORMATS, quantize_weight


class Fp8Linear(torch.nn.Module):
    """y = x @ dequantize(weight, weight_scale).T, no bias. `weight`: FP8 [out, in];
    `weight_scale`: fp32 [out] (per channel) or [ceil(out / 128), ceil(in / 128)] (per 128 x 128
    block, as public FP8 checkpoints store `weight_scale_inv`). Both are parameters that need no
    gradient, so the compiler sees them as the model's weights."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(weight_scale.to(torch.float32), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.paiton.fp8_linear(x, [self.weight], [self.weight_scale])

    def extra_repr(self) -> str:
        kind = "per channel" if self.weight_scale.dim() == 1 else "per 128x128 block"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}, scales {kind}"


def fp8_format(device: torch.device | str | None = None, target=None) -> torch.dtype:
    """The FP8 dtype the chip computes in (backends/lowering.py's table); a RuntimeError naming a
    chip that has none."""
    from paiton.backends.lowering import lowering_for
    from paiton.backends.target import detect_target

    target = target or detect_target(device)
    name = lowering_for("fp8_linear", target).params.get("format")
    if name is None:
        raise RuntimeError(f"FP8 weights need a chip with FP8 (NVIDIA sm_89 and newer, AMD gfx942/gfx950); "
                           f"{target.name or target.arch} ({target.arch}) has none. Keep the model in bf16 there.")
    return FP8_FORMATS[name]


def quantize_fp8(model: torch.nn.Module, *, dtype: torch.dtype | None = None, include_lm_head: bool = False,
                 target=None) -> torch.nn.Module:
    """Replace, in place, every bias-free `nn.Linear` of the decoder layers (and the lm_head if
    `include_lm_head`) with an `Fp8Linear` of per-channel scales; returns `model`. `dtype`: the
    FP8 format (default: the chip's, see fp8_format). One layer's weights are converted at a
    time (the bf16 weight is freed as its FP8 copy is made): memory only goes down."""
    device = next(model.parameters()).device
    dtype = dtype or fp8_format(device, target)
    if dtype not in FP8_FORMATS.values():
        raise ValueError(f"FP8 formats are {list(FP8_FORMATS.values())}; got {dtype}")
    decoder = getattr(getattr(model, "model", model), "layers", None)
    if decoder is None:
        raise ValueError("quantize_fp8 takes a Qwen3 model (a module with .model.layers or .layers)")
    replaced = 0
    with torch.no_grad():
        for layer in decoder:
            replaced += _replace_linears(layer, dtype)
        if include_lm_head and isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
            model.lm_head = _fp8_copy(model.lm_head, dtype)
            replaced += 1
    if replaced == 0:
        raise ValueError("quantize_fp8 found no bias-free linear to quantize")
    return model


def _fp8_copy(linear: torch.nn.Linear, dtype: torch.dtype) -> Fp8Linear:
    weight, scales = quantize_weight(linear.weight.data, dtype)
    return Fp8Linear(weight, scales)


def quantizable_linears(module: torch.nn.Module):
    """(parent, name, linear) for every bias-free `nn.Linear` below `module`: what quantize_fp8
    replaces in a decoder layer (also how a benchmark counts the FP8 bytes without the copy)."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and child.bias is None:
            yield module, name, child
        else:
            yield from quantizable_linears(child)


def _replace_linears(module: torch.nn.Module, dtype: torch.dtype) -> int:
    replaced = 0
    for parent, name, linear in quantizable_linears(module):
        setattr(parent, name, _fp8_copy(linear, dtype))
        replaced += 1
    return replaced


def fp8_copy(model: torch.nn.Module, **options) -> torch.nn.Module:
    """A second model that shares every tensor of `model` (embeddings, norms, lm_head, buffers)
    but holds FP8 copies of its decoder linears (quantize_fp8 with `options`): an FP8 model beside
    the bf16 one for the price of the FP8 weights (a Qwen3-32B benchmark holds both on one H200)."""
    import copy

    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return quantize_fp8(copy.deepcopy(model, memo=shared), **options)


def is_fp8(model: torch.nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())

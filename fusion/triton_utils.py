"""Small helpers shared by Paiton's Triton kernels."""

from __future__ import annotations

import contextlib
import os

import torch
import triton


def switched_on(variable: str) -> bool:
    """The environment variable is 1 (or true/yes/on): the launch-time switches (PAITON_PDL,
    PAITON_L2_PREFETCH), read at each launch."""
    return os.environ.get(variable, "0").strip().lower() in ("1", "true", "yes", "on")


def is_interpreted(kernel) -> bool:
    """True when `kernel` runs in Triton's CPU interpreter.

    `triton.jit` decides at decoration time: with TRITON_INTERPRET=1 in the environment when the
    kernel module was imported it returns an interpreted function (runs on CPU tensors),
    otherwise a JITFunction (needs a GPU). Asking the kernel object is the one reliable test.
    """
    return not isinstance(kernel, triton.runtime.JITFunction)


def device_guard(tensor: torch.Tensor):
    """Make the tensor's GPU the current one for a launch (Triton launches on the current
    device, which need not be the tensors')."""
    if tensor.device.type == "cuda":  # ROCm devices are "cuda" in torch too
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a 2-D [rows, last dim] tensor with unit column stride and one row stride, as a
    view when its layout allows (e.g. a column slice of a wider matrix, such as the gate half
    of a merged gate/up projection), else as a contiguous copy."""
    cols = t.shape[-1] if t.dim() else 1
    rows = t.numel() // cols if cols else 0
    if t.dim() >= 1 and (t.stride(-1) == 1 or cols == 1):
        try:
            return t.view(rows, cols)
        except RuntimeError:  # leading dims do not collapse to one stride
            pass
    return t.contiguous().view(rows, cols)


def fresh_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` with the strides `torch.empty(t.shape)` has, as the ops' fake implementations
    promise for their CPU reference results. (`.contiguous()` keeps odd strides on size-1
    dims.)"""
    if t.stride() == torch.empty(t.shape, device="meta").stride():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)

"""Small helpers shared by Paiton's Triton kernels."""

from __future__ import annotations

import contextlib

import torch
import triton


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

"""SwiGLU's elementwise half, silu(gate) * up, as one Triton kernel and a torch.library op.

Numerics are eager's for Qwen3MLP (`act_fn(gate_proj(x)) * up_proj(x)`, act_fn = SiLU):

    s   = (g / (1 + exp(-g))).to(dtype)    # g = gate.to(float32); silu in fp32, rounded
    out = (s * up)                         # in dtype (computed in fp32, rounded once)

Op: paiton::silu_mul(gate, up) -> out (fresh, contiguous). gate and up may be column slices
of one wider matrix (the merged gate/up projection's output): the kernel reads them in place
through their row stride, without a copy.

On CUDA/ROCm tensors the Triton kernel runs; on CPU the reference below, or the kernel in
Triton's interpreter when TRITON_INTERPRET=1 was set at import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paiton.backends.target import detect_target
from paiton.fusion.pdl import pdl_launch, wait_for_previous_kernel
from paiton.fusion.triton_utils import as_rows, device_guard, fresh_contiguous, is_interpreted


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@triton.jit
def silu_times_up(gate, up):
    """silu(gate) * up rounded as eager rounds it (module docstring), in up's dtype. Shared
    with the GEMV that applies SwiGLU while loading its input (fusion/gemv.py)."""
    gate = gate.to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_cols, gate_row_stride, up_row_stride, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    """Program (row, column block): one BLOCK-wide piece of one row."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, silu_times_up(gate, up).to(out_ptr.dtype.element_ty), mask=mask)


# 8 elements a thread: one 16-byte load of gate and of up per thread for bf16/fp16 (checked
# in the ahead-of-time compile test: `ld.global.v4` on NVIDIA, `dwordx4` on AMD). 4 warps:
# a block is 1024 elements with 32-thread warps, 2048 with AMD's 64-wide wavefronts; Qwen3's
# intermediate sizes (3072 to 25600) give 2 to 25 programs per row.
SILU_MUL_ELEMENTS_PER_THREAD = 8
SILU_MUL_NUM_WARPS = 4


def silu_mul_launch_config(warp_size: int) -> dict[str, int]:
    """The block a chip with `warp_size`-wide warps gets (the lowering table's default)."""
    return dict(BLOCK=SILU_MUL_ELEMENTS_PER_THREAD * SILU_MUL_NUM_WARPS * warp_size, num_warps=SILU_MUL_NUM_WARPS)


def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"paiton silu_mul: gate and up must have one shape, dtype and device; got {tuple(gate.shape)}/{gate.dtype} "
            f"and {tuple(up.shape)}/{up.dtype}"
        )
    if gate.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"paiton silu_mul: float32/float16/bfloat16 only, got {gate.dtype}")


def _launch(gate: torch.Tensor, up: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """`config`: the launch's keyword arguments; by default the lowering table's for the device."""
    _check_inputs(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    gate_rows, up_rows = as_rows(gate), as_rows(up)
    n_rows, n_cols = gate_rows.shape
    if config is None:
        from paiton.backends.lowering import launch_config  # (lowering.py imports this module)

        config = launch_config("silu_mul", detect_target(gate.device))
    grid = (n_rows, triton.cdiv(n_cols, config["BLOCK"]))
    with device_guard(gate):
        _silu_mul_kernel[grid](gate_rows, up_rows, out, n_cols, gate_rows.stride(0), up_rows.stride(0), **config,
                               **pdl_launch(gate, _silu_mul_kernel))
    return out


@torch.library.custom_op("paiton::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with eager's rounding (see the module docstring)."""
    return _launch(gate, up)


@silu_mul.register_kernel("cpu")
def _silu_mul_cpu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if is_interpreted(_silu_mul_kernel):
        return _launch(gate, up)
    _check_inputs(gate, up)
    return fresh_contiguous(silu_mul_reference(gate, up))


@silu_mul.register_fake
def _silu_mul_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_inputs(gate, up)
    return gate.new_empty(gate.shape)

"""RMSNorm and residual-add + RMSNorm: one Triton kernel, two torch.library ops.

The numerics are transformers' ``Qwen3RMSNorm`` to the letter, including where it casts::

    h   = x + residual                    # fused_add only; eager adds in x.dtype (rounded)
    hf  = h.to(float32)
    y   = hf * rsqrt(mean(hf**2, -1) + eps)   # statistics in fp32
    out = weight * y.to(x.dtype)          # cast back *before* the weight multiply

``out`` has the dtype eager type promotion gives ``weight * y`` (x.dtype when weight has it).

Ops (all functional: fresh, contiguous outputs):
    paiton::rms_norm(x, weight, eps) -> out
    paiton::fused_add_rms_norm(x, residual, weight, eps) -> (out, x + residual)

On CUDA/ROCm tensors the Triton kernel runs. On CPU tensors the reference below runs, unless
``TRITON_INTERPRET=1`` is set, in which case the same Triton kernel runs in Triton's
interpreter (that is how CI checks the kernel without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paiton.backends.target import detect_target
from paiton.fusion.l2_prefetch import CHUNK_BYTES, prefetch_arguments, prefetch_span_to_l2
from paiton.fusion.pdl import pdl_launch, wait_for_previous_kernel
from paiton.fusion.triton_utils import device_guard, fresh_contiguous, is_interpreted

# ---------------------------------------------------------------------------------------------
# Reference: the eager computation, copied from transformers' Qwen3RMSNorm.forward
# (src/transformers/models/qwen3/modeling_qwen3.py). Pass tests, kernel tests and the CPU
# implementation all use these two functions.
# ---------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_input_block(x_ptr, residual_ptr, sum_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """Load one [rows, cols] block of the norm's input; with a residual, add it (rounded to
    x's dtype, as eager does) and write the sum out."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, x, mask=mask)
    return x


@triton.jit
def _normalize_block(x, rstd, weight_ptr, cols, col_mask, out_ptr, offsets, mask):
    """out = weight * (x * rstd).to(x.dtype), with eager's cast points."""
    y = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0)
    out = weight[None, :].to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    NUM_COL_BLOCKS: tl.constexpr,
    PDL: tl.constexpr = False,
    prefetch_ptr=None,
    prefetch_bytes=0,
    prefetch_first_program=0,
    PREFETCH_CHUNKS: tl.constexpr = 0,
    PREFETCH_CHUNK_BYTES: tl.constexpr = CHUNK_BYTES,
):
    """Each program normalizes BLOCK_ROWS rows of a contiguous [n_rows, n_cols] input.

    NUM_COL_BLOCKS == 1: the whole row block stays in registers (one read, one write).
    NUM_COL_BLOCKS > 1 (rows wider than one block): pass 1 accumulates the sum of squares
    (and writes x + residual), pass 2 re-reads the input (the written sum, with a residual)
    and normalizes. PDL: launched programmatically (fusion/pdl.py). PREFETCH_CHUNKS > 0: the
    programs from prefetch_first_program on (appended to the rows' programs) first ask L2 for
    their share of the next product's weight (fusion/l2_prefetch.py); their rows are past
    n_rows, masked off.
    """
    pid = tl.program_id(0)
    prefetch_span_to_l2(prefetch_ptr, prefetch_bytes, pid - prefetch_first_program, PREFETCH_CHUNKS,
                        PREFETCH_CHUNK_BYTES)
    wait_for_previous_kernel(PDL)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    # int64: batch x sequence x hidden passes 2**31 elements at long prompts.
    row_offsets = rows.to(tl.int64)[:, None] * n_cols

    if NUM_COL_BLOCKS == 1:
        cols = tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = row_offsets + cols[None, :]
        x = _load_input_block(x_ptr, residual_ptr, sum_ptr, offsets, mask, HAS_RESIDUAL)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
        _normalize_block(x, rstd, weight_ptr, cols, col_mask, out_ptr, offsets, mask)
    else:
        sum_sq = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for block in range(NUM_COL_BLOCKS):
            cols = block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            col_mask = cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = row_offsets + cols[None, :]
            x = _load_input_block(x_ptr, residual_ptr, sum_ptr, offsets, mask, HAS_RESIDUAL)
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
        if HAS_RESIDUAL:
            # Pass 2 reads the sums other threads of this program wrote in pass 1.
            tl.debug_barrier()
        for block in range(NUM_COL_BLOCKS):
            cols = block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            col_mask = cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = row_offsets + cols[None, :]
            if HAS_RESIDUAL:
                x = tl.load(sum_ptr + offsets, mask=mask, other=0.0)
            else:
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
            _normalize_block(x, rstd, weight_ptr, cols, col_mask, out_ptr, offsets, mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

# Rows up to this width are normalized from registers in one pass: 16384 fp32 values per row
# block is 64 KB spread over 16 warps (32 registers a thread for the row), no spills. Wider
# rows (none in Qwen3: hidden is at most 5120) take the two-pass path.
MAX_SINGLE_PASS_COLS = 16384
TWO_PASS_BLOCK_COLS = 4096
# A program handles at least this many elements: per-head q/k norms have 128-wide rows, and one
# row per program would leave each program 256 bytes of work.
MIN_ELEMENTS_PER_PROGRAM = 4096


def rms_norm_launch_config(n_rows: int, n_cols: int) -> dict[str, int]:
    """Block shape and warps for a contiguous [n_rows, n_cols] input (the lowering table adds
    the chip's fixed options, backends/lowering.py)."""
    if n_cols <= MAX_SINGLE_PASS_COLS:
        block_cols, num_col_blocks = triton.next_power_of_2(n_cols), 1
    else:
        block_cols = TWO_PASS_BLOCK_COLS
        num_col_blocks = triton.cdiv(n_cols, block_cols)
    block_rows = min(triton.next_power_of_2(max(n_rows, 1)), max(1, MIN_ELEMENTS_PER_PROGRAM // block_cols))
    tile = block_rows * block_cols
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, NUM_COL_BLOCKS=num_col_blocks, num_warps=num_warps)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, config: dict | None = None,
    prefetch: torch.Tensor | None = None, prefetch_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`config`: the launch's keyword arguments; by default the lowering table's for x's device
    (the sweep in bench/lowering_sweep.py passes others). `prefetch`: the next product's weight,
    of which the kernel asks L2 for up to `prefetch_bytes` (fusion/l2_prefetch.py)."""
    _check_inputs(x, residual, weight)
    n_cols = x.shape[-1]
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = None
    if residual is not None:
        residual = residual.contiguous()
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    weight = weight.contiguous()
    n_rows = x.numel() // n_cols if n_cols else 0
    if n_rows == 0:
        return out, summed
    op = "rms_norm" if residual is None else "fused_add_rms_norm"
    if config is None:
        from paiton.backends.lowering import launch_config  # (lowering.py imports this module)

        config = launch_config(op, detect_target(x.device), n_rows=n_rows, n_cols=n_cols)
    row_programs = triton.cdiv(n_rows, config["BLOCK_ROWS"])
    prefetching = prefetch_arguments(op, x, prefetch, prefetch_bytes, row_programs)
    with device_guard(x):
        _rms_norm_kernel[(row_programs + prefetching.programs,)](
            x,
            residual if residual is not None else x,  # unused without a residual
            weight,
            out,
            summed if summed is not None else out,  # unused without a residual
            n_rows,
            n_cols,
            float(eps),
            HAS_RESIDUAL=residual is not None,
            **config,
            **pdl_launch(x, _rms_norm_kernel),
            **prefetching.arguments,
        )
    return out, summed


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    # The kernel computes in fp32: wider dtypes would come back fp64 but only fp32-accurate.
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"paiton rms_norm: x and weight must be float32/float16/bfloat16, got {x.dtype}/{weight.dtype}")
    if x.dim() < 1:
        raise ValueError("paiton rms_norm: x must have at least one dimension")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"paiton rms_norm: weight must be 1-D with x.shape[-1]={x.shape[-1]} elements, "
            f"got shape {tuple(weight.shape)}"
        )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"paiton fused_add_rms_norm: residual {tuple(residual.shape)}/{residual.dtype} must match "
            f"x {tuple(x.shape)}/{x.dtype}"
        )


# ---------------------------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("paiton::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, prefetch: torch.Tensor | None = None,
             prefetch_bytes: int = 0) -> torch.Tensor:
    """weight * normalize(x) as Qwen3RMSNorm computes it (see the module docstring).
    `prefetch`, `prefetch_bytes`: the next product's weight, asked of L2 on the way (a hint that
    changes no result: fusion/l2_prefetch.py)."""
    return _launch(x, None, weight, eps, prefetch=prefetch, prefetch_bytes=prefetch_bytes)[0]


@rms_norm.register_kernel("cpu")
def _rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, prefetch: torch.Tensor | None = None,
                  prefetch_bytes: int = 0) -> torch.Tensor:
    if is_interpreted(_rms_norm_kernel):
        return _launch(x, None, weight, eps)[0]
    _check_inputs(x, None, weight)
    return fresh_contiguous(rms_norm_reference(x, weight, eps))


@rms_norm.register_fake
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float, prefetch: torch.Tensor | None = None,
                   prefetch_bytes: int = 0) -> torch.Tensor:
    _check_inputs(x, None, weight)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("paiton::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, prefetch: torch.Tensor | None = None,
    prefetch_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * normalize(x + residual), x + residual): the residual stream's add and the
    next norm in one pass over memory. `prefetch`, `prefetch_bytes`: as rms_norm's."""
    return _launch(x, residual, weight, eps, prefetch=prefetch, prefetch_bytes=prefetch_bytes)


@fused_add_rms_norm.register_kernel("cpu")
def _fused_add_rms_norm_cpu(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, prefetch: torch.Tensor | None = None,
    prefetch_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if is_interpreted(_rms_norm_kernel):
        return _launch(x, residual, weight, eps)
    _check_inputs(x, residual, weight)
    out, summed = fused_add_rms_norm_reference(x, residual, weight, eps)
    return fresh_contiguous(out), fresh_contiguous(summed)


@fused_add_rms_norm.register_fake
def _fused_add_rms_norm_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, prefetch: torch.Tensor | None = None,
    prefetch_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(x, residual, weight)
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return out, x.new_empty(x.shape)

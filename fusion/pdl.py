"""Programmatic dependent launch (PDL, sm_90 and later): a kernel of a decode step starts while
the kernel before it is still finishing, and waits for that kernel's results only where it
needs them.

Why: a batch-1 decode step is about 600 kernels (Qwen3-32B: 64 layers of four products, two
norms, the rotary kernel and attention's two), most of a few to a few tens of microseconds. Each
one's start (its programs placed on the multiprocessors, the first loads' round trip to memory)
and its tail (the last programs running on a few multiprocessors while the rest idle) are paid
in turn: Qwen3-32B's FP8 step on an H100 ran 12.31 ms against 11.22 ms of one-row products,
with 0.76 ms in the small kernels between them and 0.29 ms with no kernel running at all
(bench/results/NOTES.md, 2026-12-05). Launched with PDL, the next kernel's programs are placed
as the current one's last programs run, prefetch what does not depend on it (a product's first
weight tiles, into L2), and wait (`griddepcontrol.wait`) until the current kernel has finished
and its writes are visible.

The rules every kernel with a PDL constexpr follows (`wait_for_previous_kernel`):
* every program waits before it reads anything an earlier kernel may write, and before it
  writes anything: so the kernel after it, which waits for this one to finish, also runs after
  every kernel before this one (a program that returned without waiting would break the chain);
* only the L2 prefetch comes before the wait: L2 is where every write lands, so a prefetched
  line is never a stale copy (a weight written by the kernel just before, e.g. a quantization
  in place, is read after the wait like anything else);
* the wait is followed by `griddepcontrol.launch_dependents`: the next kernel may be placed
  once every program of this one has started.

Where: CUDA chips of compute capability 9.0 and later (Hopper, Blackwell); never on ROCm, older
NVIDIA chips or under Triton's interpreter (the kernels are compiled without it there). Off
unless PAITON_PDL=1: timed on an H100 at 52e4217 it took 1-2.6% off Qwen3-8B's batch-1 step and
nothing off a chain of products and norms (7% on 8B FP8's; bench/results/NOTES.md), not the
0.3-0.8 ms predicted (bench/pdl_chain.py and profile_decode_step.py's "-pdl" configurations). The switch is read at each launch, so a CUDA graph records
the launches as the switch stood when it was captured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paiton.backends.target import Target, detect_target
from paiton.fusion.triton_utils import switched_on

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton built without its NVIDIA backend (ROCm only): PDL never launches there
    gdc_launch_dependents = gdc_wait = None

PDL_ENV = "PAITON_PDL"
L2_LINE_BYTES = tl.constexpr(128)  # bytes (a constexpr: the kernels read it)


def pdl_requested() -> bool:
    """PAITON_PDL=1 (or true/yes/on) in the environment."""
    return switched_on(PDL_ENV)


def target_has_pdl(target: Target) -> bool:
    """NVIDIA from sm_90 (Hopper) on: the chips with griddepcontrol (and a Triton that can emit it)."""
    return target.compute_capability >= 90 and gdc_wait is not None


def pdl_launch(tensor: torch.Tensor, kernel) -> dict[str, bool]:
    """The keyword arguments that launch `kernel` (a Triton kernel with a PDL constexpr) with
    programmatic dependent launch for `tensor`'s device: {"PDL": True, "launch_pdl": True} where
    it is requested (PAITON_PDL=1) and the chip has it (target_has_pdl; not under the
    interpreter), else {} (the kernel's PDL defaults to False)."""
    if tensor.device.type != "cuda" or not isinstance(kernel, triton.runtime.JITFunction) or not pdl_requested():
        return {}
    return {"PDL": True, "launch_pdl": True} if target_has_pdl(detect_target(tensor.device)) else {}


@triton.jit
def prefetch_to_l2(ptrs):
    """Ask L2 for the lines at `ptrs` (PTX prefetch.global.L2: a hint; nothing is returned or
    kept in registers). CUDA only: call it under a PDL constexpr."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has finished and its writes are visible,
    then let the kernel after this one be placed. Without: nothing. Call it in every program
    before its first read of data another kernel writes, and before its first write."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_rows_to_l2(ptr, rows, n_rows, stride, col_begin, n_cols, COLS: tl.constexpr):
    """Prefetch into L2 the lines of `rows` (each clamped to n_rows - 1) of a matrix with unit
    column stride and row stride `stride`, columns [col_begin, col_begin + COLS) (clamped to
    n_cols - 1): a product's first weight tiles, before it waits for its input. The matrix must
    not be empty (its launcher leaves PDL off for an empty one: no address to ask for)."""
    LINE: tl.constexpr = L2_LINE_BYTES * 8 // ptr.dtype.element_ty.primitive_bitwidth
    LINES: tl.constexpr = (COLS + LINE - 1) // LINE  # at least one (powers of two: exact otherwise)
    cols = tl.minimum(col_begin + tl.arange(0, LINES) * LINE, n_cols - 1)
    row_ptrs = ptr + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * stride
    prefetch_to_l2(row_ptrs + cols[None, :])

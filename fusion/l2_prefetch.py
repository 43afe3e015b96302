"""Weight prefetch into L2 while a decode step's small kernels run (sm_90 and later).

Why: at batch 1 a decode layer is four one-row products, each streaming its weight at the copy
rate, separated by latency-bound kernels (the norms, the rotary kernel, attention's two) during
which memory sits idle: on an H100, Qwen3-32B's FP8 step spent 0.76 ms in those kernels and
0.27 ms between kernels against 11.3 ms of products (bench/results/NOTES.md, 2026-12-05). If
the first of those kernels asks L2 for the next product's first megabytes, memory streams them
while the small kernels run and the product finds them in L2.

The request is the bulk prefetch of sm_90 (PTX `cp.async.bulk.prefetch.L2.global [addr], size`):
one instruction asks for a contiguous span of CHUNK_BYTES; nothing comes back to the program,
which may end before the lines arrive. It is a hint: a line an earlier kernel wrote is in L2 or
memory, never stale, so a prefetch needs no ordering with earlier kernels (it may come before a
PDL wait, fusion/pdl.py) and changes no result.

Which kernels prefetch what: passes/l2_prefetch.py gives the first small kernel after each
product (an RMSNorm, fused add + RMSNorm, or the q/k norm + rotary kernel) the next product's
weight (`prefetch`, `prefetch_bytes`: the packed weights' bytes from the first); the chip's
lowering table (backends/lowering.py, "l2_prefetch") says how many of those bytes each kind of
kernel asks for (its window: an RMSNorm's few microseconds, attention's longer one), and
`prefetch_arguments` turns that into the kernel's launch arguments.

Off unless PAITON_L2_PREFETCH=1 (which also switches the pass on), because it was timed a loss
(H100, Qwen3-8B, batch 1; bench/results/NOTES.md, 2026-12-06). The products did read faster,
200-260 us a step (5-7%), so L2 kept part of what was asked for; but the window kernels grew
more: by about 54 us each when their own programs issued the requests (one program asking for
8 MB: a step 2.6x slower), and still by 6-7 us each with the requests spread over programs
appended to their grid (a step 10-13% slower). A kernel does not end before its bulk
prefetches are served, so the prefetch does not overlap the window: it lengthens it by about
the bytes' time at the copy rate, of which the products win back about 40%. The switch is
read at each launch, so a CUDA graph records the launches as the switch stood when it was
captured (as PAITON_PDL's, fusion/pdl.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from paiton.backends.target import Target, detect_target
from paiton.fusion.triton_utils import switched_on

LOWERING_OP = "l2_prefetch"  # its entry in the lowering tables
PREFETCH_ENV = "PAITON_L2_PREFETCH"
# One bulk prefetch's span by default: a few hundred requests cover tens of megabytes; a
# multiple of the 16 bytes the instruction requires.
CHUNK_BYTES = 64 * 1024


@triton.jit
def bulk_prefetch_to_l2(ptrs, nbytes):
    """Ask L2 for `nbytes` (a multiple of 16; 0: nothing) at each of `ptrs` (16-byte aligned):
    PTX cp.async.bulk.prefetch.L2 (sm_90 and later, CUDA only)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; } // $0",
        "=r,l,r", [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_span_to_l2(base_ptr, nbytes, program, CHUNKS: tl.constexpr, CHUNK_BYTES: tl.constexpr):
    """Program `program`'s share of a prefetch of bytes [0, nbytes) from `base_ptr` (any element
    type, 16-byte aligned): its CHUNKS chunks of CHUNK_BYTES (a multiple of 16), program *
    CHUNKS onwards, the last one cut at nbytes (rounded down to 16 bytes); a negative `program`
    (a window kernel's own programs, before those appended for the prefetch) asks for nothing.
    CHUNKS = 0: nothing (the kernels' default: no prefetch is compiled in)."""
    if CHUNKS > 0:
        chunk = program * CHUNKS + tl.arange(0, CHUNKS)
        begin = chunk.to(tl.int64) * CHUNK_BYTES
        size = tl.minimum(tl.maximum(nbytes - begin, 0), CHUNK_BYTES) // 16 * 16
        size = tl.where(chunk >= 0, size, 0)
        bulk_prefetch_to_l2(base_ptr.to(tl.pointer_type(tl.uint8)) + begin, size.to(tl.int32))


def prefetch_programs(nbytes: int, chunks: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Programs of `chunks` chunks of `chunk_bytes` each that cover `nbytes`."""
    return max(1, triton.cdiv(nbytes, chunk_bytes * chunks))


def prefetch_requested() -> bool:
    """PAITON_L2_PREFETCH=1 (or true/yes/on) in the environment."""
    return switched_on(PREFETCH_ENV)


def target_has_bulk_prefetch(target: Target) -> bool:
    """NVIDIA from sm_90 (Hopper) on: the chips with cp.async.bulk.prefetch."""
    return target.compute_capability >= 90


def prefetch_plan(nbytes: int, budget: int, max_programs: int,
                  chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int, int]:
    """(bytes to prefetch, programs, chunks a program asks for) for a prefetch of at most
    `budget` of a weight's `nbytes` spread over at most `max_programs` programs: the bytes
    rounded down to 16, each program's chunks a power of two (a block size), as few as cover the
    bytes in `max_programs`; (0, 0, 0) when nothing is left to ask for."""
    nbytes = min(nbytes, budget) // 16 * 16
    if nbytes <= 0 or max_programs <= 0:
        return 0, 0, 0
    needed = triton.cdiv(nbytes, chunk_bytes)
    chunks = triton.next_power_of_2(triton.cdiv(needed, max_programs))
    return nbytes, triton.cdiv(needed, chunks), chunks


class PrefetchLaunch(NamedTuple):
    """A window kernel's prefetch: the keyword arguments to launch it with, and how many programs
    the launch appends to its grid for the prefetch (programs from `prefetch_first_program` on)."""
    arguments: dict
    programs: int


NO_PREFETCH = PrefetchLaunch({}, 0)


def prefetch_arguments(window_op: str, like: torch.Tensor, prefetch: torch.Tensor | None, prefetch_bytes: int,
                       first_program: int) -> PrefetchLaunch:
    """How `window_op`'s kernel, whose own programs (on `like`'s device) number `first_program`,
    prefetches the first bytes of `prefetch` into L2: programs appended to its grid, each asking
    for a few chunks (prefetch_ptr, prefetch_bytes, prefetch_first_program, PREFETCH_CHUNKS,
    PREFETCH_CHUNK_BYTES). Appended because one SM issues bulk prefetches at about a line a
    clock: a batch-1 norm's single program asking for 8 MB held the step's kernels 50 us a
    window (H100, 2026-12-06), while a chunk or two on each of a hundred SMs is issued at once
    (still a loss, 6-7 us a window: the kernel waits for its prefetches; the module's docstring).
    NO_PREFETCH unless requested (PAITON_L2_PREFETCH=1), without a weight, on a chip without the
    instruction or whose table leaves it out, under the interpreter (CPU tensors), or for a
    weight that is not 16-byte aligned on that device."""
    if prefetch is None or prefetch_bytes <= 0 or like.device.type != "cuda" or prefetch.device != like.device:
        return NO_PREFETCH
    if not prefetch_requested():
        return NO_PREFETCH
    target = detect_target(like.device)
    if not target_has_bulk_prefetch(target):
        return NO_PREFETCH
    from paiton.backends.lowering import INDUCTOR, lowering_for  # (lowering.py imports the kernels' modules)

    lowering = lowering_for(LOWERING_OP, target)
    if lowering.implementation == INDUCTOR or prefetch.data_ptr() % 16:
        return NO_PREFETCH
    chunk_bytes = lowering.params.get("chunk_bytes", CHUNK_BYTES)
    stored = prefetch.untyped_storage().nbytes() - prefetch.storage_offset() * prefetch.element_size()
    nbytes, programs, chunks = prefetch_plan(min(prefetch_bytes, stored), lowering.params.get(window_op, 0),
                                             lowering.params.get("programs", 1), chunk_bytes)
    if not nbytes:
        return NO_PREFETCH
    return PrefetchLaunch(dict(prefetch_ptr=prefetch, prefetch_bytes=nbytes, prefetch_first_program=first_program,
                               PREFETCH_CHUNKS=chunks, PREFETCH_CHUNK_BYTES=chunk_bytes), programs)

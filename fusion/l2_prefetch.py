"""Weight prefetch into L2 while a decode step's small kernels run (sm_90 and later).

Why: at batch 1 a decode layer is four one-row products, each streaming its weight at the copy
rate, separated by latency-bound kernels (the norms, the rotary kernel, attention's two) during
which memory sits idle: on an H100, Qwen3-32B's FP8 step spent 0.76 ms in those kernels and
0.27 ms between kernels against 11.3 ms of products (bench/results/NOTES.md, 2026-12-05). If
the first of those kernels asks L2 for the next product's first megabytes, memory streams them
while the small kernels run and the product finds them in L2.

The request is the bulk prefetch of sm_90 (PTX `cp.async.bulk.prefetch.L2.global [addr], size`):
one instruction asks for a contiguous span of up to CHUNK_BYTES; nothing comes back to the
program, which may end before the lines arrive. It is a hint: lines already written by an
earlier kernel are in L2 or memory, never stale, so a prefetch needs no ordering with them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# One bulk prefetch's span by default: large enough that a few hundred requests cover tens of
# megabytes, a multiple of the 16 bytes the instruction requires.
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
    CHUNKS onwards, the last one cut at nbytes (rounded down to 16 bytes)."""
    chunk = program * CHUNKS + tl.arange(0, CHUNKS)
    begin = chunk.to(tl.int64) * CHUNK_BYTES
    size = tl.minimum(tl.maximum(nbytes - begin, 0), CHUNK_BYTES) // 16 * 16
    bulk_prefetch_to_l2(base_ptr.to(tl.pointer_type(tl.uint8)) + begin, size.to(tl.int32))


def prefetch_programs(nbytes: int, chunks: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Programs of `chunks` chunks of `chunk_bytes` each that cover `nbytes`."""
    return max(1, triton.cdiv(nbytes, chunk_bytes * chunks))

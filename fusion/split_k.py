"""K cut into slices, a program each, for the products whose weight is narrow and long (split-K):
the slice widths, and the per-tile arrival counters that let each tile's last slice add them all.

Used by the few-rows GEMM (fusion/few_rows_gemm.py) and the one-row GEMV (fusion/gemv.py). Both
write each slice's fp32 sums to a workspace; the program that arrives last at a tile, by an
atomic counter, adds the slices in slice order (so the bits do not depend on which program is
last) and sets the counter back to zero for the next product. One counter buffer per device
serves every split launch: launches on a stream run in turn, and each leaves its counters at
zero. So two split launches must not run at once on two streams of one device (nothing in
Paiton does); they would share counters, and a counter left off zero would make every later
product of that tile add its slices one arrival early.

The arrival protocol: every thread's partial sums are stored, a barrier, then one acquire-release
atomic a program, and the last arrival reads the slices past L1. On AMD's gfx942 the compiled
code has no wait for the stores before the barrier; it is correct because Triton issues the
partial store of a tile of up to 64 rows from one wavefront, whose stores the atomic's thread
waits for. A launch with wider tiles (BLOCK_N > 64) there needs its assembly read again.
"""

from __future__ import annotations

import threading

import torch
import triton


def k_slices(k: int, block_k: int, splits: int) -> tuple[int, int]:
    """(slice width, slices) for K cut into at most `splits` slices of whole BLOCK_K tiles."""
    tiles = triton.cdiv(k, block_k)
    width = triton.cdiv(tiles, max(splits, 1)) * block_k
    return width, triton.cdiv(k, width) if k else 1


# One int32 counter per output tile, per device, for split launches: made outside any CUDA graph
# capture (a product's first use is timed there first), left at zero by each split launch.
MAX_TILES = 1 << 16
COUNTERS: dict[str, torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's counters, if `tiles` of them are to be had: None inside a CUDA graph capture
    before they exist (the caller then launches unsplit), or for more than MAX_TILES tiles."""
    counters = COUNTERS.get(str(device))
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = COUNTERS[str(device)] = zeros_outside_graph_pools(MAX_TILES, device)
    return counters if tiles <= MAX_TILES else None


def zeros_outside_graph_pools(count: int, device: torch.device) -> torch.Tensor:
    """int32 zeros that outlive every CUDA graph. A split launch's first use is often inside a
    CUDA-graph tree's warm-up run (torch.compile's reduce-overhead mode), which sends every
    allocation of the current thread to the tree's private pool; a tensor kept from there is one
    the tree does not track, and its next recording fails ("tensor(s) in the cudagraph pool not
    tracked as outputs", seen on the H200 at 18612d0). Made on a thread of its own, the counters
    come from the ordinary allocator; that thread waits for its zeros before handing them over."""
    if device.type != "cuda":
        return torch.zeros(count, dtype=torch.int32, device=device)
    made: list = []

    def make() -> None:
        try:
            with torch.cuda.device(device):
                zeros = torch.zeros(count, dtype=torch.int32, device=device)
                torch.cuda.current_stream(device).synchronize()
            made.append(zeros)
        except BaseException as error:  # raised again on the caller's thread
            made.append(error)

    thread = threading.Thread(target=make, name="paiton-split-k-counters")
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]

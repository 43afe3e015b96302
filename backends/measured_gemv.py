"""One-row products measured ahead of time, per GPU model: the launch `fusion.gemv.choose`
takes for a weight shape without timing it in the running process.

Why: `choose` times every candidate launch and the vendor's GEMM at a shape's first use, in the
process that is compiling the model, and a few percent between candidates decide. On H200s the
choices moved from run to run (bench/results/NOTES.md, 2026-11-29): Qwen3-8B's o_proj went to
cuBLAS in three of the four processes that recorded it, and a decode step with it there was
0.27 ms slower. The timing method was the cause there (do_bench's cache flush; fusion/gemv.py
times differently since, and timed so, a first use and a separate sweep agreed on the GEMV for
every shape), but a 15 us measurement taken while a process compiles stays exposed to noise.
bench/gemv_sweep.py times every candidate as choose does, with more rounds, in a process that
does nothing else, and prints its picks in this table's format; with a card's entries here,
every process on that card runs the same launches. Shapes and cards not listed are timed at
first use; the environment variable PAITON_GEMV_TIMING=1 times every shape (to check a table
against a first use).

MEASURED: card name (torch.cuda.get_device_name) -> (N, K, dtype, gated) -> a launch
(BLOCK_N, BLOCK_K, num_warps, num_stages) or VENDOR. An entry holds for a weight of unit row
layout (row stride K) only, and only while its launch is still one of the lowering table's
candidates: a changed candidate list makes the shape timed again rather than run a launch
nobody chose.
"""

from __future__ import annotations

import os

import torch

from paiton.fusion.gemv import VENDOR

MEASURED: dict[str, dict[tuple[int, int, str, bool], tuple[int, int, int, int] | str]] = {
    # bench/results/gemv_sweep-NVIDIA_H200-2026-11-29-table.md (commit 27dfea2, torch 2.11, Triton
    # 3.6): the GEMV beat cuBLAS at every shape, by 1-19% (the lm_heads by 5-7%).
    "NVIDIA H200": {
        (6144, 4096, "bfloat16", False): (8, 512, 4, 2),  # qwen3-8b qkv
        (4096, 4096, "bfloat16", False): (16, 1024, 8, 2),  # qwen3-8b o
        (24576, 4096, "bfloat16", False): (32, 256, 4, 2),  # qwen3-8b gate_up
        (4096, 12288, "bfloat16", False): (16, 1024, 8, 2),  # qwen3-8b down
        (4096, 12288, "bfloat16", True): (16, 1024, 8, 2),  # qwen3-8b down+silu
        (151936, 4096, "bfloat16", False): (16, 1024, 8, 2),  # qwen3-8b lm_head
        (10240, 5120, "bfloat16", False): (8, 512, 4, 2),  # qwen3-32b qkv
        (5120, 8192, "bfloat16", False): (8, 512, 4, 2),  # qwen3-32b o
        (51200, 5120, "bfloat16", False): (4, 1024, 4, 2),  # qwen3-32b gate_up
        (5120, 25600, "bfloat16", False): (8, 512, 4, 2),  # qwen3-32b down
        (5120, 25600, "bfloat16", True): (8, 1024, 4, 2),  # qwen3-32b down+silu
        (151936, 5120, "bfloat16", False): (16, 1024, 8, 2),  # qwen3-32b lm_head
    },
}


def measured_launch(device: torch.device, n: int, k: int, row_stride: int, dtype: torch.dtype, gated: bool,
                    candidates) -> dict[str, int] | str | None:
    """The table's launch (a candidate's config dict) or VENDOR for this one-row product on
    `device`, or None: not a GPU, a card or shape the table lacks, a strided weight, an entry
    that is no longer a candidate, or PAITON_GEMV_TIMING=1."""
    if device.type != "cuda" or row_stride != k or os.environ.get("PAITON_GEMV_TIMING") == "1":
        return None
    entry = MEASURED.get(torch.cuda.get_device_name(device), {}).get((n, k, str(dtype).removeprefix("torch."), gated))
    if entry is None or entry == VENDOR:
        return entry
    block_n, block_k, num_warps, num_stages = entry
    config = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return config if config in list(candidates) else None

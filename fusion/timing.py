"""Timing a product on the GPU the way a decode step runs it, to choose between ways of
computing it: fusion/gemv.py's one-row launches and fusion/fp8_paths.py's FP8 products of
several rows are each chosen per shape with these.

Two things make such a timing match the decode step: no host launch time (a decode step runs
under CUDA graphs: `time_ms` hides the launches behind a GPU spin), and weights that come from
memory, not L2 (`cold_copies`: the product runs over copies that together outgrow L2). Every
candidate is timed once per round, in turn, for TIMING_ROUNDS rounds, and keeps its best round
(`best_times`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import torch
import triton

log = logging.getLogger(__name__)


def timed_choices() -> bool:
    """Whether the per-shape choices (gemv.choose, few_rows_gemm.choose, fp8_paths.choose_path)
    time their candidates on a GPU: yes unless PAITON_TIMED_CHOICES=0, under which each takes its
    untimed default, as during a CUDA graph capture, and keeps it (to tell a warm-up's timing
    from the rest of it, or to start without it)."""
    return os.environ.get("PAITON_TIMED_CHOICES", "1") != "0"


# Cycles of torch.cuda._sleep to queue before a timed run: raised whenever the host's launches
# outlast the spin (the GPU would then wait on the host and the time would count launches), up
# to MAX_SPIN_CYCLES (about 70 ms on a 1.98 GHz H200).
SPIN_CYCLES = [2**20]
MAX_SPIN_CYCLES = 2**27


def spin_verdict(spin_ms: float, launch_ms: float, cycles: int) -> tuple[bool, int]:
    """(keep the sample, the spin's cycles from now on) after a timed run whose spin lasted
    `spin_ms` on the GPU and whose launches took `launch_ms` on the host: kept if the spin
    outlasted the launches (fn's kernels ran back to back); else dropped and the spin doubled,
    unless it is at MAX_SPIN_CYCLES already: then kept as it is (launch time in it). Without that
    bound a run that waits for the GPU itself (a synchronizing call: its launches always outlast
    any spin) doubles the spin forever, each sample twice as long as the last."""
    if spin_ms > launch_ms or cycles >= MAX_SPIN_CYCLES:
        return True, cycles
    return False, min(cycles * 2, MAX_SPIN_CYCLES)


def time_ms(fn: Callable[[], object], replays: int = 5) -> float:
    """Median GPU time of `fn()` in ms with no host launch time in it, as a decode step under CUDA
    graphs has none: each timed call is enqueued behind a spin on the GPU (torch.cuda._sleep)
    that outlasts the host's launches, so fn's kernels then run back to back. (Timed as launched,
    a Triton launch from Python can take longer than a 15 us GEMV.) A sample whose launches
    outlasted the spin is dropped and the spin doubled, as spin_verdict says."""
    fn()  # warm: Triton's compile, cuBLAS's handle
    times: list[float] = []
    while len(times) < replays:
        spun, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        spun.record()
        torch.cuda._sleep(SPIN_CYCLES[0])
        launch = time.perf_counter()
        start.record()
        fn()
        end.record()
        launch_ms = (time.perf_counter() - launch) * 1e3
        end.synchronize()
        keep, SPIN_CYCLES[0] = spin_verdict(spun.elapsed_time(start), launch_ms, SPIN_CYCLES[0])
        if keep:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cold_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """`weight` and enough copies of it that a product over each in turn reads every one from
    memory: together they span four times the L2 cache, so by the time one is read again the
    others have pushed it out. That is how a decode step reads a weight (the other layers'
    weights come between), and it needs no cache flush between runs. Flushed, as do_bench does
    it (zeroing 256 MB before each run), H200s timed Qwen3-8B's o_proj GEMV at 28-33 us in one
    process and 14.5 us in another, against cuBLAS's 18.7, and a decode step with o_proj on
    cuBLAS was 0.3 ms slower than with the GEMV (bench/results/NOTES.md, 2026-11-29)."""
    if not weight.is_cuda:
        return [weight]
    l2_bytes = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 0) or 64 * 2**20
    count = min(16, -(-4 * l2_bytes // max(weight.numel() * weight.element_size(), 1)))
    return [weight] + [weight.clone() for _ in range(count - 1)]


def rows_bucket(rows: int) -> int:
    """The row count a choice of several rows is made for: `rows` rounded up to a power of two
    (decode batches come in every size; the choice for 8 rows holds for 5 to 8)."""
    return triton.next_power_of_2(max(rows, 1))


def bucket_probe(rows: torch.Tensor) -> torch.Tensor:
    """`rows` [M, K] repeated to rows_bucket(M) rows: the input a choice for that bucket is timed
    on (x's own rows: no random numbers drawn)."""
    bucket = rows_bucket(rows.shape[0])
    return rows.repeat(-(-bucket // rows.shape[0]), 1)[:bucket]


# Rounds of timing per shape, every candidate once per round, in turn: one candidate's median
# can be off by several percent (the GPU's clocks settling, another process's traffic), and the
# candidates of a shape are often within 10% of each other. Timed once each, in order, the
# choices for Qwen3-8B's down_proj and lm_head flipped between runs on H200s (bench/results/
# NOTES.md, profile run 4); each candidate keeps its best round.
TIMING_ROUNDS = 3



def best_times(runs: Sequence[tuple[object, Callable[[], object]]], rounds: int,
               time_ms: Callable[[Callable[[], object]], float] = time_ms, required: object = None,
               what: str = "paiton") -> list[tuple[object, float]]:
    """[(name, ms), ...] for `runs` ([(name, fn), ...]): each one's best time over `rounds`
    rounds, every run timed once per round, in turn. A run that raises (a launch this chip
    cannot make: resources, an unsupported layout) is left out and not retried, unless it is
    `required` (the baseline every choice has), whose error is raised."""
    best_ms = [float("inf")] * len(runs)
    failed: set[int] = set()
    for _ in range(rounds):
        for i, (name, run) in enumerate(runs):
            if i in failed:
                continue
            try:
                best_ms[i] = min(best_ms[i], time_ms(run))
            except Exception as error:  # not a candidate here
                if required is not None and name == required:
                    raise
                log.debug("%s: %s failed: %s", what, name, error)
                failed.add(i)
    return [(name, best_ms[i]) for i, (name, _) in enumerate(runs) if i not in failed]

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

import gc
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


# The spin queued before each timed run, in torch.cuda._sleep's cycles (about 1.98 per ns on an
# H200): each time_ms call starts from twice the host time of one warmed call of fn, at least
# BASE_SPIN_CYCLES, at most MAX_SPIN_CYCLES (about 17 ms: a timed run's launches take under 2 ms).
# A sample whose launches outlasted its spin (the GPU then waited on the host, and the time would
# count launches) is dropped and the spin raised for that call only, at most MAX_DROPS times; then
# samples are kept as they come. Nothing carries to the next call: a spin that only ever grew
# (as here until 2026-12-04) was raised for good by any one slow sample (a garbage collection, a
# compile worker taking the CPU), so every later sample of a warm-up paid the longest spin yet.
BASE_SPIN_CYCLES = 2**20
MAX_SPIN_CYCLES = 2**25
MAX_DROPS = 3
# Spin cycles per ms of GPU time, learned from every sample (the card's clock; first guess: 2 GHz).
CYCLES_PER_MS = [2.0e6]

# What the timings cost so far in this process (spent()): a warm-up that times many shapes
# prints it, so a long one says how much of it was timing.
_SPENT = {"calls": 0, "samples": 0, "dropped": 0, "seconds": 0.0}


def spin_cycles(launch_ms: float, at_least: int = BASE_SPIN_CYCLES) -> int:
    """Cycles for a spin of twice `launch_ms` (at CYCLES_PER_MS), at least `at_least` and
    BASE_SPIN_CYCLES, at most MAX_SPIN_CYCLES."""
    wanted = int(2 * max(launch_ms, 0.0) * CYCLES_PER_MS[0])
    return min(MAX_SPIN_CYCLES, max(BASE_SPIN_CYCLES, at_least, wanted))


def spin_verdict(spin_ms: float, launch_ms: float, cycles: int, drops: int) -> tuple[bool, int]:
    """(keep the sample, the spin's cycles for the next sample of this call) after a timed run
    whose spin lasted `spin_ms` on the GPU and whose launches took `launch_ms` on the host,
    `drops` samples of this call dropped before it: kept if the spin outlasted the launches
    (fn's kernels ran back to back), or if MAX_DROPS were dropped already or the spin is at
    MAX_SPIN_CYCLES (a run that waits for the GPU itself, a synchronizing call, outlasts every
    spin: kept with its launch time in it rather than retried without end); else dropped, and the
    next spin at least twice as long and twice these launches."""
    if spin_ms > launch_ms or drops >= MAX_DROPS or cycles >= MAX_SPIN_CYCLES:
        return True, cycles
    return False, spin_cycles(launch_ms, at_least=2 * cycles)


def time_ms(fn: Callable[[], object], replays: int = 5) -> float:
    """Median GPU time of `fn()` in ms with no host launch time in it, as a decode step under CUDA
    graphs has none: each timed call is enqueued behind a spin on the GPU (torch.cuda._sleep)
    that outlasts the host's launches, so fn's kernels then run back to back. (Timed as launched,
    a Triton launch from Python can take longer than a 15 us GEMV.) The spin is sized from a
    warmed call's launches and raised for a sample they outlasted, as spin_verdict says; the
    garbage collector waits while samples are taken (a collection in the middle of fn's launches
    would drop the sample)."""
    began = time.perf_counter()
    fn()  # warm: Triton's compile, cuBLAS's handle
    launch = time.perf_counter()
    fn()
    cycles, drops = spin_cycles((time.perf_counter() - launch) * 1e3), 0
    times: list[float] = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        while len(times) < replays:
            spun, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            spun.record()
            torch.cuda._sleep(cycles)
            launch = time.perf_counter()
            start.record()
            fn()
            end.record()
            launch_ms = (time.perf_counter() - launch) * 1e3
            end.synchronize()
            spin_ms = spun.elapsed_time(start)
            if spin_ms > 0:
                CYCLES_PER_MS[0] = cycles / spin_ms
            keep, next_cycles = spin_verdict(spin_ms, launch_ms, cycles, drops)
            if keep:
                times.append(start.elapsed_time(end))
            else:
                drops += 1
            cycles = next_cycles
    finally:
        if collecting:
            gc.enable()
    _SPENT["calls"] += 1
    _SPENT["samples"] += replays + drops
    _SPENT["dropped"] += drops
    _SPENT["seconds"] += time.perf_counter() - began
    return sorted(times)[len(times) // 2]


def spent() -> dict:
    """What time_ms cost this process so far: calls, samples taken, samples dropped (launches
    that outlasted their spin), seconds (warm calls included)."""
    return dict(_SPENT)


def describe_spent() -> str:
    """spent() as a phrase for a log line."""
    s = spent()
    return f"{s['calls']} timings in {s['seconds']:.1f} s, {s['samples']} samples, {s['dropped']} dropped"


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

"""fusion/timing.py: the per-shape choices' timer. Its spin grows while the host's launches
outlast it, and must stop growing: a timed run that synchronizes outlasts every spin."""

from __future__ import annotations

import time

import pytest
import torch

from paiton.fusion import timing
from paiton.fusion.timing import MAX_SPIN_CYCLES, spin_verdict


def test_a_spin_that_outlasts_the_launches_keeps_the_sample():
    assert spin_verdict(0.6, 0.2, 2**20) == (True, 2**20)


def test_launches_that_outlast_the_spin_double_it_up_to_the_bound_then_count():
    assert spin_verdict(0.5, 0.7, 2**20) == (False, 2**21)
    assert spin_verdict(30.0, 40.0, MAX_SPIN_CYCLES // 2) == (False, MAX_SPIN_CYCLES)
    # At the bound a run that always outlasts the spin (one that waits for the GPU) is kept as
    # it is instead of doubling the spin without end.
    assert spin_verdict(70.0, 80.0, MAX_SPIN_CYCLES) == (True, MAX_SPIN_CYCLES)


def test_a_spin_doubled_from_its_start_reaches_the_bound_in_few_samples():
    cycles, dropped = 2**20, 0
    while True:
        keep, cycles = spin_verdict(0.0, 1.0, cycles)  # every run outlasts its spin
        if keep:
            break
        dropped += 1
    assert cycles == MAX_SPIN_CYCLES and dropped == 7


@pytest.mark.gpu
def test_timing_a_run_that_synchronizes_ends():
    """A timed run with a synchronize in it (the host waits for the spin): time_ms returns in
    bounded time, and the spin ends at the bound, not past it."""
    x = torch.randn(1024, 1024, device="cuda")
    saved = timing.SPIN_CYCLES[0]
    try:
        began = time.perf_counter()
        ms = timing.time_ms(lambda: (x @ x, torch.cuda.synchronize()))
        assert time.perf_counter() - began < 30 and ms > 0
        assert timing.SPIN_CYCLES[0] == MAX_SPIN_CYCLES
    finally:
        timing.SPIN_CYCLES[0] = saved

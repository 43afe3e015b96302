"""fusion/timing.py: the per-shape choices' timer. Its spin is sized from each call's own
launches, grows while they outlast it, and must stop growing: a timed run that synchronizes
outlasts every spin, and one slow sample must not lengthen every later call's."""

from __future__ import annotations

import time

import pytest
import torch

from paiton.fusion import timing
from paiton.fusion.timing import BASE_SPIN_CYCLES, MAX_DROPS, MAX_SPIN_CYCLES, spin_cycles, spin_verdict


def test_a_spin_that_outlasts_the_launches_keeps_the_sample():
    assert spin_verdict(0.6, 0.2, 2**20, drops=0) == (True, 2**20)


def test_launches_that_outlast_the_spin_raise_it_for_twice_them(monkeypatch):
    monkeypatch.setattr(timing, "CYCLES_PER_MS", [2.0e6])
    assert spin_verdict(0.5, 0.5, 2**20, drops=0) == (False, 2**21)  # doubled: more than twice 0.5 ms
    assert spin_verdict(0.5, 3.0, 2**20, drops=0) == (False, 12_000_000)  # twice 3 ms at 2e6 a ms
    assert spin_verdict(10.0, 40.0, 2**24, drops=1) == (False, MAX_SPIN_CYCLES)  # bounded


def test_a_call_drops_at_most_max_drops_samples_and_keeps_at_the_bound():
    # A run that always outlasts its spin (one that waits for the GPU) is kept as it is after
    # MAX_DROPS drops instead of doubling the spin without end.
    cycles, drops = BASE_SPIN_CYCLES, 0
    while True:
        keep, cycles = spin_verdict(0.0, 1.0, cycles, drops)
        if keep:
            break
        drops += 1
    assert drops == MAX_DROPS and cycles <= MAX_SPIN_CYCLES
    assert spin_verdict(1.0, 90.0, MAX_SPIN_CYCLES, drops=0) == (True, MAX_SPIN_CYCLES)


def test_a_calls_first_spin_is_twice_its_launches_within_the_bounds(monkeypatch):
    monkeypatch.setattr(timing, "CYCLES_PER_MS", [2.0e6])
    assert spin_cycles(0.01) == BASE_SPIN_CYCLES
    assert spin_cycles(1.0) == 4_000_000
    assert spin_cycles(1e4) == MAX_SPIN_CYCLES


@pytest.mark.gpu
def test_timing_a_run_that_synchronizes_ends():
    """A timed run with a synchronize in it (the host waits for the spin): time_ms returns in
    bounded time, having dropped at most MAX_DROPS samples; and the next call of a run that
    launches quickly spins from its own launches again, not from the synchronizing run's spin."""
    x = torch.randn(1024, 1024, device="cuda")
    before = timing.spent()
    began = time.perf_counter()
    ms = timing.time_ms(lambda: (x @ x, torch.cuda.synchronize()))
    assert time.perf_counter() - began < 5 and ms > 0
    assert timing.spent()["dropped"] - before["dropped"] <= MAX_DROPS
    spins = []
    sleep = torch.cuda._sleep
    try:
        torch.cuda._sleep = lambda cycles: (spins.append(cycles), sleep(cycles))
        timing.time_ms(lambda: x @ x)
    finally:
        torch.cuda._sleep = sleep
    assert spins and spins[0] == BASE_SPIN_CYCLES, spins


def test_timed_choices_are_on_unless_the_environment_says_0(monkeypatch):
    monkeypatch.delenv("PAITON_TIMED_CHOICES", raising=False)
    assert timing.timed_choices()
    monkeypatch.setenv("PAITON_TIMED_CHOICES", "0")
    assert not timing.timed_choices()
    monkeypatch.setenv("PAITON_TIMED_CHOICES", "1")
    assert timing.timed_choices()


@pytest.mark.gpu
def test_untimed_choices_take_their_defaults_on_a_gpu(monkeypatch):
    """PAITON_TIMED_CHOICES=0: the three per-shape choices keep their untimed defaults (the FP8
    GEMV's first launch, the FP8 GEMM's first launch, the first FP8 path in the chip's order),
    recorded as "untimed", and time nothing (a timer that would fail is never called)."""
    from paiton.backends.lowering import lowering_for
    from paiton.backends.target import detect_target
    from paiton.fusion import few_rows_gemm, fp8_paths, gemv
    from paiton.fusion.fp8_linear import quantize_weight

    monkeypatch.setenv("PAITON_TIMED_CHOICES", "0")
    for module in (gemv, few_rows_gemm, fp8_paths):
        monkeypatch.setattr(module, "_CHOICES", {})
        monkeypatch.setattr(module, "_TIMINGS", {})
    def no_timing(fn, replays=5):
        pytest.fail("timed with PAITON_TIMED_CHOICES=0")

    for module, name in ((gemv, "_time_ms"), (few_rows_gemm, "time_ms"), (fp8_paths, "time_ms")):
        monkeypatch.setattr(module, name, no_timing)
    params = lowering_for("fp8_linear", detect_target(torch.device("cuda"))).params
    w8, scales = quantize_weight(torch.randn(384, 256, device="cuda"))
    x1, x8 = (torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16) for rows in (1, 8))
    assert gemv.choose(x1, w8, params["one_row_candidates"], scales=scales) == params["one_row_candidates"][0]
    assert few_rows_gemm.choose(x8, w8, params["several_rows_candidates"], scales=scales) == \
        params["several_rows_candidates"][0]
    assert fp8_paths.choose_path(x8, w8, scales, params["several_rows"]) == params["several_rows"][0]
    sources = [r["source"] for r in gemv.chosen_launches() + few_rows_gemm.chosen_launches() + fp8_paths.chosen_paths()]
    assert sources == ["untimed"] * 3

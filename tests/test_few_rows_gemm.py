"""The few-rows GEMM (fusion/few_rows_gemm.py) on weights in x's dtype, under Triton's
interpreter on the CPU (on a GPU, the compiled kernel): 2-64 rows, random widths including ones
no block divides (the masked path), dtypes and launches; how `choose` picks a launch per shape
and row count (a fake timer), drops a launch that computes something else, and leaves capture,
CPU and too many rows to the vendor; and paiton::packed_linear taking it for 2-64 rows.

Tolerance: fp32 accumulation (the interpreter's products in fp32) in another order than the
float64 reference, then one rounding to the output dtype: fp32 within 1e-5 relative to the
output's norm, bf16/fp16 within one rounding (2**-8 / 2**-11 relative) plus the sums' error.
The FP8 weights' form of the same kernel is tested in test_fp8_linear.py.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import paiton.fusion.packed_linear  # noqa: F401  (registers torch.ops.paiton.packed_linear, which a GPU test compiles)
from paiton.fusion import few_rows_gemm, split_k
from paiton.fusion.gemv import VENDOR

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}
# Small tiles keep the interpreter fast and make several K steps and row blocks at small widths.
SMALL_LAUNCHES = [few_rows_gemm.candidate(16, 32, 4, 1), few_rows_gemm.candidate(32, 16, 4, 2),
                  few_rows_gemm.candidate(16, 64, 2, 1), few_rows_gemm.candidate(16, 32, 4, 1, swap_ab=True)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(few_rows_gemm, "_CHOICES", {})
    monkeypatch.setattr(few_rows_gemm, "_TIMINGS", {})


@given(rows=st.integers(2, 64), n=st.integers(1, 90), k=st.integers(1, 150), three_d=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), launch=st.sampled_from(SMALL_LAUNCHES),
       seed=st.integers(0, 2**16))
def test_few_rows_gemm_matches_a_float64_product(rows, n, k, three_d, dtype, launch, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator).to(DEVICE, dtype)
    if three_d:  # a decode step's [batch, 1, K]
        x = x.unsqueeze(1)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    y = few_rows_gemm.launch_candidate(x, weight, launch)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype
    expected = torch.nn.functional.linear(x.double(), weight.double())
    assert not y.isnan().any()
    assert relative_error(y, expected) <= TOLERANCE[dtype], (rows, n, k, dtype, launch)


@given(rows=st.integers(2, 40), n=st.integers(1, 70), k=st.integers(1, 300), splits=st.sampled_from([2, 3, 4, 8]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), swap_ab=st.booleans(), seed=st.integers(0, 2**16))
def test_split_k_launches_match_and_leave_their_counters_at_zero(rows, n, k, splits, dtype, swap_ab, seed):
    """K cut into slices (more slices than K has tiles included: fewer run), the slices' fp32
    sums added by each tile's last program: the same product within the tolerance, the same bits
    when run again (the sum's order does not depend on which program is last), and every tile
    counter back at zero for the next product."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, k, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    launch = few_rows_gemm.candidate(16, 32, 4, 1, splits=splits, swap_ab=swap_ab)
    y = few_rows_gemm.launch_candidate(x, weight, launch)
    expected = torch.nn.functional.linear(x.double(), weight.double())
    assert y.shape == (rows, 1, n) and relative_error(y, expected) <= TOLERANCE[dtype], (rows, n, k, splits)
    assert torch.equal(few_rows_gemm.launch_candidate(x, weight, launch), y)
    counters = split_k.COUNTERS.get(str(x.device))  # none made while every K fit one tile
    assert counters is not None or k <= 32
    assert counters is None or not counters.any()


@given(rows=st.integers(17, 48), n=st.integers(1, 70), k=st.integers(1, 200), splits=st.sampled_from([1, 2, 4]),
       swap_ab=st.booleans(), seed=st.integers(0, 2**16))
def test_more_rows_than_one_program_takes(rows, n, k, splits, swap_ab, seed):
    """BLOCK_M 16 under 17-48 rows: programs over row blocks as well as W's, in either orientation
    and split or not, each writing only its rows (bf16, against a float64 product)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator).to(DEVICE, torch.bfloat16)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, torch.bfloat16)
    config = {"BLOCK_M": 16, **few_rows_gemm.candidate(16, 32, 4, 1, splits=splits, swap_ab=swap_ab)}
    y = few_rows_gemm.few_rows_gemm(x, weight, None, config)
    expected = torch.nn.functional.linear(x.double(), weight.double())
    assert y.shape == (rows, n) and relative_error(y, expected) <= TOLERANCE[torch.bfloat16], (rows, n, k, splits)


def aligned_rows(n: int, k: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A random [n, k] weight whose rows start 16 bytes apart or a multiple of that (a view of a
    wider buffer where k is not such a width): one a tensor descriptor can describe."""
    per_16_bytes = 16 // torch.empty((), dtype=dtype).element_size()
    width = -(-k // per_16_bytes) * per_16_bytes
    return torch.randn(n, width, generator=generator).to(DEVICE, dtype)[:, :k]


@given(rows=st.integers(2, 40), n=st.integers(16, 70), k=st.integers(32, 200), splits=st.sampled_from([1, 2, 3]),
       swap_ab=st.booleans(), weight_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float8_e4m3fn]),
       seed=st.integers(0, 2**16))
def test_w_tma_launches_read_the_same_tiles(rows, n, k, splits, swap_ab, weight_dtype, seed):
    """W_TMA: W's tiles through a tensor descriptor (zeros past N and K from the copy engine, not
    a mask: widths no tile divides) give the bits the threads' own loads give, split or not, in
    either orientation, for weights in x's dtype and FP8 ones with per-row scales; both against a
    float64 product."""
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if weight_dtype == torch.float8_e4m3fn else weight_dtype
    x = torch.randn(rows, k, generator=generator).to(DEVICE, dtype)
    weight = aligned_rows(n, k, torch.float32, generator).to(weight_dtype)
    weight = aligned_rows(n, k, weight_dtype, generator).copy_(weight)  # a strided view: descriptors take strides
    scales = (torch.rand(n, generator=generator) + 0.5).to(DEVICE) if weight_dtype == torch.float8_e4m3fn else None
    assert few_rows_gemm.tma_descriptor(weight, 16, 32) is not None
    plain = few_rows_gemm.candidate(16, 32, 4, 1, splits=splits, swap_ab=swap_ab)
    tma = few_rows_gemm.candidate(16, 32, 4, 1, splits=splits, swap_ab=swap_ab, tma=True)
    y = few_rows_gemm.launch_candidate(x, weight, tma, scales)
    assert torch.equal(y, few_rows_gemm.launch_candidate(x, weight, plain, scales)), (rows, n, k, splits, swap_ab)
    dense = weight.double() * (scales.double()[:, None] if scales is not None else 1)
    assert relative_error(y, x.double() @ dense.T) <= TOLERANCE[dtype] + (2**-8 if scales is not None else 0)


def test_a_weight_no_descriptor_describes_is_read_by_the_threads():
    """A W_TMA launch on a weight whose rows are not 16-byte aligned (a view one element into a
    buffer), or that is smaller than one tile: no descriptor, the threads' loads, the same product."""
    generator = torch.Generator().manual_seed(5)
    buffer = torch.randn(40, 49, generator=generator).to(DEVICE, torch.bfloat16)
    x = torch.randn(6, 48, generator=generator).to(DEVICE, torch.bfloat16)
    for weight in (buffer[:, 1:], buffer[:8, :48].contiguous(), buffer[:, :16].contiguous()):
        assert few_rows_gemm.tma_descriptor(weight, 16, 32) is None
        rows = x[:, :weight.shape[1]]
        y = few_rows_gemm.launch_candidate(rows, weight, few_rows_gemm.candidate(16, 32, 4, 1, tma=True))
        assert torch.equal(y, few_rows_gemm.launch_candidate(rows, weight, few_rows_gemm.candidate(16, 32, 4, 1)))


def test_k_slices_are_whole_tiles():
    assert split_k.k_slices(8192, 128, 4) == (2048, 4)
    assert split_k.k_slices(300, 32, 4) == (96, 4)  # 10 tiles: 3, 3, 3, 1
    assert split_k.k_slices(64, 32, 8) == (32, 2)  # 2 tiles: 2 slices, not 8
    assert split_k.k_slices(100, 128, 4) == (128, 1)


def test_a_strided_input_and_a_weight_view_are_read_where_they_lie():
    """x as a column slice of a wider matrix (the gate half of a gate/up product) and W as a row
    block of a packed buffer (a merged projection's slice)."""
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 96, generator=generator)
    x = wide[:, :48]
    packed = torch.randn(70, 48, generator=generator)
    weight = packed[20:60]
    for launch in (SMALL_LAUNCHES[0], few_rows_gemm.candidate(16, 16, 4, 1, splits=3)):
        y = few_rows_gemm.launch_candidate(x, weight, launch)
        assert relative_error(y, x.double() @ weight.double().T) <= 1e-5


def fake_timer(times_by_block_n):
    """A timer for `choose` (the tests cannot time a CPU): each run's time from the launch it
    makes, read off the BLOCK_N it passes to the kernel ("silu first N" for a gated product's
    SILU_FIRST form of that launch, "silu after N" for a gate/up product's SILU_AFTER form: the
    slowest where the test gives it no time); the vendor's (torch's linear) when it launches none."""
    calls = []

    def time_ms(fn):
        launched = []
        original = few_rows_gemm.launch_candidate

        def spy(x, weight, config, scales=None, up=None, swiglu_out=False):
            form = "silu first " if config.get("SILU_FIRST") else "silu after " if config.get(few_rows_gemm.SILU_AFTER) else ""
            launched.append(f"{form}{config['BLOCK_N']}" if form else config["BLOCK_N"])
            return original(x, weight, config, scales, up, swiglu_out)

        few_rows_gemm.launch_candidate = spy
        try:
            fn()
        finally:
            few_rows_gemm.launch_candidate = original
        key = launched[0] if launched else VENDOR
        calls.append(key)
        if isinstance(key, str) and key.startswith(("silu first", "silu after")):
            return times_by_block_n.get(key, 1e3)
        return times_by_block_n[key]

    return time_ms, calls


def test_choose_keeps_the_fastest_launch_per_shape_and_row_bucket(fresh_choices):
    weight = torch.randn(40, 64)
    x = torch.randn(5, 64)
    timer, calls = fake_timer({VENDOR: 1.0, 16: 0.9, 32: 0.5})
    launches = SMALL_LAUNCHES[:2]  # BLOCK_N 16 and 32
    assert few_rows_gemm.choose(x, weight, launches, time_ms_fn=timer) == launches[1]
    assert set(calls) == {VENDOR, 16, 32} and len(calls) == 3 * 3  # TIMING_ROUNDS rounds of each
    calls.clear()
    # 7 rows share 5's bucket (8): kept, not timed again; 9 rows are another bucket (16).
    assert few_rows_gemm.choose(torch.randn(7, 64), weight, launches, time_ms_fn=timer) == launches[1]
    assert calls == []
    few_rows_gemm.choose(torch.randn(9, 64), weight, launches, time_ms_fn=timer)
    assert calls
    records = {(r["rows"], r["n"], r["k"]): r for r in few_rows_gemm.chosen_launches()}
    assert set(records) == {(8, 40, 64), (16, 40, 64)}
    assert records[(8, 40, 64)]["source"] == "timed" and records[(8, 40, 64)]["disagreeing"] == []


def test_choose_keeps_the_vendor_where_it_is_as_fast(fresh_choices):
    timer, _ = fake_timer({VENDOR: 0.5, 16: 0.5, 32: 0.6})
    assert few_rows_gemm.choose(torch.randn(3, 32), torch.randn(24, 32), SMALL_LAUNCHES[:2], time_ms_fn=timer) == VENDOR


def test_choose_for_an_fp8_weight_times_its_launches_alone(fresh_choices):
    """An FP8 weight (fusion/fp8_paths.py's FP8_GEMM) has no vendor GEMM: its launches alone are
    timed, with its scales, against torch's product of the dequantized weight; the choice is its
    own, apart from a bf16 weight's of the same shape; block scales keep the launches whose
    BLOCK_K divides their 128-wide blocks."""
    from paiton.fusion.fp8_linear import quantize_weight

    weight = torch.randn(40, 64)
    w8, scales = quantize_weight(weight, torch.float8_e4m3fn)
    x = torch.randn(5, 64)
    timer, calls = fake_timer({16: 0.9, 32: 0.5})
    assert few_rows_gemm.choose(x, w8, SMALL_LAUNCHES[:2], time_ms_fn=timer, scales=scales) == SMALL_LAUNCHES[1]
    assert VENDOR not in calls and len(calls) == 2 * 3
    (record,) = few_rows_gemm.chosen_launches()
    assert record["weight_dtype"] == "float8_e4m3fn" and record["disagreeing"] == []
    assert (record["first_launch_us"], record["chosen_us"]) == (900.0, 500.0)
    calls.clear()
    timer, calls = fake_timer({VENDOR: 0.1, 16: 0.9, 32: 0.5})
    assert few_rows_gemm.choose(x, weight, SMALL_LAUNCHES[:2], time_ms_fn=timer) == VENDOR and VENDOR in calls
    wide = few_rows_gemm.candidate(32, 256, 4, 1)  # 256 does not divide a 128-wide scale block
    timer, calls = fake_timer({16: 0.9, 32: 0.1})
    block_scales = torch.rand(1, 1) + 0.5
    assert few_rows_gemm.choose(x, w8, [SMALL_LAUNCHES[0], wide], time_ms_fn=timer, scales=block_scales) == SMALL_LAUNCHES[0]
    assert 32 not in calls


def test_choose_for_an_fp8_gate_up_times_both_forms_of_its_launches_alone(fresh_choices):
    """An FP8 gate/up weight with `swiglu_out`: no vendor form (FP8 has no vendor GEMM), each
    launch fused (SWIGLU_OUT) and plain then silu_mul (SILU_AFTER), checked against SwiGLU on the
    dequantized weight's product; the fused untimed launch is the baseline; the record says
    swiglu_out and FP8."""
    from paiton.fusion.fp8_linear import quantize_weight

    w8, scales = quantize_weight(torch.randn(48, 64), torch.float8_e4m3fn)  # [gate; up], 24 rows each
    x = torch.randn(5, 64)
    timer, calls = fake_timer({16: 0.9, 32: 0.7, "silu after 16": 0.8, "silu after 32": 0.6})
    choice = few_rows_gemm.choose(x, w8, SMALL_LAUNCHES[:2], time_ms_fn=timer, scales=scales, swiglu_out=True)
    assert choice == {**SMALL_LAUNCHES[1], few_rows_gemm.SILU_AFTER: True}
    assert VENDOR not in calls and set(calls) == {16, 32, "silu after 16", "silu after 32"}
    (record,) = few_rows_gemm.chosen_launches()
    assert record["swiglu_out"] and record["weight_dtype"] == "float8_e4m3fn" and record["disagreeing"] == []
    assert (record["first_launch_us"], record["chosen_us"]) == (900.0, 600.0)


def test_choose_leaves_the_w_tma_launches_out_under_paiton_w_tma_0(fresh_choices, monkeypatch):
    """PAITON_W_TMA=0 (a benchmark's "-notma" A/B): the W_TMA launches are not timed, and the
    choice made without them is kept apart from the one made with them."""
    x, weight = torch.randn(4, 64), torch.randn(96, 64)
    plain, tma = few_rows_gemm.candidate(16, 32, 4, 1), few_rows_gemm.candidate(32, 32, 4, 1, tma=True)
    timer, calls = fake_timer({VENDOR: 1.0, 16: 0.9, 32: 0.5})
    assert few_rows_gemm.choose(x, weight, [plain, tma], time_ms_fn=timer) == tma
    calls.clear()
    monkeypatch.setenv(few_rows_gemm.W_TMA_ENV, "0")
    assert few_rows_gemm.choose(x, weight, [plain, tma], time_ms_fn=timer) == plain
    assert set(calls) == {VENDOR, 16}
    monkeypatch.delenv(few_rows_gemm.W_TMA_ENV)
    assert few_rows_gemm.choose(x, weight, [plain, tma], time_ms_fn=timer) == tma  # both choices kept
    # The records say which choice was made without them.
    assert [(r["choice"], r.get("w_tma", True)) for r in few_rows_gemm.chosen_launches()] == [(tma, True), (plain, False)]


def test_choose_drops_a_launch_that_computes_something_else(fresh_choices, monkeypatch, caplog):
    """A kernel that is wrong on some chip is never chosen, however fast it times."""
    original = few_rows_gemm.launch_candidate

    def wrong_for_wide_tiles(x, weight, config, scales=None, up=None, swiglu_out=False):
        y = original(x, weight, config, scales, up, swiglu_out)
        return y + 1.0 if config["BLOCK_N"] == 32 else y

    monkeypatch.setattr(few_rows_gemm, "launch_candidate", wrong_for_wide_tiles)
    timer, calls = fake_timer({VENDOR: 1.0, 16: 0.9, 32: 0.1})
    with caplog.at_level("WARNING"):
        choice = few_rows_gemm.choose(torch.randn(4, 64), torch.randn(40, 64), SMALL_LAUNCHES[:2], time_ms_fn=timer)
    assert choice == SMALL_LAUNCHES[0]
    assert 32 not in calls and "disagree" in caplog.text
    assert few_rows_gemm.chosen_launches()[0]["disagreeing"] == [SMALL_LAUNCHES[1]]


def test_choose_leaves_what_it_cannot_time_to_the_vendor(fresh_choices, monkeypatch):
    weight = torch.randn(24, 32)
    # Too many rows: the vendor, untimed, not even recorded.
    assert few_rows_gemm.choose(torch.randn(65, 32), weight, SMALL_LAUNCHES) == VENDOR
    assert few_rows_gemm.chosen_launches() == []
    # No candidates (a chip whose table has none).
    assert few_rows_gemm.choose(torch.randn(4, 32), weight, ()) == VENDOR
    # A CPU without a timer: the vendor, kept as a fallback.
    assert few_rows_gemm.choose(torch.randn(4, 32), weight, SMALL_LAUNCHES) == VENDOR
    assert few_rows_gemm.chosen_launches()[0]["source"] == "fallback"


def test_packed_linear_takes_the_kernel_for_two_to_64_rows(monkeypatch):
    """paiton::packed_linear: 2-64 rows through the few-rows kernel (the interpreter's launch on
    CPU), 1 row through the GEMV, more than 64 through torch's linear; same products."""
    import paiton.fusion.packed_linear  # noqa: F401  (registers the op)

    launched = []
    original = few_rows_gemm.launch_candidate

    def spy(x, weight, config, up=None, swiglu_out=False):
        launched.append((x.shape, up is not None))
        return original(x, weight, config, up=up, swiglu_out=swiglu_out)

    monkeypatch.setattr(few_rows_gemm, "launch_candidate", spy)
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(50, 40, generator=generator)
    for rows, through_kernel in ((1, False), (2, True), (17, True), (64, True), (65, False)):
        launched.clear()
        x = torch.randn(rows, 1, 40, generator=generator)
        y = torch.ops.paiton.packed_linear(x, [weights[:30], weights[30:]])
        assert bool(launched) == through_kernel, rows
        assert relative_error(y, x.double() @ weights.double().T) <= 1e-5
        gate, up = torch.randn(2, rows, 40, generator=generator)
        launched.clear()
        y = torch.ops.paiton.silu_mul_packed_linear(gate, up, [weights])
        expected = torch.nn.functional.silu(gate.double()) * up.double() @ weights.double().T
        assert relative_error(y, expected) <= 1e-5
        assert launched == ([((rows, 40), True)] if through_kernel else []), rows  # gated: SwiGLU as x loads


@given(rows=st.integers(2, 64), n=st.integers(1, 70), k=st.integers(1, 150), three_d=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       launch=st.sampled_from(SMALL_LAUNCHES + [few_rows_gemm.candidate(16, 32, 4, 1, splits=3)]),
       seed=st.integers(0, 2**16))
def test_gated_launch_equals_silu_mul_then_the_product(rows, n, k, three_d, dtype, launch, seed):
    """GATED (SwiGLU applied as x loads, down_proj at 2-64 rows): the same bits as the same launch
    on paiton::silu_mul's output (silu(gate) * up rounded as silu_mul rounds it), split or not."""
    from paiton.fusion.swiglu import silu_mul

    generator = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(rows, k, generator=generator).to(DEVICE, dtype) for _ in range(2))
    if three_d:  # a decode step's [batch, 1, K]
        gate, up = gate.unsqueeze(1), up.unsqueeze(1)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    gated = few_rows_gemm.launch_candidate(gate, weight, launch, up=up)
    assert torch.equal(gated, few_rows_gemm.launch_candidate(silu_mul(gate, up), weight, launch))


def test_choose_times_a_gated_product_against_silu_mul_and_the_vendor(fresh_choices, monkeypatch):
    """With `up`: a choice of its own (not the plain product's), the vendor's run being silu_mul
    then torch's linear; the record says gated."""
    from paiton.fusion import swiglu

    silu_calls = []
    original = swiglu.silu_mul
    monkeypatch.setattr(few_rows_gemm, "silu_mul", lambda g, u: silu_calls.append(1) or original(g, u))
    weight, gate, up = torch.randn(40, 64), torch.randn(5, 64), torch.randn(5, 64)
    timer, calls = fake_timer({VENDOR: 1.0, 16: 0.9, 32: 0.5})
    launches = SMALL_LAUNCHES[:2]
    assert few_rows_gemm.choose(gate, weight, launches, time_ms_fn=timer, up=up) == launches[1]
    assert silu_calls  # the vendor's run (and the expected product) go through silu_mul
    timer, _ = fake_timer({VENDOR: 0.1, 16: 0.9, 32: 0.5})
    assert few_rows_gemm.choose(gate, weight, launches, time_ms_fn=timer) == VENDOR  # the plain product: its own
    records = {bool(r.get("gated")): r for r in few_rows_gemm.chosen_launches()}
    assert records[True]["choice"] == launches[1] and records[False]["choice"] == VENDOR
    assert any("gated" in line for line in few_rows_gemm.describe_choices())


def test_choose_times_each_gated_launch_also_after_silu_mul(fresh_choices):
    """A gated product's launches are timed in both forms, gated and SILU_FIRST (silu_mul's
    kernel, then the launch plain: where the gated loads cost more than that kernel, the plain
    launch still beats the vendor); the faster form is kept, and it gives the bits of the same
    launch on silu_mul's output."""
    from paiton.fusion.gemv import silu_first
    from paiton.fusion.swiglu import silu_mul

    weight, gate, up = torch.randn(40, 64), torch.randn(5, 64), torch.randn(5, 64)
    launches = SMALL_LAUNCHES[:2]
    timer, calls = fake_timer({VENDOR: 1.0, 16: 0.9, 32: 0.8, "silu first 16": 0.95, "silu first 32": 0.5})
    choice = few_rows_gemm.choose(gate, weight, launches, time_ms_fn=timer, up=up)
    assert choice == silu_first(launches[1])
    assert {16, 32, "silu first 16", "silu first 32", VENDOR} <= set(calls)
    y = few_rows_gemm.launch_candidate(gate, weight, choice, up=up)
    assert torch.equal(y, few_rows_gemm.launch_candidate(silu_mul(gate, up), weight, launches[1]))
    expected = torch.nn.functional.silu(gate.double()) * up.double() @ weight.double().T
    assert relative_error(y, expected) <= 1e-5
    (record,) = few_rows_gemm.chosen_launches()
    assert record["gated"] and record["choice"] == silu_first(launches[1])


@given(rows=st.integers(2, 64), inner=st.integers(1, 60), k=st.integers(1, 150), three_d=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       launch=st.sampled_from(SMALL_LAUNCHES + [few_rows_gemm.candidate(16, 32, 4, 1, splits=3),
                                                few_rows_gemm.candidate(16, 32, 4, 1, splits=2, swap_ab=True)]),
       seed=st.integers(0, 2**16))
def test_swiglu_out_launch_equals_the_product_then_silu_mul(rows, inner, k, three_d, dtype, launch, seed):
    """SWIGLU_OUT (gate/up at 2-64 rows): silu(x @ gate.T) * (x @ up.T), each product rounded to
    the output dtype first, as the same launch's plain product and then paiton::silu_mul give it
    (SILU_AFTER: those two kernels); split or not, the tiles' counters left at zero. Against the
    plain launch then silu_mul: the same sums and roundings, within the tolerance relative to the
    output's norm (on CPU silu_mul is torch's, whose exp may differ from the interpreter's in
    fp32's last bits, and the interpreter's fp32 dot may sum in another order for another tile's
    memory); against float64: one rounding of each product and of the result."""
    from paiton.fusion.swiglu import silu_mul

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator).to(DEVICE, dtype)
    if three_d:  # a decode step's [batch, 1, K]
        x = x.unsqueeze(1)
    weight = torch.randn(2 * inner, k, generator=generator).to(DEVICE, dtype)  # [gate; up]
    y = few_rows_gemm.launch_candidate(x, weight, launch, swiglu_out=True)
    assert y.shape == (*x.shape[:-1], inner) and y.dtype == dtype
    two_kernels = few_rows_gemm.launch_candidate(x, weight, {**launch, few_rows_gemm.SILU_AFTER: True}, swiglu_out=True)
    plain = few_rows_gemm.launch_candidate(x, weight, launch)
    assert torch.equal(two_kernels, silu_mul(*plain.chunk(2, dim=-1)))
    assert relative_error(y, two_kernels.double()) <= TOLERANCE[dtype], (rows, inner, k, dtype, launch)
    product = x.double() @ weight.double().T
    expected = torch.nn.functional.silu(product[..., :inner]) * product[..., inner:]
    assert relative_error(y, expected) <= 4 * TOLERANCE[dtype], (rows, inner, k, dtype, launch)
    if launch.get("SPLITS", 1) > 1:
        assert not split_k.COUNTERS.get(str(x.device), torch.zeros(1)).any()


def test_swiglu_out_takes_a_packed_gate_up_weight_only():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="swiglu_out takes a gate/up packed W"):
        few_rows_gemm.launch_candidate(x, torch.randn(33, 32), SMALL_LAUNCHES[0], swiglu_out=True)  # odd rows
    with pytest.raises(ValueError, match="SILU_AFTER is a launch of a gate/up product"):
        few_rows_gemm.launch_candidate(x, torch.randn(32, 32), {**SMALL_LAUNCHES[0], few_rows_gemm.SILU_AFTER: True})


def test_choose_times_a_swiglu_out_product_in_both_forms_against_the_vendor(fresh_choices):
    """With `swiglu_out`: a choice of its own, among the vendor's product then silu_mul and each
    launch fused (SWIGLU_OUT) and plain then silu_mul (SILU_AFTER); the faster kept, its record
    saying swiglu_out; a shared-memory estimate that counts two W tiles a stage."""
    from paiton.fusion.swiglu import silu_mul

    weight, x = torch.randn(40, 64), torch.randn(5, 64)
    launches = SMALL_LAUNCHES[:2]
    timer, calls = fake_timer({VENDOR: 1.0, 16: 0.9, 32: 0.8, "silu after 16": 0.95, "silu after 32": 0.5})
    choice = few_rows_gemm.choose(x, weight, launches, time_ms_fn=timer, swiglu_out=True)
    assert choice == {**launches[1], few_rows_gemm.SILU_AFTER: True}
    assert {16, 32, "silu after 16", "silu after 32", VENDOR} <= set(calls)
    y = few_rows_gemm.launch_candidate(x, weight, choice, swiglu_out=True)
    assert torch.equal(y, silu_mul(*few_rows_gemm.launch_candidate(x, weight, launches[1]).chunk(2, dim=-1)))
    timer, _ = fake_timer({VENDOR: 1.0, 16: 0.9, 32: 0.3})
    assert few_rows_gemm.choose(x, weight, launches, time_ms_fn=timer) == launches[1]  # the plain product: its own
    records = {bool(r.get("swiglu_out")): r for r in few_rows_gemm.chosen_launches()}
    assert records[True]["choice"] == choice and records[False]["choice"] == launches[1]
    assert any("SwiGLU on the gate/up halves" in line for line in few_rows_gemm.describe_choices())
    config = few_rows_gemm.candidate(64, 128, 4, 4)
    plain_bytes = few_rows_gemm.shared_bytes(config, 32, 2)
    assert few_rows_gemm.shared_bytes(config, 32, 2, swiglu_out=True) > plain_bytes
    assert few_rows_gemm.shared_bytes({**config, few_rows_gemm.SILU_AFTER: True}, 32, 2, swiglu_out=True) == plain_bytes


def test_packed_linear_silu_mul_takes_the_kernel_for_two_to_64_rows(monkeypatch):
    """paiton::packed_linear_silu_mul: SwiGLU on the gate/up product's halves; 2-64 rows through
    the few-rows kernel fused (the interpreter's launch on CPU), 1 row and more than 64 through
    the product and then silu_mul; its fake gives [..., I]; two weights of one shape only."""
    import paiton.fusion.packed_linear  # noqa: F401  (registers the op)
    from paiton.fusion.swiglu import silu_mul_reference

    launched = []
    original = few_rows_gemm.launch_candidate

    def spy(x, weight, config, up=None, swiglu_out=False):
        launched.append(swiglu_out)
        return original(x, weight, config, up=up, swiglu_out=swiglu_out)

    monkeypatch.setattr(few_rows_gemm, "launch_candidate", spy)
    generator = torch.Generator().manual_seed(0)
    packed = torch.randn(60, 40, generator=generator)
    gate_w, up_w = packed[:30], packed[30:]
    for rows, through_kernel in ((1, False), (2, True), (17, True), (64, True), (65, False)):
        launched.clear()
        x = torch.randn(rows, 1, 40, generator=generator)
        y = torch.ops.paiton.packed_linear_silu_mul(x, [gate_w, up_w])
        assert y.shape == (rows, 1, 30)
        assert launched == ([True] if through_kernel else []), rows
        expected = silu_mul_reference(x.double() @ gate_w.double().T, x.double() @ up_w.double().T)
        assert relative_error(y, expected) <= 1e-5
    with torch._subclasses.FakeTensorMode():
        fake = torch.ops.paiton.packed_linear_silu_mul(torch.empty(8, 1, 40), [torch.empty(30, 40), torch.empty(30, 40)])
    assert fake.shape == (8, 1, 30)
    with pytest.raises(ValueError, match="two weights of one shape"):
        torch.ops.paiton.packed_linear_silu_mul(torch.randn(4, 1, 40), [packed[:20], packed[20:]])


def launches_the_chip_makes(configs, launch):
    """(config, output) of each launch of `configs` the chip can make: a launch it cannot
    (resources: shared memory) is no candidate there; any other failure is the test's."""
    for config in configs:
        try:
            y = launch(config)
        except Exception as error:
            assert "resources" in str(error).lower() or "shared memory" in str(error).lower(), error
            continue
        yield config, y


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [2, 8, 32, 64])
def test_few_rows_gemm_at_qwen3_32b_shapes_on_gpu(rows, fresh_choices):
    """Every candidate of the H200's table at Qwen3-32B's narrowest and widest weights, bf16,
    against a float64 product (split-K ones also the same bits five times over); then `choose` times them against cuBLAS and picks one whose
    product agrees."""
    from paiton.backends.lowering import lowering_for
    from paiton.backends.target import detect_target

    candidates = lowering_for("few_rows_linear", detect_target(torch.device("cuda"))).params["candidates"]
    for n, k in ((5120, 8192), (10240, 5120)):
        weight = (torch.randn(n, k, device="cuda") / k**0.5).bfloat16()
        x = torch.randn(rows, 1, k, device="cuda").bfloat16()
        expected = x.double() @ weight.double().T
        ran = 0
        for config, y in launches_the_chip_makes(candidates, lambda config: few_rows_gemm.launch_candidate(x, weight, config)):
            ran += 1
            assert relative_error(y, expected) <= 2**-7, (n, k, rows, config)
            if config.get("SPLITS", 1) > 1:  # a race between a tile's slices would move the bits
                assert all(torch.equal(few_rows_gemm.launch_candidate(x, weight, config), y) for _ in range(5)), config
        assert ran >= len(candidates) // 2
        choice = few_rows_gemm.choose(x, weight, candidates)
        assert choice == VENDOR or choice in candidates


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [2, 8, 32, 64])
def test_gated_few_rows_gemm_at_qwen3_32b_down_proj_on_gpu(rows, fresh_choices):
    """down_proj's product with SwiGLU applied as x loads (GATED), bf16, Qwen3-32B's [5120 x 25600]:
    every candidate against a float64 product of silu(gate) * up; then `choose` times them (gated
    and after silu_mul) against silu_mul + cuBLAS and picks one whose product agrees (its choice
    and times printed)."""
    from paiton.backends.lowering import lowering_for
    from paiton.backends.target import detect_target
    from paiton.fusion.gemv import silu_first

    candidates = lowering_for("few_rows_linear", detect_target(torch.device("cuda"))).params["candidates"]
    weight = (torch.randn(5120, 25600, device="cuda") / 25600**0.5).bfloat16()
    gate, up = (torch.randn(rows, 1, 25600, device="cuda").bfloat16() for _ in range(2))
    expected = (torch.nn.functional.silu(gate.float()).bfloat16().double() * up.double()) @ weight.double().T
    ran = 0
    for config, y in launches_the_chip_makes(candidates, lambda config: few_rows_gemm.launch_candidate(gate, weight, config,
                                                                                                       up=up)):
        ran += 1
        assert relative_error(y, expected) <= 2**-7, (rows, config)
    assert ran >= len(candidates) // 2
    choice = few_rows_gemm.choose(gate, weight, candidates, up=up)
    assert choice == VENDOR or choice in candidates or choice in [silu_first(config) for config in candidates]
    print("\n" + "\n".join(few_rows_gemm.describe_choices()))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [2, 8, 32, 64])
def test_swiglu_out_few_rows_gemm_at_qwen3_32b_gate_up_on_gpu(rows, fresh_choices):
    """Qwen3-32B's gate/up product with SwiGLU in its last step (SWIGLU_OUT), bf16, [2 x 25600 x
    5120]: every candidate that fits the chip against a float64 product and SwiGLU (split ones
    also the same bits five times over); then `choose` times them (fused and SILU_AFTER) against
    cuBLAS + silu_mul and picks one whose output agrees (its choice and times printed)."""
    from paiton.backends.lowering import lowering_for
    from paiton.backends.target import detect_target

    target = detect_target(torch.device("cuda"))
    candidates = lowering_for("few_rows_linear", target).params["candidates"]
    weight = (torch.randn(2 * 25600, 5120, device="cuda") / 5120**0.5).bfloat16()
    x = torch.randn(rows, 1, 5120, device="cuda").bfloat16()
    product = (x.double() @ weight.double().T).bfloat16().double()  # each product rounded, as the kernel does
    expected = torch.nn.functional.silu(product[..., :25600]).bfloat16().double() * product[..., 25600:]
    fitting = few_rows_gemm.fitting(candidates, rows, 2, target.shared_memory_per_block, swiglu_out=True)
    ran = 0

    def fused(config):
        return few_rows_gemm.launch_candidate(x, weight, config, swiglu_out=True)

    for config, y in launches_the_chip_makes(fitting, fused):
        ran += 1
        assert relative_error(y, expected) <= 2**-7, (rows, config)
        if config.get("SPLITS", 1) > 1:
            assert all(torch.equal(fused(config), y) for _ in range(5)), config
    assert ran >= len(fitting) // 2 and ran >= len(candidates) // 2
    choice = few_rows_gemm.choose(x, weight, candidates, swiglu_out=True)
    assert choice == VENDOR or choice in few_rows_gemm.swiglu_out_forms(candidates)
    print("\n" + "\n".join(few_rows_gemm.describe_choices()))
    (record,) = few_rows_gemm.chosen_launches()
    print({str(config): us for config, us in record["candidate_times"]})


@pytest.mark.gpu
def test_split_launch_first_used_in_a_cuda_graph_trees_warm_up(monkeypatch, fresh_choices):
    """A split launch first used inside torch.compile's reduce-overhead warm-up (CUDA-graph trees
    send that run's allocations to their private pool): its tile counters must come from outside
    the pool, or the next recording fails with "tensor(s) in the cudagraph pool not tracked as
    outputs" (a request of the H200's server failed so at 18612d0). Runs the compiled module
    until its graph is recorded and replayed, and checks the product each time."""
    monkeypatch.setattr(split_k, "COUNTERS", {})
    split = few_rows_gemm.candidate(32, 128, 4, 4, splits=4)
    monkeypatch.setattr(few_rows_gemm, "choose", lambda x, weight, candidates, up=None, swiglu_out=False: split)
    weight = (torch.randn(512, 4096, device="cuda") / 64).bfloat16()

    def product(x):
        return torch.ops.paiton.packed_linear(x * 2, [weight]) + 1

    compiled = torch.compile(product, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up (the counters are made here), recording, replays
        x = torch.randn(4, 1, 4096, device="cuda").bfloat16()
        y = compiled(x).clone()
        expected = (x * 2).double() @ weight.double().T + 1
        assert relative_error(y, expected) <= 2**-7
    counters = split_k.COUNTERS["cuda:0"]
    assert not counters.any()  # every split launch left its tiles' counters at zero

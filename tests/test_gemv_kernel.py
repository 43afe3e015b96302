"""The one-row linear kernel (fusion/gemv.py) against float64 products, under Triton's
interpreter on the CPU (on a GPU, the compiled kernel): random widths, including ones no block
divides (the masked path), dtypes and launch configurations; its gated form (SwiGLU applied
to the input as it loads) against paiton.silu_mul followed by the plain kernel, bit for bit;
and how `choose` picks a launch.

Tolerance: fp32 accumulation in another order than the reference's, then one rounding to the
output dtype: fp32 within 1e-5 relative to the output's norm, bf16/fp16 within one rounding of
the output (2**-8 / 2**-11 relative) plus the accumulation's error.
"""

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from paiton.fusion import gemv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}
# Small tiles keep the interpreter fast and make several K steps and row blocks at small widths.
SMALL_CONFIGS = [gemv.gemv_config(4, 32, 4, 2), gemv.gemv_config(8, 64, 4, 2), gemv.gemv_config(16, 16, 2, 1)]
# The kernel's other forms too: x loaded in W's layout (x_per_row), CHUNK neighbours' products
# summed as they are made.
KERNEL_CONFIGS = SMALL_CONFIGS + [gemv.gemv_config(8, 64, 4, 1, x_per_row=True, chunk=16),
                                  gemv.gemv_config(4, 32, 2, 1, x_per_row=True, chunk=8), gemv.gemv_config(16, 32, 4, 1, chunk=16)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@given(n=st.integers(1, 70), k=st.integers(1, 200), leading=st.sampled_from([(), (1,), (1, 1)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), config=st.sampled_from(KERNEL_CONFIGS),
       seed=st.integers(0, 2**16))
def test_gemv_matches_a_float64_product(n, k, leading, dtype, config, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, k, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    y = gemv.launch_gemv(x, weight, config)
    assert y.shape == (*leading, n) and y.dtype == dtype
    expected = torch.nn.functional.linear(x.double(), weight.double())
    assert not y.isnan().any()
    assert relative_error(y, expected) <= TOLERANCE[dtype], (n, k, dtype, config)


@given(n=st.integers(1, 40), k=st.integers(1, 150), leading=st.sampled_from([(), (1,), (1, 1)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), config=st.sampled_from(KERNEL_CONFIGS),
       seed=st.integers(0, 2**16))
def test_gated_gemv_is_silu_mul_then_the_gemv(n, k, leading, dtype, config, seed):
    """The gated kernel rounds silu(gate) * up as paiton.silu_mul does (one shared helper) and
    then accumulates in the plain kernel's order: the same bits as the two ops in turn; and
    eager's SwiGLU followed by a float64 product within twice the plain tolerance (silu's exp
    may round the activation one unit apart from torch's, then the output rounds). Not for
    bf16 under the interpreter, whose fp32 -> bf16 casts round toward zero (ENV_NOTES): the
    activation's two casts bias every element the same way, which a sum can magnify."""
    from paiton.fusion.swiglu import silu_mul, silu_mul_reference

    generator = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(*leading, k, generator=generator)).to(DEVICE, dtype)
    up = torch.randn(*leading, k, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    y = gemv.launch_gemv(gate, weight, config, up=up)
    assert y.shape == (*leading, n) and y.dtype == dtype
    torch.testing.assert_close(y, gemv.launch_gemv(silu_mul(gate, up), weight, config), rtol=0, atol=0)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        return
    expected = torch.nn.functional.linear(silu_mul_reference(gate, up).double(), weight.double())
    assert relative_error(y, expected) <= 2 * TOLERANCE[dtype], (n, k, dtype, config)


def test_gated_gemv_rejects_an_up_of_another_shape_or_dtype():
    gate, weight = torch.randn(1, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="up must have x's shape"):
        gemv.launch_gemv(gate, weight, SMALL_CONFIGS[0], up=torch.randn(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="up must have x's shape"):
        gemv.launch_gemv(gate, weight, SMALL_CONFIGS[0], up=torch.randn(1, 16, device=DEVICE, dtype=torch.float16))


def test_gemv_reads_a_strided_weight_and_a_strided_row():
    """A weight that is a block of rows of a wider buffer (a packed q/k/v weight's view) and a
    row that is a slice with a stride."""
    buffer = torch.randn(40, 96, device=DEVICE)
    weight = buffer[8:30, :64]  # row stride 96
    x = torch.randn(1, 128, device=DEVICE)[:, ::2]
    y = gemv.launch_gemv(x, weight, SMALL_CONFIGS[1])
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_gemv_rejects_more_than_one_row_and_a_wrong_width():
    weight = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        gemv.launch_gemv(torch.randn(2, 16, device=DEVICE), weight, SMALL_CONFIGS[0])
    with pytest.raises(ValueError, match="one row"):
        gemv.launch_gemv(torch.randn(1, 15, device=DEVICE), weight, SMALL_CONFIGS[0])


def sequence_timer(speeds, calls):
    """A time_ms for `choose` that says speeds[i] for the i-th run of each round (the baseline,
    then each candidate in order), counting the runs in `calls`."""
    def time_ms(fn):
        calls.append(fn)
        return speeds[(len(calls) - 1) % len(speeds)]
    return time_ms


def test_choose_keeps_the_fastest_per_shape_and_times_each_shape_once(monkeypatch):
    monkeypatch.setattr(gemv, "_CHOICES", {})
    monkeypatch.setattr(gemv, "_TIMINGS", {})
    x, weight = torch.randn(1, 16), torch.randn(8, 16)
    calls = []
    fake_timer = functools.partial(sequence_timer, calls=calls)
    rounds = gemv.TIMING_ROUNDS
    assert gemv.choose(x, weight, SMALL_CONFIGS, fake_timer([3.0, 2.0, 1.0, 4.0])) == SMALL_CONFIGS[1]
    assert len(calls) == 4 * rounds
    assert gemv.choose(x, weight, SMALL_CONFIGS, fake_timer([9.0] * 4)) == SMALL_CONFIGS[1] and len(calls) == 4 * rounds
    other = torch.randn(24, 16)
    calls.clear()
    assert gemv.choose(x, other, SMALL_CONFIGS, fake_timer([1.0, 2.0, 3.0, 4.0])) == gemv.VENDOR
    assert list(gemv.choices().values()) == [SMALL_CONFIGS[1], gemv.VENDOR]
    assert [(r["n"], r["gated"], r["choice"], r["vendor_us"], r["chosen_us"]) for r in gemv.chosen_launches()] == [
        (8, False, SMALL_CONFIGS[1], 3000.0, 1000.0), (24, False, gemv.VENDOR, 1000.0, 1000.0)]
    # No candidates: the vendor's GEMM, nothing timed.
    assert gemv.choose(x, torch.randn(4, 16), (), fake_timer([])) == gemv.VENDOR
    # The gated form of a timed shape is another choice (its vendor path runs silu_mul first), its
    # candidates timed gated and after silu_mul (silu_first).
    calls.clear()
    speeds = [0.5, 2.0, 1.0, 4.0, 3.0, 3.0, 3.0]
    assert gemv.choose(x, weight, SMALL_CONFIGS, fake_timer(speeds), up=torch.randn(1, 16)) == gemv.VENDOR
    assert len(calls) == 7 * rounds and gemv.choose(x, weight, SMALL_CONFIGS, fake_timer([])) == SMALL_CONFIGS[1]


def test_a_gated_fp8_product_may_choose_silu_mul_first(monkeypatch):
    """Gated, each candidate is timed in both forms; the silu-first form, when fastest, is the
    choice, and launches as silu_mul's kernel and then the plain launch."""
    monkeypatch.setattr(gemv, "_CHOICES", {})
    monkeypatch.setattr(gemv, "_TIMINGS", {})
    x, up, weight = torch.randn(1, 16), torch.randn(1, 16), torch.randn(8, 16)
    w8, scales = weight.to(torch.float8_e4m3fn), torch.rand(8) + 0.5
    calls = []
    speeds = [3.0, 2.0, 2.5, 3.0, 1.0, 2.0]  # the gated launches, then their silu-first forms
    choice = gemv.choose(x, w8, SMALL_CONFIGS, functools.partial(sequence_timer, calls=calls)(speeds), up=up, scales=scales)
    assert choice == gemv.silu_first(SMALL_CONFIGS[1]) and len(calls) == 6 * gemv.TIMING_ROUNDS
    from paiton.fusion.swiglu import silu_mul

    expected = gemv.launch_gemv(silu_mul(x, up), w8, SMALL_CONFIGS[1], scales=scales)
    assert torch.equal(gemv.launch_gemv(x, w8, choice, up, scales), expected)


@given(n=st.integers(1, 40), k=st.integers(1, 150), dtype=st.sampled_from([torch.float32, torch.float16]),
       config=st.sampled_from(KERNEL_CONFIGS), seed=st.integers(0, 2**16))
def test_silu_first_is_the_gated_launch_bit_for_bit(n, k, dtype, config, seed):
    """silu_mul's kernel and then the plain launch round the activation as the gated kernel does
    and accumulate in its order: the same bits."""
    generator = torch.Generator().manual_seed(seed)
    x, up = (torch.randn(1, k, generator=generator).to(DEVICE, dtype) for _ in range(2))
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    assert torch.equal(gemv.launch_gemv(x, weight, gemv.silu_first(config), up), gemv.launch_gemv(x, weight, config, up))


@given(half=st.integers(1, 45), k=st.integers(1, 150), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       config=st.sampled_from(KERNEL_CONFIGS), scales=st.sampled_from([None, "rows", "blocks"]), seed=st.integers(0, 2**16))
def test_swiglu_out_is_the_product_then_silu_mul_bit_for_bit(half, k, dtype, config, scales, seed):
    """SWIGLU_OUT on a packed [gate; up] weight: each program's tile takes gate rows and the
    matching up rows, and it writes silu(gate) * up: the same bits as the plain launch followed
    by paiton.silu_mul on its two halves (the tile sums its rows in the same order), at widths
    no block divides too; FP8 weights with scales per row or per 128 x 128 block."""
    from paiton.fusion.swiglu import silu_mul

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(2 * half, k, generator=generator).to(DEVICE, dtype)
    weight_scales = None
    if scales is not None:
        weight = weight.float().to(torch.float8_e4m3fn)
        shape = (2 * half,) if scales == "rows" else (-(-2 * half // 128), -(-k // 128))
        weight_scales = (torch.rand(shape, generator=generator) + 0.5).to(DEVICE)
    both = gemv.launch_gemv(x, weight, config, scales=weight_scales)
    expected = silu_mul(both[..., :half].contiguous(), both[..., half:].contiguous())
    got = gemv.launch_gemv(x, weight, config, scales=weight_scales, swiglu_out=True)
    assert got.shape == (1, half) and torch.equal(got, expected)


# Split-K launches (SPLITS): small tiles, so that K of up to 300 makes several slices.
SPLIT_CONFIGS = [gemv.gemv_config(4, 32, 4, 2, splits=2), gemv.gemv_config(8, 32, 4, 1, x_per_row=True, chunk=8, splits=3),
                 gemv.gemv_config(16, 16, 2, 1, chunk=8, splits=4)]


@given(rows=st.integers(1, 40), k=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       config=st.sampled_from(SPLIT_CONFIGS), form=st.sampled_from(["plain", "gated", "rows", "blocks", "norm", "residual",
                                                                     "swiglu_out"]),
       seed=st.integers(0, 2**16))
def test_split_k_is_the_unsplit_launch_summed_in_slices(rows, k, dtype, config, form, seed):
    """K cut into slices, each slice's fp32 row sums written, the rows' last program to arrive
    adding them in slice order before the epilogue: the unsplit launch's product within the
    tolerance (another summation order) in every form the epilogue takes (gated, FP8 row and
    block scales, the norm's 1 / rms, the residual's add and the sums of squares, SWIGLU_OUT),
    the same bits when run again whichever program arrives last, and every counter back at zero
    for the next product (fusion/split_k.py). Positive inputs: no cancellation, so two fp32
    summation orders stay within the tolerance of the output itself (random signs made a
    near-zero output of order-1 terms, k = 253, fail it now and then). Under the interpreter the
    programs run in turn, the last slice last: the arrival protocol itself is checked on the GPU
    (test_split_k_launches_on_the_gpu_in_and_out_of_a_cuda_graph)."""
    from paiton.fusion import split_k

    generator = torch.Generator().manual_seed(seed)
    n = 2 * rows if form == "swiglu_out" else rows
    x, up = ((torch.rand(1, k, generator=generator) + 0.1).to(DEVICE, dtype) for _ in range(2))
    weight = (torch.rand(n, k, generator=generator) + 0.1).to(DEVICE, dtype)
    arguments = {}
    if form in ("rows", "blocks"):
        weight = weight.float().to(torch.float8_e4m3fn)
        shape = (n,) if form == "rows" else (-(-n // 128), -(-k // 128))
        arguments["scales"] = (torch.rand(shape, generator=generator) + 0.5).to(DEVICE)
    elif form == "gated":
        arguments["up"] = up
    elif form == "norm":
        arguments.update(norm_weight=up[0], squares=(x.float() ** 2).reshape(-1), eps=1e-6)
    elif form == "residual":
        arguments.update(residual=torch.rand(1, n, generator=generator).to(DEVICE, dtype), squares_out=True)
    elif form == "swiglu_out":
        arguments["swiglu_out"] = True
    unsplit = {key: value for key, value in config.items() if key != "SPLITS"}
    expected = gemv.launch_gemv(x, weight, unsplit, **arguments)
    got = gemv.launch_gemv(x, weight, config, **arguments)
    if form == "residual":
        (expected, expected_squares), (got, got_squares) = expected, got
        assert relative_error(got_squares, expected_squares.double()) <= 2 * TOLERANCE[dtype]
        assert torch.equal(gemv.launch_gemv(x, weight, config, **arguments)[1], got_squares)
    else:
        assert torch.equal(gemv.launch_gemv(x, weight, config, **arguments), got)
    assert got.shape == expected.shape and relative_error(got, expected.double()) <= 2 * TOLERANCE[dtype], (n, k, form)
    counters = split_k.COUNTERS.get(str(x.device))  # none made while K fit one tile each time
    assert counters is None or not counters.any()


def test_split_k_slices_are_whole_tiles_and_one_slice_runs_unsplit(monkeypatch):
    """K of one BLOCK_K tile is one slice: the launch runs unsplit (no counters asked for); K of
    ten tiles in 4 slices: 3 + 3 + 3 + 1 tiles, and the counters are made once."""
    from paiton.fusion import split_k

    monkeypatch.setattr(split_k, "COUNTERS", {})
    x, weight = torch.randn(1, 32), torch.randn(12, 32)
    config = gemv.gemv_config(4, 32, 4, 2, splits=4)
    assert torch.equal(gemv.launch_gemv(x, weight, config), gemv.launch_gemv(x, weight, SMALL_CONFIGS[0]))
    assert split_k.COUNTERS == {}
    x, weight = torch.randn(1, 320), torch.randn(12, 320)
    assert gemv._split_k_arguments(x.device, 12, 320, 32, 3, 4)["k_slice"] == 96
    assert relative_error(gemv.launch_gemv(x, weight, config), x.double() @ weight.double().T) <= TOLERANCE[torch.float32]
    assert list(split_k.COUNTERS) == ["cpu"] and not split_k.COUNTERS["cpu"].any()


def test_swiglu_out_wants_a_packed_weight_and_no_other_fusion():
    x, up = torch.randn(1, 16), torch.randn(1, 16)
    for weight, config, extra in ((torch.randn(7, 16), SMALL_CONFIGS[0], {}),  # an odd row count
                                  (torch.randn(8, 16), gemv.gemv_config(3, 32, 4, 1), {}),  # an odd BLOCK_N
                                  (torch.randn(8, 16), SMALL_CONFIGS[0], {"up": up}),  # gated as well
                                  (torch.randn(8, 16), SMALL_CONFIGS[0], {"residual": torch.randn(1, 8)})):
        with pytest.raises(ValueError, match="swiglu_out"):
            gemv.launch_gemv(x, weight, config, swiglu_out=True, **extra)


def test_choose_for_an_fp8_weight_times_its_launches_alone(monkeypatch):
    """An FP8 weight has no vendor GEMM of one row: its candidates alone are timed (the first, the
    untimed launch, as the baseline), with the scales, and the choice is its own, not that of a
    bf16 weight of the same shape."""
    monkeypatch.setattr(gemv, "_CHOICES", {})
    monkeypatch.setattr(gemv, "_TIMINGS", {})
    x, weight = torch.randn(1, 16), torch.randn(8, 16)
    w8, scales = weight.to(torch.float8_e4m3fn), torch.rand(8) + 0.5
    calls = []
    fake_timer = functools.partial(sequence_timer, calls=calls)

    assert gemv.choose(x, w8, SMALL_CONFIGS, fake_timer([3.0, 1.0, 2.0]), scales=scales) == SMALL_CONFIGS[1]
    assert len(calls) == len(SMALL_CONFIGS) * gemv.TIMING_ROUNDS  # no vendor among them
    calls.clear()
    assert gemv.choose(x, weight, SMALL_CONFIGS, fake_timer([0.5, 2.0, 1.0, 4.0])) == gemv.VENDOR
    assert len(calls) == (len(SMALL_CONFIGS) + 1) * gemv.TIMING_ROUNDS
    (record,) = [r for r in gemv.chosen_launches() if "weight_dtype" in r]
    assert record["weight_dtype"] == "float8_e4m3fn" and record["choice"] == SMALL_CONFIGS[1]
    assert (record["first_candidate_us"], record["chosen_us"]) == (3000.0, 1000.0)
    assert gemv.describe_choices()[0] == (f"[8 x 16] float8_e4m3fn: {SMALL_CONFIGS[1]} (timed; first_candidate 3000.0 us, "
                                          "chosen 1000.0 us)")
    # A first candidate that cannot launch here is an error, not a silent fallback.
    monkeypatch.setattr(gemv, "_CHOICES", {})

    def broken(fn):
        raise RuntimeError("out of resources")

    with pytest.raises(RuntimeError, match="resources"):
        gemv.choose(x, w8, SMALL_CONFIGS, broken, scales=scales)


def test_choose_keeps_each_candidates_best_round(monkeypatch):
    """A candidate slow in one round only (the clocks settling, another process's traffic) is
    judged by its best round; one that cannot launch here drops out, the others still compete."""
    monkeypatch.setattr(gemv, "_CHOICES", {})
    monkeypatch.setattr(gemv, "_TIMINGS", {})
    x, weight = torch.randn(1, 16), torch.randn(8, 16)
    first_round = {"vendor": 2.0, 0: 5.0, 1: 3.0}
    later_rounds = {"vendor": 2.0, 0: 1.0, 1: 3.0}
    seen = []

    def time_ms(fn):
        name = "vendor" if not fn.__defaults__ else SMALL_CONFIGS.index(fn.__defaults__[0])
        if name == 2:
            raise RuntimeError("out of resources")
        seen.append(name)
        return (first_round if len(seen) <= 3 else later_rounds)[name]

    assert gemv.choose(x, weight, SMALL_CONFIGS, time_ms) == SMALL_CONFIGS[0]
    assert seen == ["vendor", 0, 1] * gemv.TIMING_ROUNDS  # in turn, the failed one not retried


def test_a_cards_measured_launch_is_taken_without_timing(monkeypatch):
    """backends/measured_gemv.py: a card's entry for a contiguous weight is the choice, as long
    as it is still a candidate; anything else falls back to timing (None)."""
    from paiton.backends import measured_gemv

    cuda = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(measured_gemv, "MEASURED", {"Some GPU": {(8, 16, "bfloat16", False): (16, 512, 8, 3),
                                                                 (8, 16, "bfloat16", True): gemv.VENDOR,
                                                                 (24, 16, "bfloat16", False): (64, 64, 1, 1)}})
    monkeypatch.delenv("PAITON_GEMV_TIMING", raising=False)
    launch = measured_gemv.measured_launch
    assert launch(cuda, 8, 16, 16, torch.bfloat16, False, gemv.GEMV_CANDIDATES) == gemv.gemv_config(16, 512, 8, 3)
    assert launch(cuda, 8, 16, 16, torch.bfloat16, True, gemv.GEMV_CANDIDATES) == gemv.VENDOR
    assert launch(cuda, 8, 16, 32, torch.bfloat16, False, gemv.GEMV_CANDIDATES) is None  # a strided weight
    assert launch(cuda, 8, 16, 16, torch.float16, False, gemv.GEMV_CANDIDATES) is None  # another dtype
    assert launch(cuda, 24, 16, 16, torch.bfloat16, False, gemv.GEMV_CANDIDATES) is None  # no longer a candidate
    assert launch(torch.device("cpu"), 8, 16, 16, torch.bfloat16, False, gemv.GEMV_CANDIDATES) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Another GPU")
    assert launch(cuda, 8, 16, 16, torch.bfloat16, False, gemv.GEMV_CANDIDATES) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setenv("PAITON_GEMV_TIMING", "1")
    assert launch(cuda, 8, 16, 16, torch.bfloat16, False, gemv.GEMV_CANDIDATES) is None

    # choose takes the table's answer and times nothing; the record says where it came from.
    monkeypatch.setattr(gemv, "_CHOICES", {})
    monkeypatch.setattr(gemv, "_TIMINGS", {})
    monkeypatch.setattr(measured_gemv, "measured_launch", lambda *args: SMALL_CONFIGS[2])

    def no_timing(fn):
        raise AssertionError("a shape in the table is not timed")

    x, weight = torch.randn(1, 16), torch.randn(8, 16)
    assert gemv.choose(x, weight, SMALL_CONFIGS, no_timing) == SMALL_CONFIGS[2]
    (record,) = gemv.chosen_launches()
    assert record["choice"] == SMALL_CONFIGS[2] and record["source"] == "table" and "chosen_us" not in record


def test_one_row_linear_runs_the_chosen_launch(monkeypatch):
    monkeypatch.setattr(gemv, "_CHOICES", {})
    monkeypatch.setattr(gemv, "_TIMINGS", {})
    x, weight = torch.randn(1, 1, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE)
    launched = []
    monkeypatch.setattr(gemv, "_launch", lambda x, w, config, up=None: launched.append(config) or gemv.gemv_reference(x, w))
    monkeypatch.setattr(gemv, "_time_ms", lambda fn: 1.0 if fn.__defaults__ else 2.0)  # candidates beat the vendor
    y = gemv.one_row_linear(x, weight, SMALL_CONFIGS[:1])
    assert launched[-1] == SMALL_CONFIGS[0] and y.shape == (1, 1, 24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_choose_times_a_cold_weight_on_the_gpu_not_the_launches():
    """The copies choose times over span four times L2 (or sixteen copies) and hold the weight;
    the timer leaves the host's launch time out: 256 launches of a one-element add take the host
    longer than the GPU."""
    import time

    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    copies = gemv._cold_copies(weight)
    l2_bytes = torch.cuda.get_device_properties(weight.device).L2_cache_size
    assert len(copies) == 16 or len(copies) * weight.nbytes >= 4 * l2_bytes
    assert len({c.data_ptr() for c in copies}) == len(copies) and all(torch.equal(c, weight) for c in copies)

    tiny = torch.zeros(1, device="cuda")

    def launches():
        for _ in range(256):
            tiny.add_(1)

    launches()
    torch.cuda.synchronize()
    start = time.perf_counter()
    launches()
    torch.cuda.synchronize()
    host_ms = (time.perf_counter() - start) * 1e3
    gpu_ms = gemv._time_ms(launches)
    assert 0 < gpu_ms < host_ms, (gpu_ms, host_ms)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("pdl", [False, True], ids=["plain launches", "PDL"])
def test_split_k_launches_on_the_gpu_in_and_out_of_a_cuda_graph(monkeypatch, pdl):
    """On the GPU, where a tile's slices arrive in any order: the split-K candidates (bf16's and
    FP8's lists) at Qwen3-32B's long-K shapes (o_proj 5120 x 8192, down_proj 5120 x 25600) and
    at a ragged one (5000 x 8000: no block divides it), plain, with the residual and the sums of
    squares, and as SWIGLU_OUT on a packed weight: the unsplit launch's product within the
    tolerance, the same bits in a CUDA graph replayed 20 times (the slices' order, not which
    program is last, fixes the sum), and every counter back at zero afterwards; with and
    without programmatic dependent launch (PAITON_PDL=1; fusion/pdl.py), where a launch's
    programs start before the kernel before it ends."""
    from paiton.fusion import split_k
    from paiton.fusion.fp8_linear import quantize_weight
    from paiton.fusion.pdl import PDL_ENV

    monkeypatch.setenv(PDL_ENV, "1" if pdl else "0")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((5120, 8192), (5120, 25600), (5000, 8000)):
        weight = (torch.randn(n, k, device="cuda", generator=generator) * k ** -0.5).bfloat16()
        x = torch.randn(1, k, device="cuda", generator=generator).bfloat16()
        residual = torch.randn(1, n, device="cuda", generator=generator).bfloat16()
        for candidates, fp8 in ((gemv.GEMV_CANDIDATES, False), (gemv.FP8_GEMV_CANDIDATES, True)):
            w, s = quantize_weight(weight) if fp8 else (weight, None)
            for config in (c for c in candidates if c.get("SPLITS", 1) > 1):
                unsplit = {key: value for key, value in config.items() if key != "SPLITS"}
                for form in ({}, {"residual": residual, "squares_out": True}, {"swiglu_out": True}):
                    def launch(launch_config, form=form, w=w, s=s):
                        out = gemv.launch_gemv(x, w, launch_config, scales=s, **form)
                        return out[0] if isinstance(out, tuple) else out
                    expected = launch(unsplit)
                    y = launch(config)
                    assert relative_error(y, expected.double()) <= 2 * TOLERANCE[torch.bfloat16], (n, k, config, form)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        replayed = launch(config)
                    for _ in range(20):
                        graph.replay()
                        torch.cuda.synchronize()
                        assert torch.equal(replayed, y), (n, k, config, form)
    assert not split_k.COUNTERS["cuda:0"].any()

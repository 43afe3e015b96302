"""FP8 linears of several rows (fusion/fp8_paths.py) and the per-token activation quantization
before torch._scaled_mm (fusion/quantize_rows.py).

On CPU: the quantization kernel under Triton's interpreter against its torch reference, bit for
bit (hypothesis over shapes, odd and two-pass widths, strided rows, rows of zeros, fp32/bf16/
fp16 inputs, both e4m3 formats); the _scaled_mm path's math against a float64 emulation of
quantize-then-multiply, and against the unquantized product within the activations' rounding.
torch 2.13's CPU build runs torch._scaled_mm with row-wise scales (oneDNN), so the path itself
runs here; a torch whose CPU _scaled_mm refuses them gets an fp32 emulation of the op in its
place (the `cpu_scaled_mm` fixture says which ran). The choice among the paths: eligibility,
fallback order, timing once per (shape, rows bucket) and the records `chosen_paths` lists.
On a GPU (marked `gpu`): every path at Qwen3-8B and 32B shapes, 2 to 128 rows, and the choice.
"""

import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from paiton_testing import MANTISSA_BITS, fp8_product_bound, random_weight

from paiton.fusion import fp8_paths
from paiton.fusion.fp8_linear import dequantize, quantize_weight
from paiton.fusion.fp8_paths import DEQUANTIZE, FP8_GEMM, SCALED_MM
from paiton.fusion.quantize_rows import FP8_LARGEST, quantize_rows, quantize_rows_reference

FORMATS = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]
# FP8 matrix units do not add in fp32: Hopper's accumulate in about 13 mantissa bits (the "fp22"
# of torch's _scaled_mm discussions), promoted to fp32 every 128 products where fast
# accumulation is off, as paiton's call leaves it. Each promotion block's sum is then off by at
# most its 128 additions' truncation, 128 * 2**-13 of the block's sum of |products|: 2**-6 of
# sum |x||w| over all blocks. Measured on the H200 at 18612d0 (torch 2.11): 973 on a sum |x||w|
# of about 1.7e5 for Qwen3-8B's q/k/v at 2 rows, 2**-7.5, where fp32 accumulation (the bound
# this test had, 2**-17) would allow 1.3.
MMA_ACCUMULATION = 2.0**-6
SUBNORMAL_STEP = {torch.float8_e4m3fn: 2.0**-9, torch.float8_e4m3fnuz: 2.0**-10}


def activations(rows, cols, dtype, seed, zero_rows=()):
    """Rows of very different magnitudes (1e-3 to 1e3, as a prefill's tokens can be), some all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, rows)[torch.randperm(rows, generator=g)][:, None]
    x[list(zero_rows)] = 0
    return x.to(dtype)


def assert_same_quantization(x, fp8):
    q, scales = quantize_rows(x, fp8)
    expected_q, expected_scales = quantize_rows_reference(x, fp8)
    assert q.dtype == fp8 and q.shape == x.shape and scales.shape == x.shape[:-1] and scales.dtype == torch.float32
    assert torch.equal(scales, expected_scales)
    different = q.view(torch.uint8) != expected_q.view(torch.uint8)
    assert not different.any(), (q.float()[different][:8], expected_q.float()[different][:8])


@settings(deadline=None, max_examples=16)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 700),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fp8=st.sampled_from(FORMATS),
    strided=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
# fp16 rows of magnitude 1e-3 hold -0.0 (randn values that underflowed): the kernel's rounding
# put back v < 0's sign, so -0.0 came out +0 (found by hypothesis at 7800dec)
@example(rows=46, cols=291, x_dtype=torch.float16, fp8=torch.float8_e4m3fn, strided=False, seed=36)
def test_quantize_rows_kernel_equals_its_reference(rows, cols, x_dtype, fp8, strided, seed):
    """The kernel (interpreted) and the reference agree bit for bit: the same fp32 absmax and
    IEEE divisions, the same round-to-nearest-even cast (the interpreter's cast is bypassed by
    rounding in fp32 first, see the module docstring); rows of zeros get scale 1 and zeros."""
    x = activations(rows, cols + (7 if strided else 0), x_dtype, seed, zero_rows=range(0, rows, 5))
    assert_same_quantization(x[:, 3:3 + cols] if strided else x, fp8)  # strided: a column slice, read in place


@pytest.mark.parametrize("fp8", FORMATS)
def test_quantize_rows_wider_than_registers_in_two_passes(fp8):
    """A row wider than 16384 (Qwen3-32B's down_proj input: 25600) takes the kernel's two-pass
    path: absmax first, then the row again; and a 3-D input keeps its leading dims."""
    x = activations(3, 20011, torch.bfloat16, 7, zero_rows=[1])
    assert_same_quantization(x, fp8)
    assert_same_quantization(activations(6, 96, torch.bfloat16, 8).reshape(2, 3, 96), fp8)


@pytest.mark.parametrize("fp8", FORMATS)
def test_quantize_rows_round_trip_and_extremes(fp8):
    """Each row's largest value maps to the format's largest (448, e4m3fnuz 240); every value
    comes back within half an e4m3 step (2**-4 of itself) or the subnormal step; values far
    below a row's largest underflow to (signed) zero as torch's cast does."""
    x = activations(8, 300, torch.float32, 3, zero_rows=[2])
    x[5, :4] = torch.tensor([1e-9, -1e-9, 1000.0, -3e-4])
    q, scales = quantize_rows(x, fp8)
    assert scales[2] == 1 and not q[2].float().any()
    nonzero = x.abs().amax(1) > 0
    assert (q.float().abs().amax(1)[nonzero] == FP8_LARGEST[fp8]).all()
    back = q.double() * scales.double()[:, None]
    assert ((back - x.double()).abs() <= x.double().abs() * 2**-4 + scales.double()[:, None] * SUBNORMAL_STEP[fp8]).all()
    assert_same_quantization(x, fp8)
    with pytest.raises(ValueError, match="FP8 formats"):
        quantize_rows(x, torch.float8_e5m2)


def emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype, **unused):
    """torch._scaled_mm's row-wise product as the vendors' kernels compute it: fp32 sums of the
    FP8 products, both scales on the sums, one rounding to out_dtype."""
    return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)


@pytest.fixture(scope="module")
def cpu_scaled_mm():
    """torch._scaled_mm on CPU tensors with row-wise scales; where this torch's CPU build refuses
    them, the emulation above in its place. Yields which ran ("torch" or "emulated")."""
    a = torch.ones(2, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.bfloat16)
        yield "torch"
    except (RuntimeError, NotImplementedError, AttributeError) as error:
        warnings.warn(f"torch {torch.__version__}: no CPU _scaled_mm with row-wise scales ({error}); emulated")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "_scaled_mm", emulated_scaled_mm, raising=False)
            yield "emulated"


@settings(deadline=None, max_examples=10)
@given(
    m=st.integers(2, 40),
    n=st.integers(1, 16).map(lambda i: 16 * i),
    k=st.integers(1, 32).map(lambda i: 16 * i),
    fp8=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**31 - 1),
)
def test_scaled_mm_path_matches_its_float64_emulation(cpu_scaled_mm, m, n, k, fp8, seed):
    """SCALED_MM: x (bf16) quantized per token by the kernel (interpreted), then torch._scaled_mm
    with scale_a [M, 1] and scale_b [1, N] (W8.T as the column-major second operand). Against
    the float64 product of the two dequantized FP8 operands: within fp32 summation noise and
    one bf16 rounding. Against the unquantized product x @ dequantize(W8).T (what the FP8 GEMM
    and DEQUANTIZE compute): within the activations' own rounding to e4m3, |x| * 2**-4 + the
    subnormal step, per product."""
    w8, scales = quantize_weight(random_weight(n, k, seed, outliers=True), fp8)
    x = activations(m, k, torch.bfloat16, seed + 1, zero_rows=[1])
    y = fp8_paths.scaled_mm_linear(x, w8, scales)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    emulated = fp8_paths.scaled_mm_reference(x, w8, scales)
    w = dequantize(w8, scales, torch.float64)
    x8, x_scales = quantize_rows_reference(x, fp8)
    magnitude = (x8.double().abs() * x_scales.double()[:, None]) @ w.abs().T
    error = (y.double() - emulated).abs()
    assert (error <= magnitude * 2**-18 + emulated.abs() * 2.0 ** -MANTISSA_BITS[torch.bfloat16]).all(), error.max()
    unquantized = x.double() @ w.T
    assert ((y.double() - unquantized).abs() <= fp8_product_bound(x, w8, scales, SCALED_MM, sums=2**-18)).all()
    assert not y[1].float().any()  # a row of zeros: scale 1, zeros, a zero product


def test_scaled_mm_takes_only_what_row_wise_scaled_mm_accepts():
    w8, scales = quantize_weight(random_weight(32, 48, 0))
    x = torch.randn(4, 48).to(torch.bfloat16)
    assert fp8_paths.scaled_mm_unsupported(x, w8, scales) is None
    assert "bf16 only" in fp8_paths.scaled_mm_unsupported(x.half(), w8, scales)
    blocks = torch.ones(1, 1)
    assert "per 128 x 128 block" in fp8_paths.scaled_mm_unsupported(x, w8, blocks)
    odd_w8, odd_scales = quantize_weight(random_weight(40, 56, 0))
    assert "multiples of 16" in fp8_paths.scaled_mm_unsupported(torch.randn(4, 56).bfloat16(), odd_w8[:, :56], odd_scales)
    assert "multiples of 16" in fp8_paths.scaled_mm_unsupported(x, w8[:24], scales[:24])
    with pytest.raises(ValueError, match="bf16 only"):
        fp8_paths.scaled_mm_linear(x.float(), w8, scales)


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(fp8_paths, "_CHOICES", {})
    monkeypatch.setattr(fp8_paths, "_TIMINGS", {})


def row_weight(n=32, k=64):
    return quantize_weight(random_weight(n, k, 1, outliers=True))


def test_eligible_paths_keep_the_chips_order(fresh_choices):
    """The FP8 GEMM up to 64 rows (its bucket), _scaled_mm for bf16 per-channel 16-aligned
    products; the dequantized product always, last where the chip's list lacks it."""
    w8, scales = row_weight()
    chip = (FP8_GEMM, SCALED_MM, DEQUANTIZE)
    bf16 = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert fp8_paths.eligible_paths(64, bf16, w8, scales, chip) == [FP8_GEMM, SCALED_MM, DEQUANTIZE]
    assert fp8_paths.eligible_paths(65, bf16, w8, scales, chip) == [SCALED_MM, DEQUANTIZE]
    assert fp8_paths.eligible_paths(8, bf16.half(), w8, scales, chip) == [FP8_GEMM, DEQUANTIZE]
    assert fp8_paths.eligible_paths(8, bf16, w8, torch.ones(1, 1), chip) == [FP8_GEMM, DEQUANTIZE]
    assert fp8_paths.eligible_paths(8, bf16, w8, scales, (SCALED_MM,)) == [SCALED_MM, DEQUANTIZE]
    assert fp8_paths.eligible_paths(8, bf16, w8, scales, (DEQUANTIZE, FP8_GEMM)) == [DEQUANTIZE, FP8_GEMM]
    with pytest.raises(ValueError, match="unknown"):
        fp8_paths.eligible_paths(8, bf16, w8, scales, ("cutlass",))


def test_untimed_choice_is_the_first_eligible_path(fresh_choices):
    """On a CPU nothing is timed: the chip order's first eligible path, kept and listed as a
    fallback; a product with one eligible path (or no rows) is not a choice and is not listed."""
    w8, scales = row_weight()
    paths = (FP8_GEMM, SCALED_MM, DEQUANTIZE)
    x = torch.randn(5, 64).to(torch.bfloat16)
    assert fp8_paths.choose_path(x, w8, scales, paths) == FP8_GEMM
    assert fp8_paths.choose_path(torch.randn(100, 64).bfloat16(), w8, scales, paths) == SCALED_MM
    assert fp8_paths.choose_path(x, w8, scales, (DEQUANTIZE,)) == DEQUANTIZE
    assert fp8_paths.choose_path(x[:0], w8, scales, paths) == DEQUANTIZE
    assert fp8_paths.chosen_paths() == [
        dict(device="cpu", rows=8, n=32, k=64, dtype="bfloat16", weight_dtype="float8_e4m3fn", scales="rows",
             weight_only=False, choice=FP8_GEMM, source="fallback"),
        dict(device="cpu", rows=128, n=32, k=64, dtype="bfloat16", weight_dtype="float8_e4m3fn", scales="rows",
             weight_only=False, choice=SCALED_MM, source="fallback"),
    ]


def test_weight_only_never_rounds_the_activations(fresh_choices, monkeypatch):
    """PAITON_FP8_WEIGHT_ONLY=1: _scaled_mm (W8A8) is never eligible, at any row count, so the
    path of a product does not round its activations whatever the batch; a choice made without
    it is not reused under it."""
    w8, scales = row_weight()
    paths = (FP8_GEMM, SCALED_MM, DEQUANTIZE)
    x = torch.randn(100, 64).bfloat16()
    assert fp8_paths.choose_path(x, w8, scales, paths) == SCALED_MM
    monkeypatch.setenv("PAITON_FP8_WEIGHT_ONLY", "1")
    assert fp8_paths.eligible_paths(100, x, w8, scales, paths) == [DEQUANTIZE]
    assert fp8_paths.eligible_paths(8, x, w8, scales, paths) == [FP8_GEMM, DEQUANTIZE]
    assert fp8_paths.choose_path(x, w8, scales, paths) == DEQUANTIZE
    assert [r["weight_only"] for r in fp8_paths.chosen_paths()] == [False]  # one eligible path: not a choice


def test_timed_choice_takes_the_fastest_once_per_rows_bucket(fresh_choices, monkeypatch):
    """Timed: every eligible path once per round, in turn, at the bucket's row count (x's rows
    repeated), each keeping its best round; the fastest is kept for every row count of the
    bucket (5 to 8 rows: one timing); a tie keeps the earlier path; a path that fails is left
    out, a failing DEQUANTIZE (every chip's baseline) is an error."""
    w8, scales = row_weight()
    paths = (FP8_GEMM, SCALED_MM, DEQUANTIZE)
    ran = []
    monkeypatch.setattr(fp8_paths, "RUNS", {path: (lambda x, w, s, path=path: ran.append((path, tuple(x.shape))))
                                           for path in paths})
    speeds = {FP8_GEMM: [3.0, 1.5, 2.0], SCALED_MM: [1.0, 2.5, 1.2], DEQUANTIZE: [4.0, 4.0, 4.0]}
    timed = []

    def fake_timer(run):
        run()
        path = ran[-1][0]
        timed.append(path)
        return speeds[path][sum(p == path for p in timed) - 1]

    x = torch.randn(5, 64).to(torch.bfloat16)
    assert fp8_paths.choose_path(x, w8, scales, paths, fake_timer) == SCALED_MM
    assert timed == [FP8_GEMM, SCALED_MM, DEQUANTIZE] * fp8_paths.TIMING_ROUNDS
    assert {shape for _, shape in ran} == {(8, 64)}  # the bucket's rows: x's five, repeated
    timed.clear()
    assert fp8_paths.choose_path(torch.randn(7, 64).bfloat16(), w8, scales, paths, fake_timer) == SCALED_MM
    assert timed == []  # 7 rows: bucket 8, decided
    (record,) = [r for r in fp8_paths.chosen_paths() if r["rows"] == 8]
    assert record["source"] == "timed" and record["times_us"] == {FP8_GEMM: 1500.0, SCALED_MM: 1000.0, DEQUANTIZE: 4000.0}
    assert fp8_paths.describe_choice(record) == (
        "8 rows x [32 x 64]: scaled_mm (timed; us: fp8_gemm 1500.0, scaled_mm 1000.0, dequantize 4000.0)")

    # Equal times: the chip's order decides. A failing path drops out; a failing DEQUANTIZE raises.
    def flat(run):
        run()
        if ran[-1][0] == SCALED_MM:
            raise RuntimeError("no row-wise kernel on this chip")
        return 1.0

    wide = torch.randn(2, 64).bfloat16()
    other_w8, other_scales = row_weight(48, 64)
    assert fp8_paths.choose_path(wide, other_w8, other_scales, (SCALED_MM, DEQUANTIZE, FP8_GEMM), flat) == DEQUANTIZE
    record = fp8_paths.chosen_paths()[-1]
    assert record["n"] == 48 and set(record["times_us"]) == {DEQUANTIZE, FP8_GEMM}

    def broken(run):
        run()
        if ran[-1][0] == DEQUANTIZE:
            raise RuntimeError("out of memory")
        return 1.0

    with pytest.raises(RuntimeError, match="out of memory"):
        fp8_paths.choose_path(wide, *row_weight(64, 64), paths, broken)


def test_fp8_linear_runs_the_chosen_path(fresh_choices, monkeypatch):
    """paiton.fp8_linear on several rows: the path choose_path took (here, under the interpreter,
    the CPU's fallback: the FP8 GEMM up to 64 rows, DEQUANTIZE above), listed for the shape."""
    w8, scales = row_weight()
    x = torch.randn(6, 64).to(torch.bfloat16)
    expected = x.double() @ dequantize(w8, scales, torch.float64).T
    y = torch.ops.paiton.fp8_linear(x, [w8], [scales])
    assert ((y.double() - expected).abs() <= expected.abs() * 2**-7 + 1e-6).all()
    y = torch.ops.paiton.silu_mul_fp8_linear(x, x, [w8], [scales])
    assert [(r["rows"], r["choice"]) for r in fp8_paths.chosen_paths()] == [(8, FP8_GEMM)]
    ran = []
    monkeypatch.setitem(fp8_paths.RUNS, DEQUANTIZE, lambda x, w, s: ran.append(x.shape) or fp8_paths.dequantize_linear(x, w, s))
    torch.ops.paiton.fp8_linear(torch.randn(70, 64).bfloat16(), [w8], [scales])
    assert ran == [(70, 64)]


def test_swiglu_out_is_a_choice_of_its_own_and_every_path_applies_it(fresh_choices, cpu_scaled_mm):
    """With `swiglu_out` (a gate/up packed weight: passes/swiglu_out.py's fp8_linear_silu_mul)
    each path ends in SwiGLU on its product's halves: the FP8 GEMM in its kernel's last step
    (the same roundings as its plain launch and silu_mul, torch's silu on CPU against the
    interpreter's), the others by silu_mul's kernel after their product (the same bits). The
    choice is kept apart from the plain product's of the same shape, timed and listed as such."""
    from paiton.fusion.swiglu import silu_mul

    w8, scales = row_weight(64, 64)  # [gate; up], 32 rows each
    x = torch.randn(5, 64).bfloat16()
    paths = (FP8_GEMM, SCALED_MM, DEQUANTIZE)
    for path in paths:
        y = fp8_paths.run_path(path, x, w8, scales, swiglu_out=True)
        two_kernels = silu_mul(*fp8_paths.RUNS[path](x, w8, scales).chunk(2, dim=-1))
        assert y.shape == (5, 32)
        if path == FP8_GEMM:
            assert ((y.double() - two_kernels.double()).norm() / two_kernels.double().norm()).item() <= 2**-7
        else:
            assert torch.equal(y, two_kernels), path

    def timer_with(times):
        calls = []

        def timer(run):
            run()
            calls.append(run)
            return times[(len(calls) - 1) % len(times)]  # the paths in turn, each round
        return timer

    assert fp8_paths.choose_path(x, w8, scales, paths, timer_with([2.0, 1.0, 3.0]), swiglu_out=True) == SCALED_MM
    assert fp8_paths.choose_path(x, w8, scales, paths, timer_with([1.0, 2.0, 3.0])) == FP8_GEMM  # timed apart
    fused, plain = fp8_paths.chosen_paths()
    assert fused["swiglu_out"] and "swiglu_out" not in plain
    assert fp8_paths.describe_choice(fused).startswith("8 rows x [64 x 64], SwiGLU out: scaled_mm (timed;")
    assert torch.equal(fp8_paths.several_rows_product(x, w8, scales, paths, swiglu_out=True),
                       fp8_paths.run_path(SCALED_MM, x, w8, scales, swiglu_out=True))


# ---------------------------------------------------------------------------------------------
# On the GPU: every path at Qwen3 shapes, and the timed choice (printed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-8b", "qwen3-32b"])
def test_every_fp8_path_at_qwen3_shapes_on_gpu(preset, fresh_choices):
    """In the chip's FP8 format, bf16 activations, 2, 8, 32 and 128 rows at the model's q/k/v,
    o, gate/up and down projections: every path the chip has for the shape against the float64
    product (the FP8 GEMM and DEQUANTIZE: x @ dequantize(W8).T within fp32 summation noise and
    one bf16 rounding, DEQUANTIZE's weight rounded to bf16 besides; SCALED_MM: its float64
    emulation likewise, and the unquantized product within the activations' rounding); then the
    timed choice, printed (pytest -s)."""
    from paiton.backends.lowering import lowering_for
    from paiton.backends.target import detect_target
    from paiton.models.fp8 import fp8_format
    from paiton.models.qwen3 import projection_shapes

    fp8 = fp8_format("cuda")
    paths = lowering_for("fp8_linear", detect_target(torch.device("cuda"))).params["several_rows"]
    for name, (n, k) in projection_shapes(preset).items():
        w8, scales = quantize_weight(random_weight(n, k, 0, outliers=True).cuda(), fp8)
        w = dequantize(w8, scales, torch.float64)
        for m in (2, 8, 32, 128):
            x = activations(m, k, torch.bfloat16, m).cuda()
            exact = x.double() @ w.T
            magnitude = x.double().abs() @ w.abs().T
            eligible = fp8_paths.eligible_paths(m, x, w8, scales, paths)
            assert eligible == [p for p in (FP8_GEMM, SCALED_MM, DEQUANTIZE) if p in paths and (p != FP8_GEMM or m <= 64)]
            for path in eligible:
                y = fp8_paths.RUNS[path](x, w8, scales)
                assert y.dtype == torch.bfloat16 and y.shape == (m, n), (name, m, path)
                error = (y.double() - exact).abs()
                assert (error <= fp8_product_bound(x, w8, scales, path, sums=2**-17)).all(), (name, m, path, error.max())
                if path == SCALED_MM:  # and against what it computes: quantized x times W8, on FP8 matrix units
                    emulated = fp8_paths.scaled_mm_reference(x, w8, scales)
                    error = (y.double() - emulated).abs()
                    worst = (error / magnitude.clamp_min(1e-30)).max().item()
                    print(f"{preset} {name} {m} rows: scaled_mm against its emulation: max error {worst:.2e} of "
                          f"sum |x||w| (2**{torch.tensor(worst).clamp_min(1e-30).log2().item():.1f})")
                    bound = magnitude * MMA_ACCUMULATION + emulated.abs() * 2**-7
                    assert (error <= bound).all(), (name, m, path, error.max())
            fp8_paths.choose_path(x, w8, scales, paths)
        del w8, w
    for line in fp8_paths.describe_choices():
        print(f"{preset} {line}")
    assert {r["source"] for r in fp8_paths.chosen_paths()} == {"timed"}

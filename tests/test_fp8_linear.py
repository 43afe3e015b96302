"""FP8 weights (fusion/fp8_linear.py, models/fp8.py): quantizing and its round trip, the one-row
GEMV on FP8 weights under Triton's interpreter against a dequantize-then-matmul reference
(hypothesis over shapes, odd widths, scale layouts and both e4m3 formats), the op over packed
weights, `quantize_fp8` on a tiny Qwen3, and the chips without FP8 refused by name."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from paiton_testing import MANTISSA_BITS, random_weight

import paiton
from paiton.fusion import gemv
from paiton.fusion.fp8_linear import FP8_LARGEST, dequantize, quantize_weight
from paiton.models.fp8 import Fp8Linear, fp8_format, quantize_fp8
from paiton.models.qwen3 import build_qwen3

FORMATS = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]


def block_scales(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(-(-n // 128), -(-k // 128), generator=g) * 0.01 + 1e-3).contiguous()


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("outliers", [False, True])
def test_quantize_round_trip_within_e4m3_rounding(dtype, outliers):
    """Per channel, scale = absmax / largest: every element comes back within half a unit in
    the last place of e4m3 (3 mantissa bits) at its magnitude, or the format's subnormal step."""
    w = random_weight(96, 200, 0, outliers)
    w[5] = 0  # an all-zero row: scale 1, zeros back
    q, scales = quantize_weight(w, dtype)
    assert q.dtype == dtype and scales.dtype == torch.float32 and scales.shape == (96,)
    assert scales[5] == 1 and torch.equal(dequantize(q, scales, torch.float32)[5], torch.zeros(200))
    assert torch.equal(scales[:5], w[:5].abs().amax(1) / FP8_LARGEST[dtype])
    back = dequantize(q, scales, torch.float32)
    subnormal = scales[:, None] * 2.0 ** (-9 if dtype == torch.float8_e4m3fn else -10)
    assert ((back - w).abs() <= w.abs() * 2**-4 + subnormal).all()
    assert (q.float().abs().amax(1)[w.abs().amax(1) > 0] == FP8_LARGEST[dtype]).all()  # the largest element maps to the top


def gemv_reference(x, w8, scales):
    """x @ dequantize(W8).T in float64: what the kernel's fp32 sums approximate."""
    return (x.double() @ dequantize(w8, scales, torch.float64).T)


@settings(deadline=None, max_examples=10)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 600),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fp8=st.sampled_from(FORMATS),
    per_block=st.booleans(),
    gated=st.booleans(),
    config=st.sampled_from([gemv.INTERPRETER_CONFIG, gemv.gemv_config(8, 64, 4, 1, x_per_row=True, chunk=16)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fp8_gemv_matches_dequantize_then_matmul(n, k, x_dtype, fp8, per_block, gated, config, seed):
    """The GEMV on an FP8 weight (interpreted on CPU): fp32 products and sums of the FP8 values,
    the scales on the row sums (per channel) or on each product (per 128 x 128 block); against
    the float64 product of x and the dequantized weight, within fp32 summation noise plus one
    rounding to x's dtype."""
    w8, row_scales = quantize_weight(random_weight(n, k, seed, outliers=seed % 2 == 1), fp8)
    scales = block_scales(n, k, seed) if per_block else row_scales
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, k, generator=g).to(x_dtype)
    up = torch.randn(1, k, generator=g).to(x_dtype) if gated else None
    y = gemv.launch_gemv(x, w8, config, up=up, scales=scales)
    from paiton.fusion.swiglu import silu_mul_reference

    expected = gemv_reference(silu_mul_reference(x, up) if gated else x, w8, scales)
    assert y.dtype == x_dtype and y.shape == (1, n)
    magnitude = (x.double().abs() if not gated else silu_mul_reference(x, up).double().abs()) @ \
        dequantize(w8, scales, torch.float64).abs().T
    ulp = 2.0 ** -MANTISSA_BITS[x_dtype]
    # fp32 sums, then one rounding to x's dtype (a whole ulp: Triton's interpreter rounds toward
    # zero, ENV_NOTES); gated in bf16/fp16, the activation is rounded twice, as eager rounds it
    # (silu, then its product with up), and each rounding may land an ulp from the reference's
    # (toward zero against to nearest): up to two ulps of it in every product (1.97 over a
    # million random bf16 pairs; one ulp was too few: n=170, k=9, bf16, gated, seed=95).
    activation = 2 * ulp if gated and x_dtype != torch.float32 else 0.0
    # (a result below x's smallest normal rounds on the subnormal grid: one ulp of it, tiny * ulp)
    tolerance = magnitude * (2**-20 + activation) + (expected.abs() + torch.finfo(x_dtype).tiny) * ulp + 1e-30
    assert ((y.double() - expected).abs() <= tolerance).all(), (y - expected).abs().max()


@settings(deadline=None, max_examples=8)
@given(
    m=st.integers(2, 64),
    n=st.integers(1, 200),
    k=st.integers(1, 400),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fp8=st.sampled_from(FORMATS),
    per_block=st.booleans(),
    via_fp16=st.booleans(),
    swap_ab=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(m=22, n=11, k=1, x_dtype=torch.float16, fp8=torch.float8_e4m3fn, per_block=False, via_fp16=False, swap_ab=False,
         seed=13)  # fp16 subnormal results
@example(m=5, n=130, k=300, x_dtype=torch.bfloat16, fp8=torch.float8_e4m3fn, per_block=True, via_fp16=True, swap_ab=True,
         seed=3)  # W's rows on the M side, block scales over two scale rows and three K tiles
def test_fp8_gemm_matches_dequantize_then_matmul(m, n, k, x_dtype, fp8, per_block, via_fp16, swap_ab, seed):
    """The FP8 GEMM for 2-64 rows (interpreted on CPU, its products in fp32 there): against the
    float64 product of x and the dequantized weight, within fp32 summation noise plus one
    rounding to x's dtype; W converted to x's dtype directly or through fp16 (W_VIA_FP16), both
    exact; W's rows on either side of the product (SWAP_AB)."""
    from paiton.fusion.few_rows_gemm import few_rows_config, few_rows_gemm

    w8, row_scales = quantize_weight(random_weight(n, k, seed, outliers=seed % 2 == 1), fp8)
    scales = block_scales(n, k, seed) if per_block else row_scales
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    y = few_rows_gemm(x, w8, scales, {**few_rows_config(m), "W_VIA_FP16": via_fp16, "SWAP_AB": swap_ab})
    expected = gemv_reference(x, w8, scales)
    magnitude = x.double().abs() @ dequantize(w8, scales, torch.float64).abs().T
    # one rounding: an ulp of the result, or of the subnormal grid below x's smallest normal (fp16:
    # m=22, n=11, k=1, seed=13 has results near 1.3e-5, where an fp16 ulp is 6e-8, not 1e-8)
    tolerance = magnitude * 2**-20 + (expected.abs() + torch.finfo(x_dtype).tiny) * 2.0 ** -MANTISSA_BITS[x_dtype] + 1e-30
    assert y.dtype == x_dtype and y.shape == (m, n)
    assert ((y.double() - expected).abs() <= tolerance).all(), (y.double() - expected).abs().max()


@settings(deadline=None, max_examples=8)
@given(
    m=st.integers(17, 40),
    n=st.integers(1, 150),
    k=st.integers(1, 300),
    per_block=st.booleans(),
    splits=st.sampled_from([1, 2, 3]),
    swap_ab=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fp8_gemm_row_blocks_splits_and_orientations(m, n, k, per_block, splits, swap_ab, seed):
    """The FP8 GEMM's launch forms together, as the GPU's candidates combine them: more rows than
    one program's BLOCK_M (16: a grid over rows too), K cut into slices, W's rows on either side
    of the product (SWAP_AB), through fp16, row or block scales: against the float64 product of
    x and the dequantized weight, within one bf16 rounding."""
    from paiton.fusion.few_rows_gemm import candidate, few_rows_gemm

    w8, row_scales = quantize_weight(random_weight(n, k, seed), torch.float8_e4m3fn)
    scales = block_scales(n, k, seed) if per_block else row_scales
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    config = {"BLOCK_M": 16, **candidate(16, 32, 4, 1, splits=splits, via_fp16=True, swap_ab=swap_ab)}
    y = few_rows_gemm(x, w8, scales, config)
    expected = gemv_reference(x, w8, scales)
    magnitude = x.double().abs() @ dequantize(w8, scales, torch.float64).abs().T
    tolerance = magnitude * 2**-20 + expected.abs() * 2.0 ** -MANTISSA_BITS[torch.bfloat16] + 1e-30
    assert y.shape == (m, n) and ((y.double() - expected).abs() <= tolerance).all(), (y.double() - expected).abs().max()


@settings(deadline=None, max_examples=8)
@given(
    m=st.integers(2, 64),
    inner=st.integers(1, 150),
    k=st.integers(1, 300),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    fp8=st.sampled_from(FORMATS),
    per_block=st.booleans(),
    splits=st.sampled_from([1, 2]),
    via_fp16=st.booleans(),
    swap_ab=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(m=5, inner=70, k=300, x_dtype=torch.bfloat16, fp8=torch.float8_e4m3fn, per_block=True, splits=2, via_fp16=True,
         swap_ab=True, seed=3)  # up rows 70-139: their block scales start inside the gate's first block
def test_fp8_gemm_swiglu_out_equals_the_product_then_silu_mul(m, inner, k, x_dtype, fp8, per_block, splits, via_fp16,
                                                             swap_ab, seed):
    """SWIGLU_OUT on an FP8 gate/up weight (interpreted on CPU): each program's gate and up sums
    scaled by their own rows' scales (per row, or per 128 x 128 block: the up rows' blocks are
    the packed weight's rows I on), each rounded to x's dtype, then SwiGLU, as the same launch's
    plain product and paiton::silu_mul give it (SILU_AFTER), within the tolerance relative to
    the output's norm (torch's silu on CPU against the interpreter's); against the float64
    product of the dequantized weight, one rounding of each product and of the result."""
    from paiton.fusion.few_rows_gemm import SILU_AFTER, candidate, launch_candidate
    from paiton.fusion.swiglu import silu_mul

    w8, row_scales = quantize_weight(random_weight(2 * inner, k, seed, outliers=seed % 2 == 1), fp8)  # [gate; up]
    scales = block_scales(2 * inner, k, seed) if per_block else row_scales
    x = torch.randn(m, 1, k, generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    launch = candidate(16, 32, 4, 1, splits=splits, via_fp16=via_fp16, swap_ab=swap_ab)
    y = launch_candidate(x, w8, launch, scales, swiglu_out=True)
    assert y.shape == (m, 1, inner) and y.dtype == x_dtype
    plain = launch_candidate(x, w8, launch, scales)
    two_kernels = launch_candidate(x, w8, {**launch, SILU_AFTER: True}, scales, swiglu_out=True)
    assert torch.equal(two_kernels, silu_mul(*plain.chunk(2, dim=-1)))
    tolerance = 2.0 ** -MANTISSA_BITS[x_dtype] if x_dtype != torch.float32 else 1e-5
    norm = two_kernels.double().norm().clamp_min(1e-30)
    assert ((y.double() - two_kernels.double()).norm() / norm).item() <= tolerance
    product = gemv_reference(x, w8, scales)
    expected = torch.nn.functional.silu(product[..., :inner]) * product[..., inner:]
    assert ((y.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item() <= 4 * tolerance


def test_gemv_scale_layouts_are_checked():
    w8, scales = quantize_weight(random_weight(200, 300, 1))
    x = torch.randn(1, 300)
    with pytest.raises(ValueError, match="needs its scales"):
        gemv.launch_gemv(x, w8, gemv.INTERPRETER_CONFIG)
    with pytest.raises(ValueError, match=r"scales for W \[200, 300\] are \[200\]"):
        gemv.launch_gemv(x, w8, gemv.INTERPRETER_CONFIG, scales=torch.ones(7))
    with pytest.raises(ValueError, match="only an FP8 weight takes them"):
        gemv.launch_gemv(x, w8.float(), gemv.INTERPRETER_CONFIG, scales=scales)
    with pytest.raises(ValueError, match="float32"):
        gemv.launch_gemv(x, w8, gemv.INTERPRETER_CONFIG, scales=scales.double())


def packed(weights_and_scales):
    """FP8 weights and their scales each packed as consecutive row blocks of one buffer (as
    merged_projections packs them)."""
    weights = torch.cat([w for w, _ in weights_and_scales])
    scales = torch.cat([s.reshape(s.shape[0], -1) for _, s in weights_and_scales])
    w_views, s_views, start, s_start = [], [], 0, 0
    for w, s in weights_and_scales:
        w_views.append(weights[start:start + w.shape[0]])
        s_views.append(scales[s_start:s_start + s.shape[0]].reshape(s.shape))
        start, s_start = start + w.shape[0], s_start + s.shape[0]
    return w_views, s_views


@pytest.mark.parametrize("rows", [1, 5, 80])
@pytest.mark.parametrize("per_block", [False, True])
def test_fp8_linear_over_packed_weights(rows, per_block):
    """paiton.fp8_linear(x, [W8_q, W8_k, W8_v], [s_q, s_k, s_v]) over packed weights: one product
    against the packed matrix (one row: the GEMV; up to 64: the FP8 GEMM; more: dequantized,
    then torch's linear)."""
    parts = []
    for i, n in enumerate((256, 128, 128)):
        w8, s = quantize_weight(random_weight(n, 384, i))
        parts.append((w8, block_scales(n, 384, i) if per_block else s))
    weights, scales = packed(parts)
    x = torch.randn(rows, 384).to(torch.bfloat16)
    y = torch.ops.paiton.fp8_linear(x, weights, scales)
    expected = torch.cat([torch.nn.functional.linear(x, dequantize(w, s, torch.bfloat16)) for w, s in parts], dim=-1)
    assert y.shape == (rows, 512) and y.dtype == torch.bfloat16
    if rows <= 64:  # the kernels: fp32 sums of the FP8 values (no bf16 dequantized weight), rounded once to bf16
        exact = torch.cat([gemv_reference(x, w, s) for w, s in parts], dim=-1)
        magnitude = torch.cat([x.double().abs() @ dequantize(w, s, torch.float64).abs().T for w, s in parts], dim=-1)
        assert ((y.double() - exact).abs() <= magnitude * 2**-20 + exact.abs() * 2**-7).all()
    else:
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    loose = [w.clone() for w in weights]
    with pytest.raises(RuntimeError, match="not where the packed buffer has it"):
        torch.ops.paiton.fp8_linear(x, loose, scales)


@pytest.mark.parametrize("rows", [1, 5, 80])
@pytest.mark.parametrize("per_block", [False, True])
def test_fp8_linear_silu_mul_over_packed_gate_up(rows, per_block):
    """paiton.fp8_linear_silu_mul(x, [W8_gate, W8_up], [s_gate, s_up]): SwiGLU on the packed
    product's halves. 2-64 rows: the FP8 GEMM with SWIGLU_OUT (the interpreter's untimed launch
    on CPU), within one rounding of each half and of the result of the float64 reference; one row
    (the GEMV) and more than 64 (dequantized, then torch's linear): fp8_linear's product, then
    silu_mul, the same bits. Two weights of one shape only; its fake gives [..., I]."""
    from paiton.fusion.swiglu import silu_mul

    parts = []
    for i in range(2):  # 256 rows each: whole 128-row blocks, as merged_projections packs block scales
        w8, s = quantize_weight(random_weight(256, 384, i))
        parts.append((w8, block_scales(256, 384, i) if per_block else s))
    weights, scales = packed(parts)
    x = torch.randn(rows, 1, 384).to(torch.bfloat16)
    y = torch.ops.paiton.fp8_linear_silu_mul(x, weights, scales)
    assert y.shape == (rows, 1, 256) and y.dtype == torch.bfloat16
    two_ops = silu_mul(*torch.ops.paiton.fp8_linear(x, weights, scales).chunk(2, dim=-1))
    if 1 < rows <= 64:
        exact = torch.cat([gemv_reference(x, w, s) for w, s in parts], dim=-1)
        expected = torch.nn.functional.silu(exact[..., :256]) * exact[..., 256:]
        assert ((y.double() - expected).norm() / expected.norm()).item() <= 4 * 2**-7
        assert ((y.double() - two_ops.double()).norm() / two_ops.double().norm()).item() <= 2**-7
    else:
        assert torch.equal(y, two_ops)
    with torch._subclasses.FakeTensorMode():
        fake = torch.ops.paiton.fp8_linear_silu_mul(torch.empty(8, 1, 384, dtype=torch.bfloat16),
                                                    [torch.empty(256, 384, dtype=weights[0].dtype)] * 2,
                                                    [torch.empty(256)] * 2)
    assert fake.shape == (8, 1, 256)
    with pytest.raises(ValueError, match="two weights of one shape"):
        torch.ops.paiton.fp8_linear_silu_mul(x, weights[:1], scales[:1])


def test_fp8_linear_opcheck():
    """torch.library's checks of the ops' registrations (fake kernels, autograd registration,
    AOT dispatch with dynamic shapes), one row (the GEMV, interpreted) and several (the
    reference). The schema check is left out: its dispatch mode compares the inputs before and
    after with arithmetic torch has no CPU kernel for on FP8 tensors ("mul_cpu_reduced_float").
    The ops mutate nothing (their schemas say so, and test_faketensor runs them on copies)."""
    w8, s = quantize_weight(random_weight(64, 96, 0))
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for rows in (1, 3):
        torch.library.opcheck(torch.ops.paiton.fp8_linear.default, (torch.randn(rows, 96), [w8], [s]), test_utils=checks)
        torch.library.opcheck(torch.ops.paiton.silu_mul_fp8_linear.default,
                              (torch.randn(rows, 96), torch.randn(rows, 96), [w8], [s]), test_utils=checks)


def test_quantize_fp8_replaces_the_decoder_linears():
    """Every decoder linear (7 a layer) becomes an Fp8Linear with per-channel scales; the
    embeddings, norms and lm_head stay fp32; the logits stay near the original model's."""
    model = build_qwen3("tiny", dtype=torch.float32, seed=1)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        paiton.quantize_fp8(model)
        actual = model(ids).logits
    fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 7 * model.config.num_hidden_layers
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.shape == (m.out_features,) for m in fp8)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.model.embed_tokens.weight.dtype == torch.float32
    difference = (actual - expected).abs().max().item()
    assert 0 < difference < 0.1 * expected.abs().max().item(), difference
    with_head = paiton.quantize_fp8(build_qwen3("tiny", dtype=torch.float32, seed=1), include_lm_head=True)
    assert isinstance(with_head.lm_head, Fp8Linear)


@pytest.mark.parametrize("arch, message", [("sm_80", r"A100 \(sm_80\) has none"), ("gfx90a", r"\(gfx90a\) has none")])
def test_chips_without_fp8_are_refused_by_name(arch, message):
    from paiton.backends.target import target_named

    with pytest.raises(RuntimeError, match=message):
        fp8_format(target=target_named(arch))
    with pytest.raises(RuntimeError, match="has none"):
        quantize_fp8(build_qwen3("tiny"), target=target_named(arch))


@pytest.mark.parametrize("arch, dtype", [("sm_90", torch.float8_e4m3fn), ("sm_100", torch.float8_e4m3fn),
                                         ("gfx942", torch.float8_e4m3fnuz), ("gfx950", torch.float8_e4m3fn)])
def test_each_chip_quantizes_to_its_format(arch, dtype):
    from paiton.backends.target import target_named

    assert fp8_format(target=target_named(arch)) == dtype


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 32])
@pytest.mark.parametrize("per_block", [False, True])
def test_fp8_kernels_on_gpu_at_qwen3_shapes(rows, per_block):
    """On the GPU, in the chip's FP8 format: the op at Qwen3-8B's q/k/v and down_proj shapes,
    one row (the GEMV) and 8 and 32 (the path fusion/fp8_paths.py timed fastest for the shape:
    the FP8 GEMM, _scaled_mm or the dequantized GEMM), against the float64 product of x and the
    dequantized weight, within the chosen path's bound (fp32 summation noise and one bf16
    rounding; the dequantized weight's or the quantized activations' rounding besides)."""
    from paiton_testing import fp8_product_bound

    from paiton.fusion import fp8_paths

    fp8 = fp8_format("cuda")
    for n, k in ((6144, 4096), (4096, 12288)):
        w8, row_scales = quantize_weight(random_weight(n, k, 0, outliers=True).cuda(), fp8)
        scales = block_scales(n, k, 0).cuda() if per_block else row_scales
        x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
        y = torch.ops.paiton.fp8_linear(x, [w8], [scales])
        path = "gemv" if rows == 1 else next(r["choice"] for r in fp8_paths.chosen_paths()
                                            if (r["rows"], r["n"], r["k"], r["scales"]) == (rows, n, k, "blocks" if per_block else "rows"))
        expected = gemv_reference(x, w8, scales)
        assert ((y.double() - expected).abs() <= fp8_product_bound(x, w8, scales, path)).all(), path
        # Every launch the op's choices may take, not only the ones they took.
        from paiton.backends.lowering import lowering_for
        from paiton.backends.target import detect_target
        from paiton.fusion import few_rows_gemm, gemv

        params = lowering_for("fp8_linear", detect_target(x.device)).params
        if rows == 1:
            for config in params["one_row_candidates"]:
                y = gemv.launch_gemv(x, w8, config, scales=scales)
                assert ((y.double() - expected).abs() <= fp8_product_bound(x, w8, scales, "gemv")).all(), config
        else:
            for config in params["several_rows_candidates"]:
                if per_block and few_rows_gemm.SCALE_BLOCK % config["BLOCK_K"]:
                    continue  # not a launch block scales take
                y = few_rows_gemm.launch_candidate(x, w8, config, scales)
                assert ((y.double() - expected).abs() <= fp8_product_bound(x, w8, scales, "fp8_gemm")).all(), config


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 32])
def test_fp8_gate_up_with_swiglu_out_on_gpu(rows):
    """On the GPU, Qwen3-32B's gate/up in FP8 ([2 x 25600, 5120], quantize_fp8's row scales), bf16
    x: every FP8 GEMM launch of the chip's table that fits with two W tiles a stage, SwiGLU in its
    last step, against the same launch plain then silu_mul (one bf16 rounding relative to the
    output's norm: the same sums, the same roundings, the GPU's exp); the op's timed choice
    against SwiGLU of the float64 product (each half within the chosen path's bound, then
    silu's and one rounding more). Printed: the FP8 paths' and the launches' times."""
    from paiton_testing import fp8_product_bound

    from paiton.backends.lowering import lowering_for
    from paiton.backends.target import detect_target
    from paiton.fusion import few_rows_gemm, fp8_paths
    from paiton.fusion.swiglu import silu_mul

    inner, k = 25600, 5120
    w8, scales = quantize_weight(random_weight(2 * inner, k, 0, outliers=True).cuda(), fp8_format("cuda"))
    weights, scale_parts = [w8[:inner], w8[inner:]], [scales[:inner], scales[inner:]]
    x = torch.randn(rows, 1, k, device="cuda").to(torch.bfloat16)
    target = detect_target(x.device)
    launches = few_rows_gemm.fitting(lowering_for("fp8_linear", target).params["several_rows_candidates"], rows, 2,
                                     target.shared_memory_per_block, swiglu_out=True)
    assert launches
    for config in launches:
        y = few_rows_gemm.launch_candidate(x, w8, config, scales, swiglu_out=True)
        two_kernels = few_rows_gemm.launch_candidate(x, w8, {**config, few_rows_gemm.SILU_AFTER: True}, scales,
                                                     swiglu_out=True)
        assert ((y.double() - two_kernels.double()).norm() / two_kernels.double().norm()).item() <= 2**-8, config
    y = torch.ops.paiton.fp8_linear_silu_mul(x, weights, scale_parts)
    record = next(r for r in fp8_paths.chosen_paths() if r.get("swiglu_out") and (r["n"], r["rows"]) == (2 * inner, rows))
    product = gemv_reference(x, w8, scales)
    gate, up = product[..., :inner], product[..., inner:]
    bound = fp8_product_bound(x, w8, scales, record["choice"])
    expected = silu_mul(gate.bfloat16(), up.bfloat16()).double()  # each half rounded to bf16, as the kernels do
    # a half off by its bound moves silu(gate) * up by at most |d silu| <= 1.1 times it, times |up|, and up's
    # own error times |silu(gate)|; then one rounding of the result
    slack = (1.1 * bound[..., :inner] * up.abs() + bound[..., inner:] * torch.nn.functional.silu(gate).abs()
             + 2 * expected.abs() * 2**-8)
    assert ((y.double() - expected).abs() <= slack + 1e-6).all(), record
    print(f"\n{rows} rows: {fp8_paths.describe_choice(record)}")
    for line in few_rows_gemm.describe_choices():
        if "SwiGLU" in line and line.startswith(f"{rows} rows x [{2 * inner} x"):
            print("  " + line)

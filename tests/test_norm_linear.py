"""The norms inside the one-row products (fusion/norm_linear.py, passes/norm_linear.py).

Kernel (fusion/gemv.py's NORM, RESIDUAL and SQUARES_OUT, under Triton's interpreter on the CPU;
compiled on a GPU): the residual add is eager's add after the plain GEMV, bit for bit, and the
sums of squares it leaves are torch's of the stored outputs (fp32, groups of 4: within fp32's
rounding); the normalized product is the plain GEMV of the eager norm's output within the
norm's tolerance (the kernel rounds x times the norm's weight to x's dtype and scales the fp32
sums by 1 / rms, where eager rounds x * rstd and then its product with the weight: fp32 within
1e-5 relative to the output's norm, fp16 within 2**-9), over random widths (masked tails),
launches (x in W's layout, CHUNK sums) and FP8 weights. bf16 is checked through the ops (fp16
has bf16's cast points and the interpreter rounds bf16 toward zero: ENV_NOTES).

Pass: a tiny Qwen3 (fp32 weights and FP8 weights) decoding at batch 1 with the pass on loses
2 * layers - 1 norm kernels (every one but the first layer's input norm, on the embedding, and
the final norm, sliced for the lm_head) and matches eager; near misses are left alone: two rows, a norm output with another user, the pass
off (its default until timed on a GPU).
"""

import operator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER, compile_and_capture, fusions

import paiton
import paiton.fusion.norm_linear  # noqa: F401  (registers torch.ops.paiton.rms_norm_linear, linear_add)
from paiton.fusion import gemv
from paiton.fusion.norm_linear import sums_of_squares
from paiton.fusion.fp8_linear import quantize_weight
from paiton.fusion.rms_norm import rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = [gemv.gemv_config(4, 32, 4, 2), gemv.gemv_config(16, 16, 2, 1), gemv.gemv_config(8, 64, 4, 1, x_per_row=True, chunk=16),
           gemv.gemv_config(16, 32, 4, 1, chunk=16)]
NORM_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2**-9}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def row_and_weights(n, k, dtype, seed, fp8=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=generator).to(DEVICE, dtype) * 3
    norm_weight = (1 + 0.2 * torch.randn(k, generator=generator)).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(DEVICE, dtype)
    residual = torch.randn(1, n, generator=generator).to(DEVICE, dtype)
    scales = None
    if fp8:
        weight, scales = quantize_weight(weight.float(), torch.float8_e4m3fn)
    return x, norm_weight, weight, scales, residual


@given(n=st.integers(1, 60), k=st.integers(1, 160), dtype=st.sampled_from([torch.float32, torch.float16]),
       config=st.sampled_from(CONFIGS), gated=st.booleans(), seed=st.integers(0, 2**16))
def test_residual_is_added_as_eager_adds_it(n, k, dtype, config, gated, seed):
    x, _, weight, _, residual = row_and_weights(n, k, dtype, seed)
    up = torch.randn_like(x) if gated else None
    fused, squares = gemv.launch_gemv(x, weight, config, up, residual=residual, squares_out=True)
    assert torch.equal(fused, gemv.launch_gemv(x, weight, config, up) + residual)
    assert squares.shape == (1, gemv.squares_count(n)) and squares.dtype == torch.float32
    torch.testing.assert_close(squares, sums_of_squares(fused), rtol=1e-6, atol=0)


@given(n=st.integers(1, 60), k=st.integers(1, 160), dtype=st.sampled_from([torch.float32, torch.float16]),
       config=st.sampled_from(CONFIGS), eps=st.sampled_from([1e-6, 1e-5, 0.1]), seed=st.integers(0, 2**16))
def test_normalized_product_is_the_norm_then_the_product(n, k, dtype, config, eps, seed):
    x, norm_weight, weight, _, _ = row_and_weights(n, k, dtype, seed)
    fused = gemv.launch_gemv(x, weight, config, norm_weight=norm_weight, squares=sums_of_squares(x).reshape(-1), eps=eps)
    normalized = rms_norm_reference(x, norm_weight, eps)
    unfused = gemv.launch_gemv(normalized, weight, config)
    assert fused.shape == unfused.shape and fused.dtype == dtype
    error = rounding_error(fused, unfused, normalized, weight.double())
    assert error <= NORM_TOLERANCE[dtype], (n, k, dtype, config, error)


def rounding_error(fused, unfused, normalized, weight):
    """How far the normalized product is from the norm then the product, relative to the terms'
    magnitudes: the two forms round at other points, each rounding relative to a term's size, so
    the bound is on the sums of |terms|, not on the sums themselves (a sum of few terms may cancel:
    hypothesis found n=1, k=4 in fp16 3 ulps apart on a sum 0.074 whose terms summed to more, and
    with FP8 weights n=1, k=102, 0.0138 against 0.0136)."""
    magnitude = (normalized.double().abs() @ weight.abs().T).norm().clamp_min(1e-30)
    return ((fused.double() - unfused.double()).norm() / magnitude).item()


@given(n=st.integers(1, 40), k=st.integers(1, 130), seed=st.integers(0, 2**16))
def test_fp8_weights_normalized_and_with_residual(n, k, seed):
    x, norm_weight, weight, scales, residual = row_and_weights(n, k, torch.float16, seed, fp8=True)
    config = gemv.gemv_config(8, 64, 4, 1, x_per_row=True, chunk=16)
    fused = gemv.launch_gemv(x, weight, config, scales=scales, norm_weight=norm_weight, squares=sums_of_squares(x), eps=1e-6)
    normalized = rms_norm_reference(x, norm_weight, 1e-6)
    unfused = gemv.launch_gemv(normalized, weight, config, scales=scales)
    dequantized = weight.double() * scales.double()[:, None]
    assert rounding_error(fused, unfused, normalized, dequantized) <= NORM_TOLERANCE[torch.float16]
    up = torch.randn_like(x)
    added = gemv.launch_gemv(x, weight, config, up, scales=scales, residual=residual)
    assert torch.equal(added, gemv.launch_gemv(x, weight, config, up, scales=scales) + residual)


@pytest.mark.parametrize("config", CONFIGS)
def test_fp16_outliers_do_not_overflow_before_the_norm(config):
    """fp16: x times the norm's weight, not yet normalized, can pass fp16's 65504 (a residual
    stream's outlier times a large weight); the kernel keeps that product in fp32 there."""
    x, norm_weight, weight, _, _ = row_and_weights(24, 64, torch.float16, 0)
    x[0, 3], norm_weight[3] = 3000.0, 30.0
    fused = gemv.launch_gemv(x, weight, config, norm_weight=norm_weight, squares=sums_of_squares(x), eps=1e-6)
    unfused = gemv.launch_gemv(rms_norm_reference(x, norm_weight, 1e-6), weight, config)
    assert torch.isfinite(fused).all() and relative_error(fused, unfused) <= NORM_TOLERANCE[torch.float16]


def test_an_empty_row_normalizes_to_a_zero_product():
    x, norm_weight, weight = torch.empty(1, 0), torch.empty(0), torch.empty(5, 0)
    y = gemv.launch_gemv(x, weight, CONFIGS[0], norm_weight=norm_weight, squares=torch.zeros(1, 0), eps=1e-6)
    assert torch.equal(y, torch.zeros(1, 5))


def test_fusion_arguments_are_checked():
    x, norm_weight, weight, _, residual = row_and_weights(8, 16, torch.float32, 0)
    config = CONFIGS[0]
    squares = sums_of_squares(x)
    with pytest.raises(ValueError, match="normalized .* or gated"):
        gemv.launch_gemv(x, weight, config, torch.randn_like(x), norm_weight=norm_weight, squares=squares)
    with pytest.raises(ValueError, match="norm's weight is \\[K\\]"):
        gemv.launch_gemv(x, weight, config, norm_weight=norm_weight[:-1], squares=squares)
    with pytest.raises(ValueError, match="both the norm's weight and the sums"):
        gemv.launch_gemv(x, weight, config, norm_weight=norm_weight)
    with pytest.raises(ValueError, match="residual is the product's shape"):
        gemv.launch_gemv(x, weight, config, residual=residual.half())
    _, weights = packed(24, 8)
    with pytest.raises(ValueError, match="residual is the product's shape"):
        torch.ops.paiton.linear_add(torch.randn(1, 48), None, weights, [], torch.randn(1, 1))  # no broadcast
    with pytest.raises(ValueError, match="BLOCK_N a multiple of 4"):
        gemv.launch_gemv(x, weight, gemv.gemv_config(2, 16, 1, 1), squares_out=True)


def packed(*row_counts, k=48, dtype=torch.float32, seed=0):
    buffer = (torch.randn(sum(row_counts), k, generator=torch.Generator().manual_seed(seed)) / k**0.5).to(dtype)
    return buffer, list(buffer.split(list(row_counts)))


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_are_the_unfused_ops_in_turn(rows, dtype):
    """One row: the fused GEMV (within the norm's tolerance, or one bf16 rounding of the output
    under the interpreter's bf16 casts); several rows: the unfused ops themselves, bit for bit."""
    ops = torch.ops.paiton
    buffer, weights = packed(24, 8, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 48, generator=generator).to(dtype)
    up = torch.randn(rows, 48, generator=generator).to(dtype)
    norm_weight = (1 + 0.2 * torch.randn(48, generator=generator)).to(dtype)
    residual = torch.randn(rows, 32, generator=generator).to(dtype)
    squares = sums_of_squares(x)
    results = {
        "norm": (ops.rms_norm_linear(x, squares, norm_weight, 1e-6, weights, []),
                 ops.packed_linear(ops.rms_norm(x, norm_weight, 1e-6), weights)),
        "add": (ops.linear_add(x, None, weights, [], residual)[0], ops.packed_linear(x, weights) + residual),
        "gated add": (ops.linear_add(x, up, weights, [], residual)[0], ops.silu_mul_packed_linear(x, up, weights) + residual),
    }
    w8, scales = quantize_weight(buffer.float())
    w8s, scale_rows = list(w8.split([24, 8])), list(scales.split([24, 8]))
    results["fp8 norm"] = (ops.rms_norm_linear(x, squares, norm_weight, 1e-6, w8s, scale_rows),
                           ops.fp8_linear(ops.rms_norm(x, norm_weight, 1e-6), w8s, scale_rows))
    results["fp8 gated add"] = (ops.linear_add(x, up, w8s, scale_rows, residual)[0],
                                ops.silu_mul_fp8_linear(x, up, w8s, scale_rows) + residual)
    summed, summed_squares = ops.linear_add(x, None, weights, [], residual)
    assert summed_squares.shape == (rows, 8)
    torch.testing.assert_close(summed_squares, sums_of_squares(summed), rtol=1e-6, atol=0)
    for name, (fused, unfused) in results.items():
        assert fused.shape == unfused.shape == (rows, 32) and fused.dtype == dtype, name
        if rows > 1 or (name.endswith("add") and dtype == torch.float32):
            assert torch.equal(fused, unfused), name
        else:
            assert relative_error(fused, unfused) <= (1e-5 if dtype == torch.float32 else 2**-7), name


def test_fake_ops_give_the_products_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, weights = packed(24, 8)
    with FakeTensorMode():
        x, weights = torch.empty(1, 1, 48), [torch.empty(w.shape) for w in weights]
        assert torch.ops.paiton.rms_norm_linear(x, torch.empty(1, 1, 12), torch.empty(48), 1e-6, weights, []).shape == (1, 1, 32)
        summed, squares = torch.ops.paiton.linear_add(x, None, weights, [], torch.empty(1, 1, 32))
        assert summed.shape == (1, 1, 32) and squares.shape == (1, 1, 8) and squares.dtype == torch.float32


def decode_counts(model, options, new_tokens=4):
    """(the decode graph's fusion counts, logits of eager and compiled) of a greedy batch-1 run."""
    from paiton.models.hf_loop import hf_static_cache_greedy

    torch._dynamo.reset()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    expected = hf_static_cache_greedy(model, model, ids, new_tokens=new_tokens)
    compiled = torch.compile(model, backend="paiton", options={**EAGER_INNER, **options})
    actual = hf_static_cache_greedy(compiled, model, ids, new_tokens=new_tokens, follow=expected)
    return [g.counts for g in paiton.fusion_graphs(model)], actual, expected


@pytest.mark.parametrize("weights", ["fp32", "fp8"])
def test_a_batch_1_decode_step_keeps_one_norm_kernel(weights):
    from paiton.models.qwen3 import build_qwen3

    model = build_qwen3("tiny", dtype=torch.float32, seed=2)
    if weights == "fp8":
        paiton.quantize_fp8(model)
    layers = model.config.num_hidden_layers
    counts, actual, expected = decode_counts(model, {"paiton.norm_linear": True})
    prefill, decode = counts
    assert prefill["norm_linear"] == 0  # several rows: left alone
    assert decode["norm_linear"] == 2 * layers - 1  # every layer's two norms but the first layer's input norm
    assert decode["fused_add_rms_norm"] == 2 * layers and decode["rms_norm"] == 2 * layers + 1  # made first, then moved
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_off_by_default():
    from paiton.models.qwen3 import build_qwen3

    counts, _, _ = decode_counts(build_qwen3("tiny", dtype=torch.float32, seed=2, num_hidden_layers=1), {}, new_tokens=2)
    assert all("norm_linear" not in c for c in counts)


class ProjectionNormProjection(torch.nn.Module):
    """o_proj, the residual add and RMSNorm, gate/up: a layer's middle; `extra_use`: the normed
    value is also returned (it must exist)."""

    def __init__(self, hidden, inner, dtype, extra_use=False):
        super().__init__()
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.gate_proj = torch.nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.up_proj = torch.nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=dtype))
        self.extra_use = extra_use

    def forward(self, attn):
        residual = 2 * attn.flip(-1)  # the residual stream: any other value of the row's width
        summed = self.o_proj(attn) + residual
        h = summed.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        normed = self.norm_weight * h.to(summed.dtype)
        out = (self.gate_proj(normed), self.up_proj(normed), summed)
        return (*out, normed) if self.extra_use else out


@given(hidden=st.sampled_from([16, 40, 64]), inner=st.sampled_from([24, 48]), leading=st.sampled_from([(1,), (1, 1)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_the_add_goes_into_the_first_product_and_the_norm_into_the_second(hidden, inner, leading, dtype):
    torch._dynamo.reset()
    module = ProjectionNormProjection(hidden, inner, dtype)
    attn = torch.randn(*leading, hidden, dtype=dtype)
    with torch.no_grad():
        expected = module(attn)
    actual, graphs = compile_and_capture(module, attn, {"paiton.norm_linear": True})
    (before, census, counts), = graphs
    assert counts == fusions(merged_projections=1, one_row_linear=1, fused_add_rms_norm=1, norm_linear=1)
    assert census["paiton.linear_add.default"] == census["paiton.rms_norm_linear.default"] == 1
    assert census["paiton.fused_add_rms_norm.default"] == census["paiton.packed_linear.default"] == 0
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=4e-2)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tolerance)


@pytest.mark.parametrize("case", ["two rows", "normed used twice"])
def test_near_misses_are_left_alone(case):
    torch._dynamo.reset()
    module = ProjectionNormProjection(32, 48, torch.float32, extra_use=case == "normed used twice")
    rows = 2 if case == "two rows" else 1
    attn = torch.randn(rows, 32)
    with torch.no_grad():
        expected = module(attn)
    actual, graphs = compile_and_capture(module, attn, {"paiton.norm_linear": True})
    (before, census, counts), = graphs
    assert counts["norm_linear"] == 0 and counts["fused_add_rms_norm"] == 1
    assert census["paiton.linear_add.default"] == census["paiton.rms_norm_linear.default"] == 0
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_a_product_with_another_user_keeps_its_norm():
    """The first product's output feeds something else too: the add cannot move into it."""
    import paiton.fusion.norm_linear  # noqa: F401
    from paiton.passes.norm_linear import NormLinearPass

    ops = torch.ops.paiton
    graph = torch.fx.Graph()
    attn, residual, w_o, norm_w, w_up = (graph.placeholder(name) for name in ("attn", "residual", "w_o", "norm_w", "w_up"))
    y = graph.call_function(ops.packed_linear.default, (attn, [w_o]))
    norm = graph.call_function(ops.fused_add_rms_norm.default, (y, residual, norm_w, 1e-6))
    normed = graph.call_function(operator.getitem, (norm, 0))
    z = graph.call_function(ops.packed_linear.default, (normed, [w_up]))
    for node in (y, normed):
        node.meta["val"] = torch.empty(1, 16)
    norm_w.meta["val"], norm.meta["val"] = torch.empty(16), (torch.empty(1, 16), torch.empty(1, 16))
    graph.output((z, y))
    assert NormLinearPass()(graph) == 0
    graph.erase_node(graph.output_node())
    graph.output(z)
    assert NormLinearPass()(graph) == 1
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [
        ops.linear_add.default, operator.getitem, operator.getitem, ops.rms_norm_linear.default]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_fused_gemv_on_the_gpu_at_qwen3_widths(weights):
    """Compiled: Qwen3-8B's o_proj with the residual (bit for bit against the GEMV then eager's
    add; its sums of squares as torch's) and its gate/up after the norm (against paiton.rms_norm,
    then the GEMV: within the norm's roundings), with every launch the table times."""
    from paiton.backends.lowering import launch_config
    from paiton.backends.target import detect_target

    target = detect_target(torch.device("cuda"))
    fp8 = weights == "fp8"
    configs = launch_config("fp8_linear" if fp8 else "one_row_linear", target)["one_row_candidates" if fp8 else "candidates"]
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 4096, generator=generator) * 3).to("cuda", torch.bfloat16)
    residual = torch.randn(1, 4096, generator=generator).to("cuda", torch.bfloat16)
    norm_weight = (1 + 0.2 * torch.randn(4096, generator=generator)).to("cuda", torch.bfloat16)
    o_proj = (torch.randn(4096, 4096, generator=generator) / 64).to("cuda", torch.bfloat16)
    gate_up = (torch.randn(2 * 12288, 4096, generator=generator) / 64).to("cuda", torch.bfloat16)
    scales = {}
    if fp8:
        (o_proj, scales["o"]), (gate_up, scales["gu"]) = quantize_weight(o_proj), quantize_weight(gate_up)
    normed = torch.ops.paiton.rms_norm(x, norm_weight, 1e-6)
    for config in configs:
        added, squares = gemv.launch_gemv(x, o_proj, config, scales=scales.get("o"), residual=residual, squares_out=True)
        assert torch.equal(added, gemv.launch_gemv(x, o_proj, config, scales=scales.get("o")) + residual), config
        torch.testing.assert_close(squares, sums_of_squares(added), rtol=1e-5, atol=0)
        fused = gemv.launch_gemv(x, gate_up, config, scales=scales.get("gu"), norm_weight=norm_weight,
                                 squares=sums_of_squares(x), eps=1e-6)
        unfused = gemv.launch_gemv(normed, gate_up, config, scales=scales.get("gu"))
        assert relative_error(fused, unfused) < 2**-8, config

"""SwiGLU on a decode step's gate/up product (passes/swiglu_out.py): at 2-64 rows the merged
gate/up product and the silu_mul of its halves become paiton.packed_linear_silu_mul, whose
few-rows GEMM pairs gate and up rows in one program (fusion/few_rows_gemm.py SWIGLU_OUT; the
interpreter's launch on CPU), through backend="paiton" (eager inner compiler) on Qwen3's MLP;
down_proj then runs plain; with FP8 weights the merged fp8_linear and its silu_mul become
paiton.fp8_linear_silu_mul (the FP8 GEMM's SWIGLU_OUT launch). Random widths and row counts
(hypothesis), a dynamic batch, and near misses left alone: one row (down_proj's gated GEMV takes
it), prefill rows, a half used elsewhere, halves that are not the product's [gate, up] (on a
traced ATen graph), the pass switched off.

Tolerance: the fused launch rounds gate and up to the output dtype and applies SwiGLU as
paiton.silu_mul does, so it differs from eager only by the few-rows GEMM's sums (another order
than the CPU GEMM): fp32 within 1e-5, bf16 within one bf16 rounding of the output plus a floor
near zero (the down_proj product after it sums those roundings).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER, SwiGLUMLP, capture_paiton_graphs, compile_and_capture, fusions

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2e-2)}
FEW_ROWS_MLP = dict(merged_projections=1, few_rows_linear=1, swiglu=1)  # what feeds this pass


def run(module, x, **compile_args):
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x, **compile_args)
    return actual, expected, graphs


@settings(deadline=None, max_examples=12)
@given(hidden=st.sampled_from([16, 40, 64]), inner=st.sampled_from([8, 24, 48, 96]), batch=st.integers(2, 64),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_swiglu_goes_into_the_gate_up_product_at_a_few_rows(hidden, inner, batch, dtype):
    torch._dynamo.reset()
    module = SwiGLUMLP(hidden, inner, dtype)
    actual, expected, graphs = run(module, torch.randn(batch, 1, hidden, dtype=dtype))
    (before, census, counts), = graphs
    assert counts == fusions(**FEW_ROWS_MLP, swiglu_out=1)
    assert census["paiton.packed_linear_silu_mul.default"] == 1
    assert census["paiton.silu_mul.default"] == 0 and census["paiton.silu_mul_packed_linear.default"] == 0
    assert census["paiton.packed_linear.default"] == 1  # down_proj, plain
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def fp8_mlp(hidden, inner, dtype):
    """SwiGLUMLP with FP8 weights (models/fp8.py's Fp8Linear, per-channel scales), as
    paiton.quantize_fp8 makes a Qwen3 MLP."""
    from paiton.fusion.fp8_linear import quantize_weight
    from paiton.models.fp8 import Fp8Linear

    module = SwiGLUMLP(hidden, inner, dtype)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(module, name, Fp8Linear(*quantize_weight(getattr(module, name).weight.data)))
    return module


@settings(deadline=None, max_examples=6)
@given(hidden=st.sampled_from([16, 40, 64]), inner=st.sampled_from([8, 24, 48]), batch=st.integers(2, 64),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fp8_weights_take_swiglu_into_their_gate_up_product(hidden, inner, batch, dtype):
    """FP8 weights: the merged gate/up fp8_linear and the silu_mul of its halves become
    paiton.fp8_linear_silu_mul (the FP8 GEMM's SWIGLU_OUT launch on CPU); down_proj stays a plain
    fp8_linear. Eager runs the same FP8 GEMM plain and silu_mul's kernel: the tolerance above."""
    torch._dynamo.reset()
    module = fp8_mlp(hidden, inner, dtype)
    actual, expected, graphs = run(module, torch.randn(batch, 1, hidden, dtype=dtype))
    (before, census, counts), = graphs
    assert counts == fusions(merged_projections=1, swiglu=1, swiglu_out=1)
    assert census["paiton.fp8_linear_silu_mul.default"] == 1 and census["paiton.silu_mul.default"] == 0
    assert census["paiton.fp8_linear.default"] == 1  # down_proj, plain
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("rows", [1, 6], ids=["one row", "prefill rows"])
def test_fp8_weights_outside_a_decode_steps_few_rows_are_left_alone(rows):
    """One row: down_proj's FP8 GEMV takes SwiGLU as it loads (silu_mul_linear); a prefill's rows:
    the product and silu_mul's kernel, as they were."""
    torch._dynamo.reset()
    shape = (1, 1, 32) if rows == 1 else (1, rows, 32)
    actual, expected, graphs = run(fp8_mlp(32, 48, torch.float32), torch.randn(*shape))
    (before, census, counts), = graphs
    assert counts["swiglu_out"] == 0 and census["paiton.fp8_linear_silu_mul.default"] == 0
    assert counts["silu_mul_linear"] == (1 if rows == 1 else 0)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])


def test_a_dynamic_batch_is_a_decode_steps_rows():
    """The serving engine's decode graph (a symbolic batch): rewritten, and right at every batch
    size the graph then runs (the op takes the interpreter's launch at 2-64 rows, the two ops
    above 64)."""
    torch._dynamo.reset()
    module = SwiGLUMLP(32, 48, torch.float32)
    compiled = torch.compile(module, backend="paiton", options=EAGER_INNER, dynamic=True)
    with torch.no_grad(), capture_paiton_graphs() as graphs:
        for batch in (3, 7, 80):
            x = torch.randn(batch, 1, 32)
            torch.testing.assert_close(compiled(x), module(x), **TOLERANCE[torch.float32])
    (before, census, counts), = graphs  # one graph for all three
    assert counts["swiglu_out"] == 1 and census["paiton.packed_linear_silu_mul.default"] == 1


def test_an_activation_used_twice_is_still_made_by_the_product():
    """The activation returned as well as fed to down_proj: it exists either way, so the fused op
    makes it (unlike down_proj's gated form, which needs it to have no other user)."""
    torch._dynamo.reset()
    actual, expected, graphs = run(SwiGLUMLP(32, 48, torch.float32, extra_use=True), torch.randn(4, 1, 32))
    (before, census, counts), = graphs
    assert counts == fusions(**FEW_ROWS_MLP, swiglu_out=1)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])


class SwappedHalves(SwiGLUMLP):
    """silu of the up projection times the gate: the merge packs the projections in the order
    they are used, so silu's input is still the product's first half."""

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_the_halves_follow_the_packing_order():
    torch._dynamo.reset()
    actual, expected, graphs = run(SwappedHalves(32, 48, torch.float32), torch.randn(4, 1, 32))
    (before, census, counts), = graphs
    assert counts == fusions(**FEW_ROWS_MLP, swiglu_out=1)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("halves", ["gate, up", "up, gate", "overlapping", "one weight", "prefill"])
def test_the_pass_on_an_aten_graph(halves):
    """The pass on a traced ATen graph: silu_mul of the packed product's [first, second] half
    (slices of the last dim, as the merge's narrows become) is rewritten; the halves reversed,
    halves that are not the two weights' rows, a product of one weight, or prefill rows are not."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import paiton.fusion.packed_linear  # noqa: F401  (registers the ops)
    from paiton.passes.swiglu_out import SwiGLUOutPass

    inner = 48
    bounds = {"gate, up": ((0, inner), (inner, 2 * inner)), "up, gate": ((inner, 2 * inner), (0, inner)),
              "overlapping": ((0, inner), (inner - 8, 2 * inner - 8))}.get(halves, ((0, inner), (inner, 2 * inner)))

    def mlp_head(x, w_gate, w_up):
        weights = [torch.cat([w_gate, w_up])] if halves == "one weight" else [w_gate, w_up]
        product = torch.ops.paiton.packed_linear(x, weights)
        (g0, g1), (u0, u1) = bounds
        return torch.ops.paiton.silu_mul(product[..., g0:g1], product[..., u0:u1])

    x = torch.randn(1, 6, 32) if halves == "prefill" else torch.randn(4, 1, 32)
    graph = make_fx(mlp_head, tracing_mode="fake")(x, torch.randn(inner, 32), torch.randn(inner, 32)).graph
    expected = 1 if halves == "gate, up" else 0
    assert SwiGLUOutPass().apply(graph) == expected
    ops = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert ("paiton.packed_linear_silu_mul.default" in ops) == bool(expected)
    assert ("paiton.silu_mul.default" in ops) != bool(expected)


class GateUsedTwice(SwiGLUMLP):
    """The gate projection also returned: the product's half has another user."""

    def forward(self, x):
        gate = self.gate_proj(x)
        return self.down_proj(self.act_fn(gate) * self.up_proj(x)), gate


@pytest.mark.parametrize("case", ["one row", "prefill rows", "gate used twice", "switched off"])
def test_near_misses_are_left_alone(case):
    torch._dynamo.reset()
    cls = GateUsedTwice if case == "gate used twice" else SwiGLUMLP
    module = cls(32, 48, torch.float32)
    shape = {"one row": (1, 1, 32), "prefill rows": (1, 6, 32)}.get(case, (4, 1, 32))
    options = {"paiton.swiglu_out": False} if case == "switched off" else None
    actual, expected, graphs = run(module, torch.randn(*shape), options=options)
    (before, census, counts), = graphs
    assert counts["swiglu_out"] == 0 and census["paiton.packed_linear_silu_mul.default"] == 0, case
    if case in ("one row", "switched off"):  # down_proj takes SwiGLU as it loads instead
        assert counts["silu_mul_linear"] == 1
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])

"""SwiGLU into a decode step's product: paiton.silu_mul feeding paiton.packed_linear of one row
(or of a decode step's 2-64 rows) becomes paiton.silu_mul_packed_linear, whose GEMV (few-rows
GEMM) applies SwiGLU as it loads (fusion/gemv.py, fusion/few_rows_gemm.py), through
backend="paiton" (eager inner compiler) on Qwen3's MLP. Near misses are left alone: rows that are
not a decode step's (2-D), an activation with another user, no SwiGLU, the pass switched off.

Tolerance: as the one-row linear pass's (the GEMV accumulates in another order than the CPU
GEMM): fp32 within 1e-5, bf16 within one bf16 rounding of the output plus a floor near zero.
The fused op's own numerics are checked bit for bit against silu_mul + GEMV in
test_gemv_kernel.py.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import SwiGLUMLP as MLP
from paiton_testing import compile_and_capture, fusions

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2e-2)}


@given(hidden=st.sampled_from([16, 40, 64]), inner=st.sampled_from([24, 48, 96]), leading=st.sampled_from([(1,), (1, 1), ()]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_swiglu_goes_into_the_down_projection(hidden, inner, leading, dtype):
    torch._dynamo.reset()
    module = MLP(hidden, inner, dtype)
    x = torch.randn(*leading, hidden, dtype=dtype)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    (before, census, counts), = graphs
    assert counts == fusions(merged_projections=1, one_row_linear=1, swiglu=1, silu_mul_linear=1)
    assert census["paiton.silu_mul_packed_linear.default"] == 1
    assert census["paiton.silu_mul.default"] == 0 and census["paiton.packed_linear.default"] == 1  # gate/up only
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("batch", [2, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_goes_into_a_decode_steps_few_rows_product(batch, dtype):
    """A decode step's [batch, 1, hidden] at 2-64 rows, with the gate/up product's SwiGLU pass
    off (passes/swiglu_out.py takes these first): down_proj's few-rows GEMM applies SwiGLU as it
    loads (fusion/few_rows_gemm.py GATED; the interpreter's launch on CPU)."""
    torch._dynamo.reset()
    module = MLP(40, 96, dtype)
    x = torch.randn(batch, 1, 40, dtype=dtype)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x, options={"paiton.swiglu_out": False})
    (before, census, counts), = graphs
    assert counts == {**fusions(merged_projections=1, few_rows_linear=1, swiglu=1, silu_mul_linear=1), "swiglu_out": 0}
    assert census["paiton.silu_mul_packed_linear.default"] == 1 and census["paiton.silu_mul.default"] == 0
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("case", ["two rows", "activation used twice", "gelu"])
def test_near_misses_are_left_alone(case):
    torch._dynamo.reset()
    module = MLP(32, 48, torch.float32, activation="gelu" if case == "gelu" else "silu",
                 extra_use=case == "activation used twice")
    x = torch.randn(2 if case == "two rows" else 1, 32)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    (before, census, counts), = graphs
    assert counts["silu_mul_linear"] == 0 and census["paiton.silu_mul_packed_linear.default"] == 0
    if case != "gelu":
        assert counts["swiglu"] == 1 and census["paiton.silu_mul.default"] == 1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_switched_off_by_its_option():
    torch._dynamo.reset()
    _, graphs = compile_and_capture(MLP(16, 32, torch.float32), torch.randn(1, 16), {"paiton.silu_mul_linear": False})
    (before, census, counts), = graphs
    assert counts == fusions(merged_projections=1, one_row_linear=1, swiglu=1)
    assert census["paiton.silu_mul.default"] == 1 and census["paiton.silu_mul_packed_linear.default"] == 0


def test_arguments_passed_by_keyword_are_read():
    """Inductor's pattern matcher writes its replacements' arguments as keywords (the SwiGLU
    pass's silu_mul reaches this pass that way when the inner compiler is Inductor)."""
    import paiton.fusion.packed_linear  # noqa: F401
    from paiton.passes.silu_mul_linear import SiluMulLinearPass

    gate, up, weight = torch.randn(1, 24), torch.randn(1, 24), torch.randn(8, 24)
    graph = torch.fx.Graph()
    g, u, w = (graph.placeholder(name) for name in ("gate", "up", "weight"))
    act = graph.call_function(torch.ops.paiton.silu_mul.default, kwargs=dict(gate=g, up=u))
    act.meta["val"] = torch.empty(1, 24)
    graph.output(graph.call_function(torch.ops.paiton.packed_linear.default, kwargs=dict(x=act, weights=[w])))
    assert SiluMulLinearPass()(graph) == 1
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.paiton.silu_mul_packed_linear.default]
    actual = torch.fx.GraphModule(torch.nn.Module(), graph)(gate, up, weight)
    torch.testing.assert_close(actual, torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, weight))

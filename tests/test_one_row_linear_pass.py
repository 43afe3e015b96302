"""The one-row linear pass: a linear whose input is a single row becomes
paiton.packed_linear(x, [W]), whose one-row path is Paiton's GEMV (fusion/gemv.py), through
backend="paiton" (eager inner compiler). Near misses are left alone: more rows, a dynamic row
count, a bias, a weight that is not a parameter.

Tolerance: the GEMV accumulates in fp32 in another order than the CPU GEMM: fp32 within 1e-5,
bf16 within one bf16 rounding of the output (plus a floor near zero).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import LINEAR_TOLERANCE as TOLERANCE
from paiton_testing import EAGER_INNER, TwoLinears, capture_paiton_graphs, compile_and_capture, fusions


@given(hidden=st.sampled_from([16, 40, 64]), inner=st.sampled_from([8, 24, 96]), leading=st.sampled_from([(1,), (1, 1), ()]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_one_row_linears_go_through_the_gemv(hidden, inner, leading, dtype):
    torch._dynamo.reset()
    module = TwoLinears(hidden, inner, dtype)
    x = torch.randn(*leading, hidden, dtype=dtype)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    assert graphs[0][2] == fusions(one_row_linear=2)
    assert graphs[0][1]["paiton.packed_linear.default"] == 2 and graphs[0][1]["aten.mm.default"] == 0
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("case", ["two rows", "dynamic rows", "bias", "plain tensor weight"])
def test_near_misses_are_left_alone(case):
    torch._dynamo.reset()
    module = TwoLinears(32, 48, torch.float32, bias=case == "bias")
    # A dynamic row count: 3 rows compiled for any count (a size of 1 would be specialized).
    x = torch.randn({"two rows": 2, "dynamic rows": 3}.get(case, 1), 32)
    if case == "plain tensor weight":
        weight = module.up.weight.detach().clone()
        module.forward = lambda x: torch.nn.functional.linear(x, weight)
    if case == "dynamic rows":
        torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    assert graphs[0][2] == fusions()
    assert graphs[0][1]["paiton.packed_linear.default"] == 0
    torch.testing.assert_close(actual, expected)


def test_switched_off_by_its_option():
    torch._dynamo.reset()
    module = TwoLinears(16, 32, torch.float32)
    with torch.no_grad(), capture_paiton_graphs() as graphs:
        torch.compile(module, backend="paiton", options={**EAGER_INNER, "paiton.one_row_linear": False})(torch.randn(1, 16))
    assert graphs[0][1]["paiton.packed_linear.default"] == 0

"""The few-rows linear pass: a decode step's linear at batch 2-64 (x [..., 1, K], a static row
count of 2-64 or a symbolic one) becomes paiton.packed_linear(x, [W]), whose 2-64-row path is
Paiton's few-rows GEMM (fusion/few_rows_gemm.py), through backend="paiton" (eager inner
compiler). Near misses are left alone: prefill's [1, T, K] (static or dynamic T), more than 64
static rows, 2-D inputs, a bias, a weight that is not a parameter, and one row (the one-row
pass's).

Tolerance: the kernel (interpreted: fp32 products) accumulates in another order than the CPU
GEMM: fp32 within 1e-5, bf16 within one bf16 rounding of the output (plus a floor near zero).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import LINEAR_TOLERANCE as TOLERANCE
from paiton_testing import EAGER_INNER, TwoLinears, capture_paiton_graphs, compile_and_capture, fusions


@given(hidden=st.sampled_from([16, 40, 64]), inner=st.sampled_from([8, 24, 96]),
       leading=st.sampled_from([(2, 1), (5, 1), (64, 1), (2, 3, 1)]), dynamic=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_decode_linears_of_a_few_rows_go_through_packed_linear(hidden, inner, leading, dynamic, dtype):
    torch._dynamo.reset()
    module = TwoLinears(hidden, inner, dtype)
    x = torch.randn(*leading, hidden, dtype=dtype)
    if dynamic:  # a graph for every batch size, as the serving engine compiles its decode step
        torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    assert graphs[0][2] == fusions(few_rows_linear=2)
    assert graphs[0][1]["paiton.packed_linear.default"] == 2 and graphs[0][1]["aten.mm.default"] == 0
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("case", ["prefill", "dynamic prefill", "65 rows", "2-D rows", "bias", "plain tensor weight",
                                  "one row"])
def test_near_misses_are_left_alone(case):
    torch._dynamo.reset()
    module = TwoLinears(32, 48, torch.float32, bias=case == "bias")
    shape = {"prefill": (1, 6, 32), "dynamic prefill": (1, 6, 32), "65 rows": (65, 1, 32), "2-D rows": (4, 32),
             "one row": (1, 1, 32)}.get(case, (3, 1, 32))
    x = torch.randn(*shape)
    if case == "plain tensor weight":
        weight = module.up.weight.detach().clone()
        module.forward = lambda x: torch.nn.functional.linear(x, weight)
    if case == "dynamic prefill":
        torch._dynamo.mark_dynamic(x, 1)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    assert graphs[0][2] == (fusions(one_row_linear=2) if case == "one row" else fusions())
    assert graphs[0][1]["paiton.packed_linear.default"] == (2 if case == "one row" else 0)
    torch.testing.assert_close(actual, expected)


def test_switched_off_by_its_option():
    torch._dynamo.reset()
    module = TwoLinears(16, 32, torch.float32)
    with torch.no_grad(), capture_paiton_graphs() as graphs:
        torch.compile(module, backend="paiton", options={**EAGER_INNER, "paiton.few_rows_linear": False})(torch.randn(4, 1, 16))
    assert graphs[0][1]["paiton.packed_linear.default"] == 0 and graphs[0][2] == fusions()


def test_left_to_inductor_where_the_chips_table_says_so():
    """An MI300X's table leaves few-rows linears to Inductor (not timed there yet): the pass does
    not run for that target, and the report says 0."""
    torch._dynamo.reset()
    module = TwoLinears(16, 32, torch.float32)
    with torch.no_grad(), capture_paiton_graphs() as graphs:
        torch.compile(module, backend="paiton", options={**EAGER_INNER, "paiton.target": "gfx942"})(torch.randn(4, 1, 16))
    assert graphs[0][1]["paiton.packed_linear.default"] == 0
    assert graphs[0][2]["few_rows_linear"] == 0

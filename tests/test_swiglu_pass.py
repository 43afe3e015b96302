"""The SwiGLU pass on small random MLPs, through backend="paiton" (eager inner compiler).
As in test_rms_norm_passes.py, the fused op runs its CPU reference here, which performs
eager's operations: a correct rewrite is bit-identical to eager (tolerance zero). Graphs left
unfused run Inductor's decompositions of gelu/silu/sigmoid, which round differently from
eager's kernels: those compare within fp32 rounding (bf16: one ulp of the output scale)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import UNMERGED, capture_paiton_graphs, fusions

import paiton
from paiton.fusion import swiglu as swiglu_module

FUSED_OP = "paiton.silu_mul.default"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setattr(swiglu_module, "is_interpreted", lambda kernel: False)


class MLP(torch.nn.Module):
    """Qwen3MLP's shape; `variant` writes the elementwise part differently."""

    def __init__(self, hidden, intermediate, dtype, variant="silu_times_up"):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up = torch.nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False, dtype=dtype)
        self.variant = variant

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        v = self.variant
        if v == "silu_times_up":
            h = F.silu(g) * u
        elif v == "up_times_silu":
            h = u * F.silu(g)
        elif v == "gelu":
            h = F.gelu(g) * u
        elif v == "silu_of_product":
            h = F.silu(g * u)
        elif v == "broadcast_up":
            h = F.silu(g) * u[..., :1, :]
        elif v == "multiply_before_cast":
            h = (F.silu(g.float()) * u.float()).to(x.dtype)
        elif v == "sigmoid_form":  # the same function, written another way: left alone
            h = g * torch.sigmoid(g) * u
        else:
            raise ValueError(v)
        return self.down(h)


UNFUSED_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def compile_and_compare(module, x, tolerance=None):
    with torch.no_grad():
        expected = module(x)
        with capture_paiton_graphs() as graphs:
            actual = torch.compile(module, backend="paiton", options=UNMERGED)(x)
    torch.testing.assert_close(actual, expected, **(tolerance or dict(rtol=0, atol=0)))
    (before, after, reported), = graphs
    return after, reported


@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    variant=st.sampled_from(["silu_times_up", "up_times_silu"]),
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    hidden=st.integers(4, 48),
    intermediate=st.integers(4, 96),
    seed=st.integers(0, 2**31 - 1),
)
def test_swiglu_is_fused(dtype, variant, batch, seq, hidden, intermediate, seed):
    torch.manual_seed(seed)
    torch._dynamo.reset()
    module = MLP(hidden, intermediate, dtype, variant)
    after, reported = compile_and_compare(module, torch.randn(batch, seq, hidden).to(dtype))
    assert reported == fusions(swiglu=1)
    assert paiton.fusion_counts(module) == reported
    assert after[FUSED_OP] == 1 and after["aten.exp.default"] == 0


@pytest.mark.parametrize("variant", ["gelu", "silu_of_product", "broadcast_up", "sigmoid_form"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_near_misses_are_left_alone(variant, dtype):
    torch.manual_seed(0)
    module, x = MLP(16, 24, dtype, variant), torch.randn(2, 3, 16).to(dtype)
    after, reported = compile_and_compare(module, x, UNFUSED_TOLERANCE[dtype])
    assert reported == fusions()
    assert after[FUSED_OP] == 0


def test_an_fp32_swiglu_inside_a_bf16_model_is_fused_in_fp32():
    """`(silu(g.float()) * u.float()).to(bf16)` is an fp32 SwiGLU followed by a cast: the fp32
    pattern takes the fp32 part, exactly, and the cast stays."""
    torch.manual_seed(0)
    after, reported = compile_and_compare(MLP(16, 24, torch.bfloat16, "multiply_before_cast"), torch.randn(2, 3, 16).to(torch.bfloat16))
    assert reported == fusions(swiglu=1)


def test_switched_off():
    with torch.no_grad():
        module = MLP(16, 24, torch.float32)
        torch.compile(module, backend="paiton", options={**UNMERGED, "paiton.swiglu": False})(torch.randn(2, 16))
    assert paiton.fusion_counts(module)["swiglu"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_and_up_are_read_from_the_merged_projection(dtype):
    """With the merged-projections pass on (the default), gate and up are column slices of
    one product: silu_mul takes the slices as they are, nothing copies them apart. (The merged
    GEMM rounds like another blocking of the same product: compared within bf16/fp32 rounding.)"""
    torch.manual_seed(0)
    module, x = MLP(16, 24, dtype), torch.randn(2, 3, 16).to(dtype)
    with torch.no_grad():
        expected = module(x)
        with capture_paiton_graphs() as graphs:
            actual = torch.compile(module, backend="paiton", options={"paiton.inner_compiler": "eager"})(x)
    (_, after, reported), = graphs
    assert reported == fusions(merged_projections=1, swiglu=1)
    assert after["paiton.packed_linear.default"] == 1 and after[FUSED_OP] == 1
    assert not [op for op in after if "clone" in op or "copy" in op or op == "aten.cat.default"], after
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-2)
    torch.testing.assert_close(actual, expected, **tolerance)

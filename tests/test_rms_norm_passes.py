"""The RMSNorm and fused add + RMSNorm passes, property-tested on small random modules.

Each module is compiled through the real backend (`backend="paiton"`, eager inner compiler:
the rewritten ATen graph runs as it is). The fused ops run their CPU reference here, which
performs eager's exact operations, so a correct rewrite is bit-identical to eager: the stated
tolerance is zero. (The kernels' own numerics are tested in test_rms_norm_kernel.py and end to
end in test_qwen3_e2e.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import UNMERGED, capture_paiton_graphs, fusions

import paiton
from paiton.fusion import rms_norm as rms_norm_module
from paiton.passes.rms_norm import SQUARE_FORMS, WEIGHT_SIDES

FUSED_OP = "paiton.rms_norm.default"
FUSED_ADD_OP = "paiton.fused_add_rms_norm.default"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """Run the fused ops' CPU reference instead of the interpreted kernel (see module doc)."""
    monkeypatch.setattr(rms_norm_module, "is_interpreted", lambda kernel: False)


class RMSNorm(torch.nn.Module):
    """RMSNorm the ways models write it: transformers (`weight * y`, `pow(2)`) or gpt-fast
    (`y * weight`, `h * h`)."""

    def __init__(self, dim, eps, square="pow", weight_side="left", dtype=torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(dim, dtype=torch.float32).to(dtype))
        self.eps, self.square, self.weight_side = eps, square, weight_side

    def forward(self, x):
        h = x.to(torch.float32)
        squared = h.pow(2) if self.square == "pow" else h * h
        y = (h * torch.rsqrt(squared.mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight * y if self.weight_side == "left" else y * self.weight


@dataclass(frozen=True)
class NormSpec:
    kind: str  # "plain": norm of h; "per_head": norm over head_dim of [B, S, H, D]; "after_add": residual += h, norm(residual)
    square: str
    weight_side: str
    eps: float


class NormChain(torch.nn.Module):
    """A residual stream with RMSNorms placed as in a decoder layer, and a linear map after
    each norm (so each norm's input is a fresh matmul output, as in a model)."""

    def __init__(self, specs, heads, head_dim, dtype):
        super().__init__()
        self.specs, self.heads, self.head_dim = specs, heads, head_dim
        dim = heads * head_dim
        self.norms = torch.nn.ModuleList(
            RMSNorm(head_dim if s.kind == "per_head" else dim, s.eps, s.square, s.weight_side, dtype) for s in specs
        )
        self.mixes = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False, dtype=dtype) for _ in specs)

    def forward(self, x):
        b, s, dim = x.shape
        h, residual = x, x
        for spec, norm, mix in zip(self.specs, self.norms, self.mixes):
            if spec.kind == "after_add":
                residual = residual + h
                h = norm(residual)
            elif spec.kind == "per_head":
                h = norm(h.view(b, s, self.heads, self.head_dim)).view(b, s, dim)
            else:
                h = norm(h)
            h = mix(h)
        return h, residual


norm_specs = st.builds(
    NormSpec,
    kind=st.sampled_from(["plain", "per_head", "after_add"]),
    square=st.sampled_from(SQUARE_FORMS),
    weight_side=st.sampled_from(WEIGHT_SIDES),
    eps=st.floats(1e-8, 1e-1),
)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def compile_and_compare(module, x, options=UNMERGED):
    """Compile with paiton, check bit-identical outputs, return (ops before, ops after, reported
    counts, fusion_counts(module)). The chains' linears stay torch's (UNMERGED): a one-row
    linear through the GEMV rounds differently."""
    with torch.no_grad():
        expected = module(x)
        with capture_paiton_graphs() as graphs:
            actual = torch.compile(module, backend="paiton", options=options)(x)
    for a, e in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)  # exact, dtype and shape too
    assert len(graphs) == 1, "expected one graph, no graph breaks"
    before, after, reported = graphs[0]
    return before, after, reported, paiton.fusion_counts(module)


@given(
    specs=st.lists(norm_specs, min_size=1, max_size=4),
    dtype=dtypes,
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 24, 64, 100]),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_rms_norm_is_fused(specs, dtype, batch, seq, heads, head_dim, seed):
    torch.manual_seed(seed)
    torch._dynamo.reset()
    module = NormChain(specs, heads, head_dim, dtype)
    x = torch.randn(batch, seq, heads * head_dim).to(dtype)
    before, after, reported, counts = compile_and_compare(module, x)

    n_fused_add = sum(s.kind == "after_add" for s in specs)
    n_plain = len(specs) - n_fused_add
    assert reported == fusions(fused_add_rms_norm=n_fused_add, rms_norm=n_plain)
    assert counts == reported
    assert after[FUSED_ADD_OP] == n_fused_add and after[FUSED_OP] == n_plain
    assert before["aten.rsqrt.default"] == len(specs) and after["aten.rsqrt.default"] == 0
    assert after["aten.mean.dim"] == 0


def test_each_norm_keeps_its_own_eps():
    """Two norms with different eps in one graph: each fused op gets its own (a swapped or
    shared eps changes the output and fails the exact comparison)."""
    specs = [NormSpec("plain", "pow", "left", 1e-6), NormSpec("plain", "pow", "left", 0.5)]
    module = NormChain(specs, heads=2, head_dim=8, dtype=torch.float32)
    x = torch.randn(2, 3, 16) * 0.05  # rms well below 0.5: eps matters
    *_, counts = compile_and_compare(module, x)
    assert counts["rms_norm"] == 2


def test_passes_switch_off_one_by_one():
    specs = [NormSpec("plain", "pow", "left", 1e-6), NormSpec("after_add", "pow", "left", 1e-6)]
    x = torch.randn(2, 3, 16)
    module = NormChain(specs, heads=2, head_dim=8, dtype=torch.float32)

    _, after, reported, _ = compile_and_compare(module, x, {**UNMERGED, "paiton.fused_add_rms_norm": False})
    # Without the fused-add pass, the plain pass still takes the norm after the add.
    assert reported["fused_add_rms_norm"] == 0 and reported["rms_norm"] == 2
    assert after[FUSED_ADD_OP] == 0 and after[FUSED_OP] == 2

    torch._dynamo.reset()
    _, after, reported, _ = compile_and_compare(module, x, {**UNMERGED, "paiton.rms_norm": False})
    assert reported["rms_norm"] == 0 and reported["fused_add_rms_norm"] == 1
    assert after[FUSED_OP] == 0 and after["aten.rsqrt.default"] == 1

    torch._dynamo.reset()
    _, after, reported, _ = compile_and_compare(
        module, x, {**UNMERGED, "paiton.rms_norm": False, "paiton.fused_add_rms_norm": False}
    )
    assert reported["rms_norm"] == reported["fused_add_rms_norm"] == 0 and after["aten.rsqrt.default"] == 2


# ---------------------------------------------------------------------------------------------
# Near misses: graphs that look like RMSNorm but compute something else must be left alone.
# ---------------------------------------------------------------------------------------------


class NearMiss(torch.nn.Module):
    def __init__(self, variant, dim, dtype):
        super().__init__()
        self.variant = variant
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(dim).to(dtype))
        self.weight_2d = torch.nn.Parameter(1 + 0.1 * torch.randn(1, dim).to(dtype))
        self.register_buffer("eps_tensor", torch.tensor(1e-6))
        self.bias = torch.nn.Parameter(torch.randn(1, 1, dim).to(dtype))

    def forward(self, x):
        v, eps, dtype = self.variant, 1e-6, x.dtype
        if v == "broadcast_add":
            x = x + self.bias  # the add broadcasts: not a residual add
        elif v == "add_alpha":
            x = torch.add(x, self.bias.expand_as(x), alpha=2)  # x + 2 * r is not x + r
        h = x.to(torch.float32)
        if v == "mean_other_dim":
            var = h.pow(2).mean(1, keepdim=True)
        elif v == "cube":
            var = h.pow(3).mean(-1, keepdim=True)
        elif v == "abs_square":
            var = h.abs().pow(2).mean(-1, keepdim=True)
        elif v == "no_keepdim":
            var = h.pow(2).mean(-1).unsqueeze(-1)
        else:
            var = h.pow(2).mean(-1, keepdim=True)
        if v == "no_rsqrt":
            y = h / torch.sqrt(var + eps)
        elif v == "eps_after_rsqrt":
            y = h * (torch.rsqrt(var) + eps)
        elif v == "tensor_eps":
            y = h * torch.rsqrt(var + self.eps_tensor)
        elif v == "eps_alpha":
            y = h * torch.rsqrt(torch.add(var, eps, alpha=1000.0))
        else:
            y = h * torch.rsqrt(var + eps)
        if v == "weight_before_cast":
            return (self.weight * y).to(dtype)
        if v == "weight_2d":
            return self.weight_2d * y.to(dtype)
        return self.weight * y.to(dtype)


NEAR_MISSES = {
    # variant: fusions that may fire (the rest must not)
    "mean_other_dim": {},
    "cube": {},
    "abs_square": {},
    "no_keepdim": {},
    "no_rsqrt": {},
    "eps_after_rsqrt": {},
    "tensor_eps": {},
    "weight_before_cast": {},
    "weight_2d": {},
    "eps_alpha": {},
    # The add is not fused, but the norm after it is a plain RMSNorm.
    "broadcast_add": {"rms_norm": 1},
    "add_alpha": {"rms_norm": 1},
}


@pytest.mark.parametrize("variant", sorted(NEAR_MISSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_near_misses_are_left_alone(variant, dtype):
    if variant == "weight_before_cast" and dtype == torch.float32:
        pytest.skip("without casts, weight before or after the cast is the same graph (and fusing it is right)")
    torch.manual_seed(0)
    module = NearMiss(variant, 24, dtype)
    x = torch.randn(2, 3, 24).to(dtype)
    _, after, reported, _ = compile_and_compare(module, x)
    expected = fusions(**NEAR_MISSES[variant])
    assert reported == expected
    assert after[FUSED_OP] == expected["rms_norm"] and after[FUSED_ADD_OP] == 0


def test_float64_is_left_alone():
    """Paiton fuses bf16/fp16/fp32; an fp64 RMSNorm (no casts, like the fp32 pattern) must not
    be computed in fp32."""
    module = NormChain([NormSpec("plain", "pow", "left", 1e-6)], heads=1, head_dim=16, dtype=torch.float64)
    _, _, reported, _ = compile_and_compare(module, torch.randn(2, 3, 16, dtype=torch.float64))
    assert reported == fusions()


@pytest.mark.slow
def test_passes_fire_under_inductor():
    """The same rewrite at Inductor's post-grad hook; output within fp32 rounding of eager
    (Inductor fuses the surrounding ops its own way)."""
    specs = [NormSpec("plain", "mul", "right", 1e-5), NormSpec("per_head", "pow", "left", 1e-6), NormSpec("after_add", "pow", "left", 1e-6)]
    torch.manual_seed(0)
    module = NormChain(specs, heads=2, head_dim=24, dtype=torch.float32)
    x = torch.randn(2, 3, 48)
    # No FX graph cache: a hit (from an earlier run) would skip the passes this test watches.
    with torch.no_grad(), capture_paiton_graphs() as graphs, torch._inductor.config.patch(fx_graph_cache=False):
        expected = module(x)
        actual = torch.compile(module, backend="paiton")(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    (_, after, reported), = graphs
    assert reported == fusions(fused_add_rms_norm=1, rms_norm=2)
    assert paiton.fusion_counts(module) == reported

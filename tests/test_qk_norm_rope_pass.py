"""The QK-norm + RoPE pass on small attention front-ends written as Qwen3Attention writes them
(projections, per-head q/k RMSNorm, transpose, apply_rotary_pos_emb), through
backend="paiton" (eager inner compiler). The fused ops run their CPU references (eager's exact
operations) here, so a correct rewrite is bit-identical to eager: tolerance zero."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import UNMERGED, capture_paiton_graphs, fusions, transformers_rms_norm

import paiton
from paiton.fusion import qk_norm_rope as qk_module
from paiton.fusion import rms_norm as rms_norm_module
from paiton.fusion.qk_norm_rope import rotate_half

FUSED_OP = "paiton.qk_norm_rope.default"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    for module in (qk_module, rms_norm_module):
        monkeypatch.setattr(module, "is_interpreted", lambda kernel: False)


def rotate_pairs(x):  # interleaved RoPE (GPT-J style): rotates (x0, x1), (x2, x3), ...
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class AttentionFront(torch.nn.Module):
    def __init__(self, hidden, q_heads, kv_heads, head_dim, dtype, eps=1e-6, variant="qwen3"):
        super().__init__()
        self.q_proj = torch.nn.Linear(hidden, q_heads * head_dim, bias=False, dtype=dtype)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False, dtype=dtype)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False, dtype=dtype)
        self.q_norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(head_dim).to(dtype))
        self.k_norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(head_dim).to(dtype))
        self.head_dim, self.eps, self.variant = head_dim, eps, variant

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        shape = (b, s, -1, self.head_dim)
        v = self.variant
        k_eps = self.eps * 10 if v == "different_eps" else self.eps
        q = transformers_rms_norm(self.q_proj(x).view(shape), self.q_norm_weight, self.eps).transpose(1, 2)
        k = transformers_rms_norm(self.k_proj(x).view(shape), self.k_norm_weight, k_eps).transpose(1, 2)
        value = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if v == "interleaved":
            return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin, value
        if v == "different_cos_sin":
            return q * cos + rotate_half(q) * sin, k * sin + rotate_half(k) * cos, value
        if v == "partial_rotary":
            half = self.head_dim // 2
            rot = lambda t: torch.cat([t[..., :half] * cos[..., :half] + rotate_half(t[..., :half]) * sin[..., :half], t[..., half:]], -1)  # noqa: E731
            return rot(q), rot(k), value
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, value


def compile_and_compare(module, *inputs):
    with torch.no_grad():
        expected = module(*inputs)
        with capture_paiton_graphs() as graphs:
            actual = torch.compile(module, backend="paiton", options=UNMERGED)(*inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert all(sa == se for sa, se, n in zip(a.stride(), e.stride(), a.shape) if n > 1), (a.stride(), e.stride())
    (_, after, reported), = graphs
    return after, reported


def rotary_inputs(batch, seq, head_dim, dtype, batch_one=False):
    angles = torch.randn(1 if batch_one else batch, seq, head_dim) * 3
    return angles.cos().to(dtype), angles.sin().to(dtype)


@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    kv_heads=st.integers(1, 3),
    gqa=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([8, 24, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    eps=st.floats(1e-7, 1e-3),
    cos_batch_one=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_qk_norm_rope_is_fused(batch, seq, kv_heads, gqa, head_dim, dtype, eps, cos_batch_one, seed):
    torch.manual_seed(seed)
    torch._dynamo.reset()
    module = AttentionFront(32, kv_heads * gqa, kv_heads, head_dim, dtype, eps)
    x = torch.randn(batch, seq, 32).to(dtype)
    after, reported = compile_and_compare(module, x, *rotary_inputs(batch, seq, head_dim, dtype, cos_batch_one))
    # The RMSNorm pass rewrites the two norms first; this pass then takes both with the rotary.
    assert reported == fusions(rms_norm=2, qk_norm_rope=1)
    assert paiton.fusion_counts(module) == reported
    assert after[FUSED_OP] == 1 and after["paiton.rms_norm.default"] == 0 and after["aten.cat.default"] == 0


@pytest.mark.parametrize("variant", ["interleaved", "different_cos_sin", "partial_rotary", "different_eps"])
def test_near_misses_are_left_alone(variant):
    torch.manual_seed(0)
    module = AttentionFront(32, 4, 2, 16, torch.bfloat16, variant=variant)
    after, reported = compile_and_compare(module, torch.randn(2, 3, 32).to(torch.bfloat16), *rotary_inputs(2, 3, 16, torch.bfloat16))
    assert reported == fusions(rms_norm=2)
    assert after[FUSED_OP] == 0


def test_two_head_dims_in_one_graph():
    """Patterns are traced per head_dim: a graph with two attention blocks of different head
    sizes fuses both."""

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = AttentionFront(32, 4, 2, 16, torch.float32)
            self.b = AttentionFront(32, 2, 1, 24, torch.float32)

        def forward(self, x, cos16, sin16, cos24, sin24):
            return self.a(x, cos16, sin16) + self.b(x, cos24, sin24)

    torch.manual_seed(0)
    _, reported = compile_and_compare(Two(), torch.randn(1, 3, 32), *rotary_inputs(1, 3, 16, torch.float32), *rotary_inputs(1, 3, 24, torch.float32))
    assert reported == fusions(rms_norm=4, qk_norm_rope=2)


def test_switched_off():
    module = AttentionFront(32, 4, 2, 16, torch.float32)
    with torch.no_grad():
        torch.compile(module, backend="paiton", options={**UNMERGED, "paiton.qk_norm_rope": False})(
            torch.randn(1, 3, 32), *rotary_inputs(1, 3, 16, torch.float32)
        )
    assert paiton.fusion_counts(module) == fusions(rms_norm=2)

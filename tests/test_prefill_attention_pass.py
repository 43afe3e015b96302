"""The prefill-attention pass on packed prompts' attention as the engine's prefill writes it
(rows and positions per token; the mask "same row and key position <= query position" built
in the graph; repeat_kv; SDPA), through backend="paiton" (eager inner compiler), with the fused
op running its CPU reference (float64 math). Tolerance: the reference and eager SDPA differ by
float rounding only (fp32: 1e-5; bf16: one bf16 ulp of the output scale, 2e-2). Near misses (a
strict or reversed comparison, no same-row term, keys from a cache) are left to SDPA. Also:
CUDA's SDPA lowerings, matched structurally on fake tensors (no GPU needed). The engine's own
prefill graph is checked in test_engine.py."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER, capture_paiton_graphs, fusions, repeat_kv

from paiton.fusion import prefill_attention as attention_module
from paiton.passes.prefill_attention import PrefillAttentionPass

FUSED_OP = "paiton.prefill_attention.default"
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setattr(attention_module, "is_interpreted", lambda kernel: False)


class PackedAttention(torch.nn.Module):
    """Attention over packed prompts as models/engine.py's PrefillForward masks it, or a near miss."""

    def __init__(self, group, mask="engine", additive=False):
        super().__init__()
        self.group, self.mask, self.additive = group, mask, additive

    def forward(self, q, k, v, rows, positions):
        same_row = rows[:, None, :, None] == rows[:, None, None, :]
        key_pos, query_pos = positions[:, None, None, :], positions[:, None, :, None]
        allowed = {
            "engine": lambda: same_row & (key_pos <= query_pos),
            "swapped": lambda: (query_pos >= key_pos) & same_row,  # the same mask, spelled the other way
            "strict": lambda: same_row & (key_pos < query_pos),
            "reversed": lambda: same_row & (query_pos <= key_pos),
            "causal_only": lambda: (key_pos <= query_pos).expand(-1, -1, q.shape[2], -1),
        }[self.mask]()
        if self.additive:
            allowed = torch.where(allowed, torch.tensor(0.0, dtype=q.dtype), torch.tensor(float("-inf"), dtype=q.dtype))
        return F.scaled_dot_product_attention(q, repeat_kv(k, self.group), repeat_kv(v, self.group), attn_mask=allowed,
                                              scale=q.shape[-1] ** -0.5)


def packed_inputs(lengths, pad, kv_heads, group, head_dim, dtype, seed):
    rows, positions = [], []
    for slot, n in enumerate(lengths):
        rows += [slot] * n
        positions += range(n)
    rows += [len(lengths)] * pad
    positions += range(pad)
    generator = torch.Generator().manual_seed(seed)
    seq_len = len(rows)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
    q = randn(1, seq_len, kv_heads * group, head_dim).transpose(1, 2)  # as the model's projections hand them over
    k, v = randn(1, seq_len, kv_heads, head_dim).transpose(1, 2), randn(1, seq_len, kv_heads, head_dim).transpose(1, 2)
    return q, k, v, torch.tensor([rows]), torch.tensor([positions])


def run(module, inputs, dynamic=False):
    with torch.no_grad():
        expected = module(*inputs)
        with capture_paiton_graphs() as graphs:
            actual = torch.compile(module, backend="paiton", options=EAGER_INNER, dynamic=dynamic)(*inputs)
    (_, after, reported), = graphs
    return expected, actual, after, reported


@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    pad=st.integers(0, 9),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([16, 24, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    mask=st.sampled_from(["engine", "swapped"]),
    additive=st.booleans(),
    dynamic=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_prompts_attention_is_fused(lengths, pad, kv_heads, group, head_dim, dtype, mask, additive, dynamic, seed):
    torch._dynamo.reset()
    inputs = packed_inputs(lengths, pad, kv_heads, group, head_dim, dtype, seed)
    expected, actual, after, reported = run(PackedAttention(group, mask, additive), inputs, dynamic=dynamic)
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    assert reported == fusions(prefill_attention=1)
    # No repeated KV heads, no mask, no SDPA left (a clone of the output for the CPU lowering's
    # layout is the one clone allowed).
    assert after[FUSED_OP] == 1 and after["aten.clone.default"] <= 1
    assert not [op for op in after if "scaled_dot_product" in op or op in ("aten.eq.Tensor", "aten.where.self")]


@pytest.mark.parametrize("mask", ["strict", "reversed", "causal_only"])
def test_other_masks_are_left_alone(mask):
    torch._dynamo.reset()
    inputs = packed_inputs([5, 9], 2, 2, 2, 16, torch.float32, 0)
    expected, actual, after, reported = run(PackedAttention(2, mask), inputs)
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCE[torch.float32])
    assert reported == fusions() and after[FUSED_OP] == 0


def test_keys_of_another_length_are_left_alone():
    """Queries over a longer key set (a cache): not attention within the new tokens."""
    class OverCache(torch.nn.Module):
        def forward(self, q, k, v, rows, positions):
            k, v = torch.cat([k, k], dim=2), torch.cat([v, v], dim=2)
            keys = torch.cat([rows, rows], dim=1)
            same_row = rows[:, None, :, None] == keys[:, None, None, :]
            key_pos = torch.cat([positions, positions], dim=1)[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=same_row & (key_pos <= positions[:, None, :, None]))

    torch._dynamo.reset()
    inputs = packed_inputs([5, 9], 2, 2, 1, 16, torch.float32, 0)
    expected, actual, after, reported = run(OverCache(), inputs)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    assert reported == fusions() and after[FUSED_OP] == 0


def gpu_style_prefill_graph(sdpa_op, masked_value=float("-inf"), group=4, seq_len=64):
    """The ATen graph of the engine's prefill attention as it reaches the pass on a GPU: the mask
    made additive (`where(mask, full(0), full(-inf))`), expanded to the heads, for cuDNN's or
    efficient attention; traced on fake (CPU) tensors."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(q, k, v, rows, positions):
        allowed = (rows[:, None, :, None] == rows[:, None, None, :]) & (positions[:, None, None, :] <= positions[:, None, :, None])
        bias = torch.where(allowed, torch.full((), 0.0, dtype=q.dtype), torch.full((), masked_value, dtype=q.dtype))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], q.shape[2])
        return sdpa_op(q, repeat_kv(k, group), repeat_kv(v, group), bias, False, scale=0.125)[0]

    with FakeTensorMode(allow_non_fake_inputs=True):
        args = (torch.empty(1, 8, seq_len, 64, dtype=torch.bfloat16), torch.empty(1, 2, seq_len, 64, dtype=torch.bfloat16),
                torch.empty(1, 2, seq_len, 64, dtype=torch.bfloat16), torch.empty(1, seq_len, dtype=torch.int64),
                torch.empty(1, seq_len, dtype=torch.int64))
        return make_fx(step, decomposition_table=select_decomp_table())(*args)


@pytest.mark.parametrize("masked_value", [float("-inf"), -65536.0])
@pytest.mark.parametrize("sdpa", ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention"])
def test_cuda_sdpa_lowerings_are_matched(sdpa, masked_value):
    gm = gpu_style_prefill_graph(getattr(torch.ops.aten, sdpa).default, masked_value=masked_value)
    assert PrefillAttentionPass().apply(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert FUSED_OP in targets and not [t for t in targets if "scaled_dot_product" in t or "where" in t]
    fused = next(n for n in gm.graph.nodes if str(n.target) == FUSED_OP)
    # No repeated KV heads; a copy of the output only where the lowering's layout is another
    # (cuDNN's [B, H, T, D]; efficient attention's is the op's).
    clones = [n for n in gm.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert [c.args[0] for c in clones] == ([fused] if "cudnn" in sdpa else [])
    placeholders = gm.graph.find_nodes(op="placeholder")
    assert fused.args[1:5] == tuple(placeholders[1:5]) and fused.args[5] == 0.125
    assert tuple(fused.meta["val"].shape) == (1, 8, 64, 64)


def test_a_mild_additive_mask_is_left_alone():
    """-100 does not remove a key: not the hard mask the kernel applies."""
    gm = gpu_style_prefill_graph(torch.ops.aten._scaled_dot_product_efficient_attention.default, masked_value=-100.0)
    assert PrefillAttentionPass().apply(gm.graph) == 0

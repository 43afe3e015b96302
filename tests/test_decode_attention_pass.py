"""The decode-attention pass on hand-written static-cache attention (cache write, repeat_kv,
a causal mask from the query positions, SDPA; or a boolean mask passed in, as transformers'
generate does), through backend="paiton" (eager inner compiler), with the fused op running
its CPU reference (float64 math). Tolerance: the
reference and eager SDPA differ by float rounding only (fp32: 1e-5; bf16: one bf16 ulp of the
output scale, 2e-2). Also: the SDPA lowerings of CUDA, matched structurally on fake CUDA
tensors (no GPU needed)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER, capture_paiton_graphs, fusions

import paiton
from paiton.fusion import decode_attention as attention_module
from paiton.passes.decode_attention import MAX_DECODE_QUERIES, DecodeAttentionPass

FUSED_OP = "paiton.decode_attention.default"
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setattr(attention_module, "is_interpreted", lambda kernel: False)


def repeat_kv(x, group):  # transformers' repeat_kv
    b, h, n, d = x.shape
    return x if group == 1 else x[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)


class StaticCacheAttention(torch.nn.Module):
    """One attention step over a static KV cache, as transformers' StaticCache + sdpa writes it
    (or a hand-written loop: `write` picks index_copy_, index_put_ or slice assignment)."""

    def __init__(self, batch, kv_heads, cache_len, head_dim, dtype, group, write="index_copy", mask="additive"):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, kv_heads, cache_len, head_dim, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(batch, kv_heads, cache_len, head_dim, dtype=dtype))
        self.group, self.write, self.mask = group, write, mask

    def forward(self, q, k, v, positions, start: int = 0):
        if self.write == "index_copy":
            self.k_cache.index_copy_(2, positions, k)
            self.v_cache.index_copy_(2, positions, v)
        elif self.write == "index_put":  # gpt-fast's KVCache.update
            self.k_cache[:, :, positions] = k
            self.v_cache[:, :, positions] = v
        else:  # slice assignment at a Python int position
            self.k_cache[:, :, start : start + k.shape[2]] = k
            self.v_cache[:, :, start : start + v.shape[2]] = v
        keys, values = repeat_kv(self.k_cache, self.group), repeat_kv(self.v_cache, self.group)
        cache_len, q_len = keys.shape[2], q.shape[2]
        kv_index = torch.arange(cache_len, device=q.device)
        allowed = kv_index[None, None, None, :] <= positions[None, None, :, None]
        scale = q.shape[-1] ** -0.5
        if self.mask == "sliding_window":
            allowed = allowed & (kv_index[None, None, None, :] > positions[None, None, :, None] - 4)
        if self.mask == "is_causal":
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale)
        allowed = allowed.expand(q.shape[0], 1, q_len, cache_len)
        if self.mask == "boolean":
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)
        additive = torch.where(allowed, torch.tensor(0.0, dtype=q.dtype), torch.tensor(float("-inf"), dtype=q.dtype))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=additive, scale=scale)


def run_module_step(module_cls, module_args, q_len, filled, seed, last_input, **module_kwargs):
    """Fill the first `filled` cache positions, then one step of q_len queries through
    `module_cls(q, k, v, positions, last_input)`, eager and compiled on copies; returns
    (expected, actual, ops after the passes, reported counts)."""
    batch, kv_heads, cache_len, head_dim, dtype, group = module_args
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
    eager = module_cls(*module_args, **module_kwargs)
    eager.k_cache[:, :, :filled] = randn(batch, kv_heads, filled, head_dim)
    eager.v_cache[:, :, :filled] = randn(batch, kv_heads, filled, head_dim)
    compiled_module = module_cls(*module_args, **module_kwargs)
    compiled_module.load_state_dict(eager.state_dict())
    q = randn(batch, kv_heads * group, q_len, head_dim)
    k, v = randn(batch, kv_heads, q_len, head_dim), randn(batch, kv_heads, q_len, head_dim)
    positions = torch.arange(filled, filled + q_len)
    with torch.no_grad():
        expected = eager(q, k, v, positions, last_input)
        with capture_paiton_graphs() as graphs:
            actual = torch.compile(compiled_module, backend="paiton", options=EAGER_INNER)(q, k, v, positions, last_input)
    torch.testing.assert_close(compiled_module.k_cache, eager.k_cache, rtol=0, atol=0)  # the cache write stays
    (_, after, reported), = graphs
    return expected, actual, after, reported


def run_step(module_args, q_len, filled, seed, **module_kwargs):
    """One StaticCacheAttention step (its causal mask built in the graph from `filled`)."""
    return run_module_step(StaticCacheAttention, module_args, q_len, filled, seed, filled, **module_kwargs)


@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([16, 64, 128]),
    cache_len=st.integers(16, 200),
    q_len=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    write=st.sampled_from(["index_copy", "index_put", "slice"]),
    mask=st.sampled_from(["additive", "boolean"]),
    data=st.data(),
)
def test_decode_attention_is_fused(batch, kv_heads, group, head_dim, cache_len, q_len, dtype, write, mask, data):
    torch._dynamo.reset()
    filled = data.draw(st.integers(0, cache_len - q_len))
    expected, actual, after, reported = run_step(
        (batch, kv_heads, cache_len, head_dim, dtype, group), q_len, filled, data.draw(st.integers(0, 2**31 - 1)),
        write=write, mask=mask,
    )
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    assert reported == fusions(decode_attention=1)
    # No repeated KV heads (a clone of the few-KB output, for the CPU lowering's layout when
    # there are several queries, is the only clone allowed).
    assert after[FUSED_OP] == 1 and after["aten.clone.default"] <= (1 if q_len > 1 else 0)
    assert not [op for op in after if "scaled_dot_product" in op]


@pytest.mark.parametrize("mask", ["sliding_window", "is_causal"])
def test_other_masks_are_left_alone(mask):
    expected, actual, after, reported = run_step((2, 2, 32, 16, torch.float32, 2), 1, 10, 0, mask=mask)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    assert reported == fusions() and after[FUSED_OP] == 0


def test_prefill_is_left_to_sdpa():
    q_len = MAX_DECODE_QUERIES + 1
    expected, actual, after, reported = run_step((1, 2, 64, 16, torch.float32, 2), q_len, 0, 0)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    assert reported == fusions() and after[FUSED_OP] == 0


# ---------------------------------------------------------------------------------------------
# The mask as a graph input: how transformers' generate calls a compiled forward. It builds the
# 4-D boolean mask [B, 1, Sq, L] (left padding False) before the call; SDPA's CPU lowering turns
# it into where(mask, 0, -inf) inside the graph. A model may convert it itself (where(mask, 0,
# finfo.min)). Any boolean mask is exactly what the op computes; a float mask input is not known
# to hold only 0 and -inf, and a mask per head is not one the op takes.
# ---------------------------------------------------------------------------------------------


class MaskInputAttention(torch.nn.Module):
    """One attention step over a static KV cache with the mask passed in: `convert` None hands
    the boolean mask to SDPA; "min" or "-inf" convert it to an additive mask first; "mild"
    converts it with -100, which does not remove a key."""

    def __init__(self, batch, kv_heads, cache_len, head_dim, dtype, group, convert=None):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, kv_heads, cache_len, head_dim, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(batch, kv_heads, cache_len, head_dim, dtype=dtype))
        self.group, self.convert = group, convert

    def forward(self, q, k, v, cache_position, attention_mask):
        self.k_cache.index_copy_(2, cache_position, k)
        self.v_cache.index_copy_(2, cache_position, v)
        keys, values = repeat_kv(self.k_cache, self.group), repeat_kv(self.v_cache, self.group)
        if self.convert is not None:
            dropped = {"min": torch.finfo(q.dtype).min, "-inf": float("-inf"), "mild": -100.0}[self.convert]
            attention_mask = torch.where(attention_mask, torch.tensor(0.0, dtype=q.dtype), torch.tensor(dropped, dtype=q.dtype))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=attention_mask, scale=q.shape[-1] ** -0.5)


def generate_style_mask(batch, q_len, cache_len, filled, padding, mask_batch, mask_queries):
    """transformers' static-cache decode mask [mask_batch, 1, mask_queries, L]: sequence b sees
    keys padding[b] <= j <= filled + i (query i); with one mask row, all of this step's keys."""
    kv_index = torch.arange(cache_len)
    last = filled + (torch.arange(q_len) if mask_queries == q_len else torch.tensor([q_len - 1]))
    mask = (kv_index[None, None, :] <= last[None, :, None]) & (kv_index[None, None, :] >= padding[:, None, None])
    return mask[:mask_batch, None]


def run_mask_input_step(module_args, q_len, filled, mask, seed, **module_kwargs):
    """As run_step, for MaskInputAttention with `mask` passed in."""
    return run_module_step(MaskInputAttention, module_args, q_len, filled, seed, mask, **module_kwargs)


@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([16, 64]),
    cache_len=st.integers(16, 200),
    q_len=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    convert=st.sampled_from([None, "min", "-inf"]),
    batch_mask=st.booleans(),
    query_mask=st.booleans(),
    data=st.data(),
)
def test_a_boolean_mask_input_is_fused(batch, kv_heads, group, head_dim, cache_len, q_len, dtype, convert, batch_mask,
                                       query_mask, data):
    torch._dynamo.reset()
    filled = data.draw(st.integers(0, cache_len - q_len))
    # Left padding per sequence (a batched generate), when the mask has a batch dim.
    padding = torch.tensor([data.draw(st.integers(0, filled)) if batch_mask else 0 for _ in range(batch)])
    mask = generate_style_mask(batch, q_len, cache_len, filled, padding, batch if batch_mask else 1, q_len if query_mask else 1)
    expected, actual, after, reported = run_mask_input_step(
        (batch, kv_heads, cache_len, head_dim, dtype, group), q_len, filled, mask, data.draw(st.integers(0, 2**31 - 1)),
        convert=convert,
    )
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    assert reported == fusions(decode_attention=1)
    # The mask reaches the op as a view of the input (squeezed to [B, Sq, L]); no repeated KV
    # heads, no additive mask left.
    assert after[FUSED_OP] == 1 and after["aten.squeeze.dim"] == 1 and after["aten.where.self"] == 0
    assert after["aten.clone.default"] <= (1 if q_len > 1 else 0)
    assert not [op for op in after if "scaled_dot_product" in op]


def test_a_random_boolean_mask_input_is_fused():
    """Not causal at all (holes, a query's later keys on, a sequence starting late): the op
    applies the mask as given."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, 2, 70, generator=generator) > 0.5
    mask[..., 0] = True  # eager SDPA gives NaN for a row with no key; the op gives zeros
    mask[1, ..., :64] = False
    mask[1, ..., 64] = True
    expected, actual, after, reported = run_mask_input_step((2, 2, 70, 16, torch.float32, 2), 2, 30, mask, 0)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    assert reported == fusions(decode_attention=1)


def test_float_or_per_head_mask_inputs_are_left_alone():
    args = (2, 2, 32, 16, torch.float32, 2)
    mask = generate_style_mask(2, 1, 32, 10, torch.tensor([0, 3]), 2, 1)
    near_misses = {
        # An additive mask input: its values could be anything, not only 0 and -inf.
        "float input": (torch.zeros(2, 1, 1, 32).masked_fill(~mask, float("-inf")), {}),
        # One mask per query head: the op takes one per sequence (and query).
        "per head": (mask.expand(2, 4, 1, 32).contiguous(), {}),
        # where(mask, 0, -100) keeps a trace of the "removed" keys: not a boolean mask.
        "mild": (mask, {"convert": "mild"}),
    }
    for name, (attention_mask, kwargs) in near_misses.items():
        torch._dynamo.reset()
        expected, actual, after, reported = run_mask_input_step(args, 1, 10, attention_mask, 0, **kwargs)
        torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32], msg=name)
        assert reported == fusions() and after[FUSED_OP] == 0, name


# ---------------------------------------------------------------------------------------------
# CUDA's SDPA lowerings, structurally: the ATen graph as it reaches the pass on a GPU (see
# bench/results/aten-graphs-h100-*: cudnn or efficient attention, an additive mask built with
# `where(mask, full(0), full(-inf))`), traced on fake tensors, matched without running. (The
# fake tensors are CPU ones: a CPU build of torch cannot make fake CUDA constants; the pass
# does not look at devices.)
# ---------------------------------------------------------------------------------------------


def gpu_style_decode_graph(sdpa_op, group=4, masked_value=float("-inf"), cache_len=128, pad_bias=False, mask_input=False):
    """`mask_input`: the boolean mask [B, 1, 1, L] is an input (generate), not built from positions."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(q, k_cache, v_cache, offset, mask):
        cache_len = k_cache.shape[2]
        positions = torch.arange(1) + offset
        keys, values = repeat_kv(k_cache, group), repeat_kv(v_cache, group)
        allowed = torch.arange(cache_len)[None, None, None, :] <= positions[None, None, :, None]
        if mask_input:
            allowed = mask
        bias = torch.where(allowed.expand(q.shape[0], 1, 1, cache_len), torch.full((), 0.0, dtype=q.dtype),
                           torch.full((), masked_value, dtype=q.dtype))
        if pad_bias:  # what SDPA's preprocess_mask does before efficient attention when L % 16 != 0
            bias = torch.nn.functional.pad(bias, (0, 16 - cache_len % 16))[..., :cache_len]
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], cache_len)
        return sdpa_op(q, keys, values, bias, False, scale=0.125)[0]

    with FakeTensorMode(allow_non_fake_inputs=True):
        args = (torch.empty(2, 8, 1, 64, dtype=torch.bfloat16), torch.empty(2, 2, cache_len, 64, dtype=torch.bfloat16),
                torch.empty(2, 2, cache_len, 64, dtype=torch.bfloat16), torch.empty((), dtype=torch.int64),
                torch.empty(2, 1, 1, cache_len, dtype=torch.bool))
        return make_fx(step, decomposition_table=select_decomp_table())(*args)


# -65536: the H100 graph's bf16 mask value (float16's minimum, rounded to bf16).
@pytest.mark.parametrize("masked_value", [float("-inf"), -65536.0])
@pytest.mark.parametrize("sdpa", ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention"])
def test_cuda_sdpa_lowerings_are_matched(sdpa, masked_value):
    gm = gpu_style_decode_graph(getattr(torch.ops.aten, sdpa).default, masked_value=masked_value)
    assert DecodeAttentionPass().apply(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert FUSED_OP in targets and not [t for t in targets if "scaled_dot_product" in t or "clone" in t or "where" in t]
    fused = next(n for n in gm.graph.nodes if str(n.target) == FUSED_OP)
    assert fused.args[5] == 0.125 and tuple(fused.meta["val"].shape) == (2, 8, 1, 64)


def test_efficient_attention_with_a_padded_bias_is_matched():
    """fp32 on CUDA lowers to efficient attention, whose bias rows must be 16-aligned: with a
    cache of 41 the graph pads the bias and slices it back (seen on the H100 with tiny Qwen3)."""
    gm = gpu_style_decode_graph(torch.ops.aten._scaled_dot_product_efficient_attention.default, cache_len=41,
                                pad_bias=True)
    assert "constant_pad_nd" in str(gm.graph)
    assert DecodeAttentionPass().apply(gm.graph) == 1


@pytest.mark.parametrize("pad_bias", [False, True])
@pytest.mark.parametrize("sdpa", ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention"])
def test_cuda_lowerings_with_a_mask_input_are_matched(sdpa, pad_bias):
    """generate on a GPU: the boolean mask input, made additive, expanded (and padded) for the
    CUDA kernels; the op gets the input itself, squeezed, and no positions."""
    gm = gpu_style_decode_graph(getattr(torch.ops.aten, sdpa).default, cache_len=41, pad_bias=pad_bias, mask_input=True)
    assert DecodeAttentionPass().apply(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    fused = next(n for n in gm.graph.nodes if str(n.target) == FUSED_OP)
    positions, kv_mask = fused.args[3:5]
    assert positions is None and kv_mask.target is torch.ops.aten.squeeze.dim and kv_mask.args == (gm.graph.find_nodes(op="placeholder")[4], 1)
    assert tuple(kv_mask.meta["val"].shape) == (2, 1, 41)
    assert not [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target) or n.target is torch.ops.aten.where.self]


def test_a_padded_bias_sliced_elsewhere_is_left_alone():
    """A slice that keeps other columns than the first L is not the same mask."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(q, k_cache, v_cache, offset):
        allowed = torch.arange(40)[None, None, None, :] <= (torch.arange(1) + offset)[None, None, :, None]
        bias = torch.where(allowed, torch.full((), 0.0), torch.full((), float("-inf")))
        bias = torch.nn.functional.pad(bias, (0, 8))[..., 1:41]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k_cache, v_cache, bias, False, scale=0.125)[0]

    with FakeTensorMode(allow_non_fake_inputs=True):
        gm = make_fx(step)(torch.empty(1, 2, 1, 16), torch.empty(1, 2, 40, 16), torch.empty(1, 2, 40, 16),
                           torch.empty((), dtype=torch.int64))
    assert DecodeAttentionPass().apply(gm.graph) == 0


def test_a_mild_additive_mask_is_left_alone():
    """-100 does not remove a key (exp(-100) is not 0 in fp32 relative to a score): not a mask
    the kernel's hard masking reproduces."""
    gm = gpu_style_decode_graph(torch.ops.aten._scaled_dot_product_cudnn_attention.default, masked_value=-100.0)
    assert DecodeAttentionPass().apply(gm.graph) == 0


def test_switched_off():
    module = StaticCacheAttention(1, 2, 16, 16, torch.float32, 2)
    with torch.no_grad():
        torch.compile(module, backend="paiton", options={**EAGER_INNER, "paiton.decode_attention": False})(
            torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.tensor([3])
        )
    assert paiton.fusion_counts(module)["decode_attention"] == 0

"""The KV-cache-write pass: QK-norm + RoPE and the static-cache write after it become one
kernel call that writes k and v into their cache slots, through backend="paiton".

The module is an attention layer over a static cache written the ways loops write it:
transformers' StaticCache (`index_copy_`) and a hand-written loop (`cache[:, :, pos] = k`,
an `index_put_`). Outputs and the caches after the step are compared with eager. The fused
ops run their CPU references (eager's operations) except attention in decode steps, whose
reference computes in float64: fp32 within 1e-5, bf16 within 2e-2 (one or two bf16 ulps of
the attention output).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER, CachedAttention, attention_inputs, capture_paiton_graphs, fusions

from paiton.fusion import qk_norm_rope as qk_module
from paiton.fusion import rms_norm as rms_norm_module

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    for module in (qk_module, rms_norm_module):
        monkeypatch.setattr(module, "is_interpreted", lambda kernel: False)


def run_step(module, args, options=EAGER_INNER):
    """(compiled output, eager output, caches after each, graph records)."""
    import copy

    reference = copy.deepcopy(module)
    with torch.no_grad():
        expected = reference(*args)
        with capture_paiton_graphs() as graphs:
            actual = torch.compile(module, backend="paiton", options=options)(*args)
    return actual, expected, (module.k_cache, module.v_cache), (reference.k_cache, reference.v_cache), graphs


@settings(deadline=None, max_examples=10)
@given(
    batch=st.integers(1, 2),
    seq=st.sampled_from([1, 2, 12]),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([16, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    write=st.sampled_from(["index_copy", "index_put"]),
    data=st.data(),
)
def test_cache_write_is_fused(batch, seq, kv_heads, group, head_dim, dtype, write, data):
    torch._dynamo.reset()
    cache_len = seq + data.draw(st.integers(0, 20))
    start = data.draw(st.integers(0, cache_len - seq))
    module = CachedAttention(batch, kv_heads * group, kv_heads, head_dim, cache_len, dtype, write)
    args = attention_inputs(batch, seq, kv_heads * group, kv_heads, head_dim, start, dtype)
    actual, expected, caches, expected_caches, graphs = run_step(module, args)
    decode = seq <= 8
    assert graphs[0][2] == fusions(rms_norm=2, qk_norm_rope=1, kv_cache_write=1, decode_attention=int(decode))
    after = graphs[0][1]
    assert after["aten.index_put.default"] == 0 and after["paiton.qk_norm_rope.default"] == 0
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    for cache, expected_cache in zip(caches, expected_caches):  # the same roundings: exact
        torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)


@settings(deadline=None, max_examples=8)
@given(
    batch=st.integers(1, 3),
    seq=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_per_sequence_write_is_fused(batch, seq, group, dtype, data):
    """A continuous batch's write (engine.SlotCache): each row at its own positions [B, S],
    `cache[arange(B)[:, None], :, positions] = k.transpose(1, 2)`; the cache-write kernel takes
    the [B, S] slots, decode attention each row's own positions."""
    torch._dynamo.reset()
    cache_len = seq + data.draw(st.integers(0, 12))
    starts = [data.draw(st.integers(0, cache_len - seq)) for _ in range(batch)]
    module = CachedAttention(batch, 2 * group, 2, 16, cache_len, dtype, "per_sequence")
    args = attention_inputs(batch, seq, 2 * group, 2, 16, starts, dtype)
    actual, expected, caches, expected_caches, graphs = run_step(module, args)
    assert graphs[0][2] == fusions(rms_norm=2, qk_norm_rope=1, kv_cache_write=1, decode_attention=1)
    assert graphs[0][1]["aten.index_put.default"] == 0
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    for cache, expected_cache in zip(caches, expected_caches):
        torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)


@pytest.mark.parametrize("write", ["v_elsewhere", "accumulate", "read_before_write", "other_rows"])
def test_other_writes_are_left_alone(write):
    torch._dynamo.reset()
    batch, start = (2, [3, 5]) if write == "other_rows" else (1, 3)
    module = CachedAttention(batch, 4, 2, 16, 10, torch.float32, write)
    actual, expected, caches, expected_caches, graphs = run_step(module, attention_inputs(batch, 1, 4, 2, 16, start, torch.float32))
    assert graphs[0][2]["kv_cache_write"] == 0 and graphs[0][2]["qk_norm_rope"] == 1
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    for cache, expected_cache in zip(caches, expected_caches):
        torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)


def test_through_inductor_the_cache_is_written_in_place():
    """With Inductor, the functional form is reinplaced: the kernel writes the cache buffers
    themselves, with no clone of a cache and no copy back (Inductor counts missed chances)."""
    from torch._dynamo.utils import ReinplaceCounters

    torch._dynamo.reset()
    ReinplaceCounters.clear()
    module = CachedAttention(2, 4, 2, 16, 12, torch.float32)
    # Compiled here, not taken from the FX graph cache: reinplacing must run to be checked.
    with torch._inductor.config.patch(fx_graph_cache=False):
        actual, expected, caches, expected_caches, graphs = run_step(module, attention_inputs(2, 1, 4, 2, 16, 5, torch.float32), options=None)
    assert graphs[0][2]["kv_cache_write"] == 1
    assert ReinplaceCounters.get_total_missed() == 0, dict(ReinplaceCounters._values)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    for cache, expected_cache in zip(caches, expected_caches):
        torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)


def test_switched_off():
    torch._dynamo.reset()
    module = CachedAttention(1, 4, 2, 16, 10, torch.float32)
    _, _, _, _, graphs = run_step(module, attention_inputs(1, 1, 4, 2, 16, 3, torch.float32),
                                  options={**EAGER_INNER, "paiton.kv_cache_write": False})
    assert graphs[0][2]["kv_cache_write"] == 0 and graphs[0][1]["aten.index_put.default"] == 2


def test_positions_on_another_device_than_the_cache_are_left_alone():
    """`gpu_cache[:, :, cpu_positions] = k` is valid eager, but the kernel cannot read CPU
    positions: that write is not fused (checked on the matcher, with the index's value on the
    meta device)."""
    from paiton.passes.kv_cache_write import _cache_write

    graph = torch.fx.Graph()
    cache, value, index = graph.placeholder("cache"), graph.placeholder("value"), graph.placeholder("index")
    write = graph.call_function(torch.ops.aten.index_put.default, (cache, [None, None, index], value))
    cache.meta["val"], value.meta["val"] = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 1, 4)
    index.meta["val"] = torch.zeros(1, dtype=torch.long)
    assert _cache_write(write, value) == (cache, index)
    index.meta["val"] = torch.zeros(1, dtype=torch.long, device="meta")
    assert _cache_write(write, value) is None

"""The decode attention kernel (split-K, grouped-query, filled-part-only) against a float64
reference of the same definition: causal by per-sequence query positions, optional KV mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paiton.fusion import decode_attention as attention_module
from paiton.fusion.decode_attention import _launch, decode_attention_reference, decode_attention_splits
from paiton.fusion.triton_utils import is_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Against float64 math: fp32 accumulates in another order (a few ulp of the output scale);
# fp16/bf16 round the softmax weights to the input dtype before the value product, as the
# flash kernels do: about one ulp of |v| (|v| <= ~4 here).
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
             torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def test_cpu_ops_run_the_triton_kernel():
    assert DEVICE == "cuda" or is_interpreted(attention_module._decode_attention_split_kernel)


def random(shape, dtype, generator):
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=DEVICE)


@settings(max_examples=40)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 8]),
    q_len=st.integers(1, 3),
    head_dim=st.sampled_from([16, 24, 64, 128]),
    cache_len=st.integers(4, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shared_positions=st.booleans(),
    with_mask=st.booleans(),
    n_splits=st.sampled_from([None, 1, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(batch, kv_heads, group, q_len, head_dim, cache_len, dtype, shared_positions, with_mask, n_splits, seed):
    generator = torch.Generator().manual_seed(seed)
    q = random((batch, kv_heads * group, q_len, head_dim), dtype, generator)
    k_cache = random((batch, kv_heads, cache_len, head_dim), dtype, generator)
    v_cache = random((batch, kv_heads, cache_len, head_dim), dtype, generator)
    # Ragged: each sequence has its own filled length; its q_len queries sit at the end of it.
    if shared_positions:
        positions = (torch.randint(0, cache_len - q_len + 1, (1,), generator=generator) + torch.arange(q_len)).to(DEVICE)
    else:
        starts = torch.randint(0, cache_len - q_len + 1, (batch, 1), generator=generator)
        positions = (starts + torch.arange(q_len)).to(DEVICE)
    kv_mask = (torch.rand(batch, cache_len, generator=generator) > 0.3).to(DEVICE) if with_mask else None
    scale = head_dim**-0.5
    out = _launch(q, k_cache, v_cache, positions, kv_mask, scale, n_splits=n_splits)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, positions, kv_mask, scale), **TOLERANCE[dtype])


def test_reads_only_the_filled_part():
    """Garbage (NaN) beyond every sequence's last position must not reach the output."""
    generator = torch.Generator().manual_seed(0)
    q = random((2, 4, 1, 64), torch.float32, generator)
    k_cache, v_cache = random((2, 2, 200, 64), torch.float32, generator), random((2, 2, 200, 64), torch.float32, generator)
    positions = torch.tensor([[17], [130]], device=DEVICE)
    for cache in (k_cache, v_cache):
        cache[0, :, 18:] = float("nan")
        cache[1, :, 131:] = float("nan")
    out = _launch(q, k_cache, v_cache, positions, None, 0.125, n_splits=4)
    assert torch.isfinite(out).all()
    clean = [c.nan_to_num(0.0) for c in (k_cache, v_cache)]
    torch.testing.assert_close(out, decode_attention_reference(q, *clean, positions, None, 0.125))


def test_a_query_with_no_valid_key_gets_zeros():
    generator = torch.Generator().manual_seed(0)
    q = random((1, 2, 1, 16), torch.float32, generator)
    cache = random((1, 1, 32, 16), torch.float32, generator)
    mask = torch.zeros(1, 32, dtype=torch.bool, device=DEVICE)
    out = _launch(q, cache, cache, torch.tensor([5], device=DEVICE), mask, 0.25, n_splits=2)
    assert torch.equal(out, torch.zeros_like(out))


def test_split_count_fills_the_gpu_but_not_beyond_the_cache():
    assert decode_attention_splits(batch_kv_heads=8, cache_len=4096, multiprocessors=132) == 33
    assert decode_attention_splits(batch_kv_heads=512, cache_len=4096, multiprocessors=132) == 1
    assert decode_attention_splits(batch_kv_heads=1, cache_len=100, multiprocessors=132) == 2


def test_bad_inputs_are_clear_errors():
    q = torch.zeros(1, 3, 1, 16, device=DEVICE)
    cache = torch.zeros(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        torch.ops.paiton.decode_attention(q, cache, cache, torch.tensor([1], device=DEVICE), None, 0.25)
    with pytest.raises(ValueError, match="positions are int"):
        torch.ops.paiton.decode_attention(q[:, :2], cache, cache, torch.tensor([1.0], device=DEVICE), None, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(dtype, with_mask):
    generator = torch.Generator().manual_seed(0)
    q = random((2, 4, 1, 16), dtype, generator)
    cache = random((2, 2, 40, 16), dtype, generator)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE) if with_mask else None
    torch.library.opcheck(torch.ops.paiton.decode_attention.default, (q, cache, cache, torch.tensor([[3], [9]], device=DEVICE), mask, 0.25))

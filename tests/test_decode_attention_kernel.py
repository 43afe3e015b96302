"""The decode attention kernel (split-K, grouped-query, filled-part-only) against a float64
reference of the same definition: causal by per-sequence query positions, and/or a boolean
mask per sequence or per query (positions None: the mask alone, as generate passes it)."""

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from paiton.fusion import decode_attention as attention_module
from paiton.fusion.decode_attention import DECODE_BLOCK_N, _launch, decode_attention_reference, decode_attention_splits
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


def assert_nan_keys_unread(q, k_cache, v_cache, positions, kv_mask, scale, n_splits):
    """The caches hold NaN at every key the query must not read: the kernel's output is finite
    (0 * NaN is NaN, so a masked but loaded key would show) and equals the reference's on the
    caches with the NaNs zeroed."""
    out = _launch(q, k_cache, v_cache, positions, kv_mask, scale, n_splits=n_splits)
    assert torch.isfinite(out).all()
    clean = [c.nan_to_num(0.0) for c in (k_cache, v_cache)]
    torch.testing.assert_close(out, decode_attention_reference(q, *clean, positions, kv_mask, scale))


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


# Mask shapes the op takes: [B, L] and [B, Sq, L], with batch and/or query dims of 1 broadcast.
MASK_SHAPES = {"[B, L]": lambda b, s: (b,), "[1, L]": lambda b, s: (1,), "[B, Sq, L]": lambda b, s: (b, s),
               "[1, Sq, L]": lambda b, s: (1, s), "[B, 1, L]": lambda b, s: (b, 1)}


def random_mask(leading, cache_len, generator):
    """A boolean mask with the shapes generate's masks have and the cases the kernel treats
    apart: a left-padding prefix, whole KV tiles off (their K/V are not loaded), the
    unfilled tail off, and a row with no key at all (zeros)."""
    mask = torch.rand(*leading, cache_len, generator=generator) > 0.3
    pad = int(torch.randint(0, cache_len, (), generator=generator))
    mask[..., : pad // 2] = False
    tile = int(torch.randint(0, triton.cdiv(cache_len, DECODE_BLOCK_N), (), generator=generator)) * DECODE_BLOCK_N
    mask[..., tile : tile + DECODE_BLOCK_N] = False
    mask[..., cache_len - pad // 3 :] = False
    if torch.rand((), generator=generator) < 0.3:
        mask.view(-1, cache_len)[int(torch.randint(0, mask.numel() // cache_len, (), generator=generator))] = False
    return mask.to(DEVICE)


@settings(max_examples=40)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4, 8]),
    q_len=st.integers(1, 4),
    head_dim=st.sampled_from([16, 24, 64]),
    cache_len=st.integers(4, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    mask_shape=st.sampled_from(sorted(MASK_SHAPES)),
    with_positions=st.booleans(),
    n_splits=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_masks_per_query_match_reference(batch, kv_heads, group, q_len, head_dim, cache_len, dtype, mask_shape,
                                         with_positions, n_splits, seed):
    generator = torch.Generator().manual_seed(seed)
    q = random((batch, kv_heads * group, q_len, head_dim), dtype, generator)
    k_cache = random((batch, kv_heads, cache_len, head_dim), dtype, generator)
    v_cache = random((batch, kv_heads, cache_len, head_dim), dtype, generator)
    kv_mask = random_mask(MASK_SHAPES[mask_shape](batch, q_len), cache_len, generator)
    positions = None
    if with_positions:
        starts = torch.randint(0, cache_len - q_len + 1, (batch, 1), generator=generator)
        positions = (starts + torch.arange(q_len)).to(DEVICE)
    scale = head_dim**-0.5
    out = _launch(q, k_cache, v_cache, positions, kv_mask, scale, n_splits=n_splits)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, positions, kv_mask, scale), **TOLERANCE[dtype])


@pytest.mark.parametrize("n_splits", [1, 3])
def test_without_positions_unattended_keys_are_not_read(n_splits):
    """positions None: the mask alone bounds what is read. K/V before the first key and after
    the last key any query of a sequence attends to (left padding, the unfilled cache) are
    never loaded: NaN there must not reach the output (a loaded NaN value times a zero weight
    is NaN). A hole between attended keys is read (finite here), as eager SDPA reads it."""
    generator = torch.Generator().manual_seed(0)
    cache_len = 5 * DECODE_BLOCK_N + 7
    q = random((2, 4, 2, 32), torch.float32, generator)
    k_cache, v_cache = (random((2, 2, cache_len, 32), torch.float32, generator) for _ in range(2))
    kv_mask = torch.zeros(2, 2, cache_len, dtype=torch.bool, device=DEVICE)
    kv_mask[0, :, 3:90] = True  # sequence 0: left padding of 3, filled up to 90
    kv_mask[0, 0, 89] = False  # its first query does not see the second's key
    kv_mask[1, :, 60:70] = True  # sequence 1: a hole of whole tiles (70-199) between its keys
    kv_mask[1, :, 200:230] = True
    span = torch.arange(cache_len, device=DEVICE)
    unread = torch.stack([(span < 3) | (span >= 90), (span < 60) | (span >= 230)])  # [B, L]
    for cache in (k_cache, v_cache):
        cache.masked_fill_(unread[:, None, :, None], float("nan"))
    assert_nan_keys_unread(q, k_cache, v_cache, None, kv_mask, 0.125, n_splits)


def test_without_positions_a_row_with_no_valid_key_gets_zeros():
    generator = torch.Generator().manual_seed(0)
    q = random((2, 2, 2, 16), torch.float32, generator)
    cache = random((2, 1, 100, 16), torch.float32, generator)
    kv_mask = torch.rand(2, 2, 100, generator=generator).to(DEVICE) > 0.5
    kv_mask[1, 0] = False
    out = _launch(q, cache, cache, None, kv_mask, 0.25, n_splits=2)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    torch.testing.assert_close(out, decode_attention_reference(q, cache, cache, None, kv_mask, 0.25))
    assert out[0].abs().sum() > 0 and out[1, :, 1].abs().sum() > 0


def test_reads_only_the_filled_part():
    """Garbage (NaN) beyond every sequence's last position must not reach the output."""
    generator = torch.Generator().manual_seed(0)
    q = random((2, 4, 1, 64), torch.float32, generator)
    k_cache, v_cache = random((2, 2, 200, 64), torch.float32, generator), random((2, 2, 200, 64), torch.float32, generator)
    positions = torch.tensor([[17], [130]], device=DEVICE)
    for cache in (k_cache, v_cache):
        cache[0, :, 18:] = float("nan")
        cache[1, :, 131:] = float("nan")
    assert_nan_keys_unread(q, k_cache, v_cache, positions, None, 0.125, 4)


@pytest.mark.parametrize("filled", [1, 40, 150, 301])
def test_the_splits_divide_the_filled_part_not_the_cache(filled):
    """With positions, each sequence's filled keys (up to its last query position) are cut
    into the splits, whole KV tiles each, whatever the cache's length: at 150 keys of a 301-key
    cache and 3 splits of 64-key tiles, tiles 0, 1 and 2 go to one split each (splits of the
    cache's length, 128 keys, left the third empty). Every split that gets keys reads some
    (finite log-sum-exp), the rest none, and NaN beyond the last position is never read."""
    generator = torch.Generator().manual_seed(filled)
    cache_len, n_splits = 301, 3
    q = random((2, 4, 1, 32), torch.float32, generator)
    k_cache, v_cache = (random((2, 2, cache_len, 32), torch.float32, generator) for _ in range(2))
    positions = torch.tensor([[filled - 1], [cache_len - 1]], device=DEVICE)  # one short, one full
    for cache in (k_cache, v_cache):
        cache[0, :, filled:] = float("nan")
    lse = []
    assert_nan_keys_unread(q, k_cache, v_cache, positions, None, 0.125, n_splits)
    _launch(q, k_cache, v_cache, positions, None, 0.125, n_splits=n_splits, split_lse=lse)
    (split_lse,) = lse
    tiles = triton.cdiv(filled, DECODE_BLOCK_N)
    working = triton.cdiv(tiles, triton.cdiv(tiles, n_splits))  # splits of cdiv(tiles, n_splits) tiles each
    assert torch.isfinite(split_lse[0, ..., :working]).all() and torch.isinf(split_lse[0, ..., working:]).all()
    assert torch.isfinite(split_lse[1]).all()  # the full sequence: every split reads keys
    # The layout before (SPLIT_FILLED=False, which bench/lowering_sweep.py times against this):
    # splits of the cache's length (128 keys here), bounded by the last position, the same output.
    config = table_config(2, 1, 32, SPLIT_FILLED=False)
    out = _launch(q, k_cache, v_cache, positions, None, 0.125, n_splits=n_splits, config=config, split_lse=lse)
    assert torch.isfinite(out).all()
    assert torch.isinf(lse[1][0, ..., triton.cdiv(filled, 128):]).all() and torch.isfinite(lse[1][0, ..., :triton.cdiv(filled, 128)]).all()


def table_config(group, q_len, head_dim, **changes):
    from paiton.backends.lowering import launch_config
    from paiton.backends.target import detect_target

    return {**launch_config("decode_attention", detect_target(DEVICE), group=group, q_len=q_len, head_dim=head_dim), **changes}


@settings(max_examples=25)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 8]),
    q_len=st.integers(1, 3),
    head_dim=st.sampled_from([16, 24, 64]),
    cache_len=st.integers(4, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_mask=st.booleans(),
    n_splits=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_combine_in_split_matches_the_combine_kernel(batch, kv_heads, group, q_len, head_dim, cache_len, dtype,
                                                     with_mask, n_splits, seed):
    """combine_in_split: each KV head's last split program combines the splits (no combine
    kernel is launched: the kernel is swapped for one that fails), in split order, to the
    definition's output within the same tolerance, and leaves the arrival counters at zero; one
    split writes the output itself, the same bits as the two kernels."""
    from paiton.fusion import split_k

    generator = torch.Generator().manual_seed(seed)
    q = random((batch, kv_heads * group, q_len, head_dim), dtype, generator)
    k_cache, v_cache = (random((batch, kv_heads, cache_len, head_dim), dtype, generator) for _ in range(2))
    starts = torch.randint(0, cache_len - q_len + 1, (batch, 1), generator=generator)
    positions = (starts + torch.arange(q_len)).to(DEVICE)
    kv_mask = (torch.rand(batch, cache_len, generator=generator) > 0.3).to(DEVICE) if with_mask else None
    two_kernels = _launch(q, k_cache, v_cache, positions, kv_mask, 0.25, n_splits=n_splits,
                          config=table_config(group, q_len, head_dim, combine_in_split=0))
    config = table_config(group, q_len, head_dim, combine_in_split=5)  # every split count drawn
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_module, "_decode_attention_combine_kernel", None)  # a launch would fail
        out = _launch(q, k_cache, v_cache, positions, kv_mask, 0.25, n_splits=n_splits, config=config)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, positions, kv_mask, 0.25), **TOLERANCE[dtype])
    torch.testing.assert_close(out, two_kernels, **TOLERANCE[dtype])
    if n_splits == 1:
        assert torch.equal(out, two_kernels)
    assert not split_k.COUNTERS[str(q.device)][: batch * kv_heads].any()


def test_combine_in_split_without_counters_launches_the_combine_kernel(monkeypatch):
    """Where no counters are to be had (first use inside a CUDA graph capture), the launch
    falls back to the combine kernel: the same output."""
    from paiton.fusion import split_k

    generator = torch.Generator().manual_seed(3)
    q = random((2, 4, 1, 32), torch.float32, generator)
    k_cache, v_cache = (random((2, 2, 90, 32), torch.float32, generator) for _ in range(2))
    positions = torch.tensor([[40], [89]], device=DEVICE)
    monkeypatch.setattr(split_k, "tile_counters", lambda device, tiles: None)
    launches = []
    combine = attention_module._decode_attention_combine_kernel
    monkeypatch.setattr(attention_module, "_decode_attention_combine_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: launches.append(grid) or combine[grid]})())
    out = _launch(q, k_cache, v_cache, positions, None, 0.125, n_splits=3, config=table_config(2, 1, 32, combine_in_split=5))
    assert len(launches) == 1
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, positions, None, 0.125), **TOLERANCE[torch.float32])


def test_split_lse_is_written_where_the_split_kernel_would_combine():
    """One split under combine_in_split writes the output and no partials; asked for the splits'
    log-sum-exps, the launch runs the two kernels, so they are there to read."""
    generator = torch.Generator().manual_seed(5)
    q = random((1, 2, 1, 16), torch.float32, generator)
    cache = random((1, 1, 40, 16), torch.float32, generator)
    lse = []
    out = _launch(q, cache, cache, torch.tensor([20], device=DEVICE), None, 0.25, n_splits=1,
                  config=table_config(2, 1, 16, combine_in_split=5), split_lse=lse)
    expected = torch.logsumexp(0.25 * q[0, :, 0] @ cache[0, 0, :21].T, dim=-1)  # keys 0..20, per head
    torch.testing.assert_close(lse[0][0, :, 0, 0], expected)
    torch.testing.assert_close(out, decode_attention_reference(q, cache, cache, torch.tensor([20], device=DEVICE), None, 0.25))


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
    q = q[:, :2]
    for bad_mask in (torch.ones(1, 8, device=DEVICE),  # float: an additive mask is not this op's
                     torch.ones(1, 1, 1, 8, dtype=torch.bool, device=DEVICE),  # 4-D: SDPA's layout, not the op's
                     torch.ones(1, 2, 8, dtype=torch.bool, device=DEVICE),  # 2 queries, q has 1
                     torch.ones(1, 1, 7, dtype=torch.bool, device=DEVICE),  # not the cache length
                     torch.ones(2, 8, dtype=torch.bool, device=DEVICE)):  # batch 2, q has 1
        with pytest.raises(ValueError, match=r"kv_mask is bool \[B, L\] or \[B, Sq, L\]"):
            torch.ops.paiton.decode_attention(q, cache, cache, None, bad_mask, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_shape", [None, (2, 40), (2, 1, 40)])
@pytest.mark.parametrize("with_positions", [True, False])
def test_opcheck(dtype, mask_shape, with_positions):
    generator = torch.Generator().manual_seed(0)
    q = random((2, 4, 1, 16), dtype, generator)
    cache = random((2, 2, 40, 16), dtype, generator)
    mask = torch.rand(mask_shape, generator=generator).to(DEVICE) > 0.2 if mask_shape else None
    positions = torch.tensor([[3], [9]], device=DEVICE) if with_positions else None
    torch.library.opcheck(torch.ops.paiton.decode_attention.default, (q, cache, cache, positions, mask, 0.25))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32])
def test_combine_in_split_at_qwen3_32b_on_gpu(batch):
    """Qwen3-32B's heads (64 query, 8 KV, head_dim 128, bf16) over a server's 1472-key cache
    holding 150-400 keys a sequence: the splits combined in the split kernel against the two
    kernels and float64, inside a CUDA graph (the counters made before its capture, as the
    table's first use makes them) and out of one; both launches timed (printed)."""
    from paiton.fusion import split_k
    from paiton.fusion.timing import time_ms

    generator = torch.Generator().manual_seed(batch)
    q = random((batch, 64, 1, 128), torch.bfloat16, generator)
    k_cache, v_cache = (random((batch, 8, 1472, 128), torch.bfloat16, generator) for _ in range(2))
    positions = torch.randint(150, 400, (batch, 1), generator=generator).to(DEVICE)
    separate, folded = table_config(8, 1, 128, combine_in_split=0), table_config(8, 1, 128, combine_in_split=64)
    two_kernels = _launch(q, k_cache, v_cache, positions, None, 128**-0.5, config=separate)
    out = _launch(q, k_cache, v_cache, positions, None, 128**-0.5, config=folded)
    reference = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), positions, None, 128**-0.5)
    torch.testing.assert_close(out.double(), reference, **TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(out, two_kernels, **TOLERANCE[torch.bfloat16])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        in_graph = _launch(q, k_cache, v_cache, positions, None, 128**-0.5, config=folded)
    for _ in range(3):  # replays reuse the counters: each leaves them at zero
        in_graph.zero_()
        graph.replay()
        torch.testing.assert_close(in_graph, out, atol=0, rtol=0)
    torch.cuda.synchronize()
    assert not split_k.COUNTERS[str(q.device)].any()
    separate_ms = time_ms(lambda: _launch(q, k_cache, v_cache, positions, None, 128**-0.5, config=separate))
    folded_ms = time_ms(lambda: _launch(q, k_cache, v_cache, positions, None, 128**-0.5, config=folded))
    print(f"\ndecode attention, Qwen3-32B heads, batch {batch}, 150-400 of 1472 keys: split + combine kernels "
          f"{separate_ms * 1e3:.2f} us, combined in the split kernel {folded_ms * 1e3:.2f} us ({torch.cuda.get_device_name()})")

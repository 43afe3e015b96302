"""The packed-prompts prefill attention kernel against a float64 reference of the same
definition (a token attends to the tokens of its own row at or before its position), over
packed prompts as the engine lays them out and over rows and positions in any order; and the
keys a query tile cannot see are not read."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paiton.fusion import prefill_attention as attention_module
from paiton.fusion.prefill_attention import _launch, prefill_attention, prefill_attention_reference
from paiton.fusion.triton_utils import is_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Against float64 math, as for decode attention (test_decode_attention_kernel.py): fp32 sums in
# another order; fp16/bf16 round the softmax weights to the input dtype before the value product.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
             torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
# Small tiles, so that the interpreter's shapes span several query and key tiles and scan chunks.
SMALL = dict(BLOCK_M=16, BLOCK_N=16, SCAN=32, num_warps=4, num_stages=1)


def test_cpu_ops_run_the_triton_kernel():
    assert DEVICE == "cuda" or is_interpreted(attention_module._prefill_attention_kernel)


def packed(lengths, pad, scratch, max_length=None):
    """rows/positions [1, T] as the engine packs prompts: each prompt's tokens at positions
    0..n-1 in its slot's row, then `pad` tokens in the scratch row (positions wrapping at max_length)."""
    rows, positions = [], []
    for slot, n in enumerate(lengths):
        rows += [slot] * n
        positions += range(n)
    rows += [scratch] * pad
    positions += [i % (max_length or pad or 1) for i in range(pad)]
    return torch.tensor([rows], device=DEVICE), torch.tensor([positions], device=DEVICE)


def random(shape, dtype, generator):
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=DEVICE)


def block_config(head_dim, block_m, block_n, scan):
    return dict(SMALL, BLOCK_M=block_m, BLOCK_N=block_n, SCAN=scan, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()))


@settings(max_examples=40)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([16, 24, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    pad=st.integers(0, 20),
    layout=st.sampled_from(["packed", "shuffled", "any"]),
    blocks=st.sampled_from([(16, 16, 32), (32, 16, 16), (16, 32, 64)]),
    int32=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(batch, kv_heads, group, head_dim, dtype, lengths, pad, layout, blocks, int32, seed):
    generator = torch.Generator().manual_seed(seed)
    rows, positions = packed(lengths, pad, scratch=len(lengths), max_length=7)
    seq_len = rows.shape[1]
    if layout == "shuffled":  # the same prompts, tokens in any order: the mask is the definition's, not a layout's
        order = torch.randperm(seq_len, generator=generator).to(DEVICE)
        rows, positions = rows[:, order], positions[:, order]
    elif layout == "any":  # rows and positions of nothing in particular, one set per sequence
        rows = torch.randint(0, 3, (batch, seq_len), generator=generator).to(DEVICE)
        positions = torch.randint(0, 9, (batch, seq_len), generator=generator).to(DEVICE)
    if int32:
        rows, positions = rows.int(), positions.int()
    q = random((batch, kv_heads * group, seq_len, head_dim), dtype, generator)
    k = random((batch, kv_heads, seq_len, head_dim), dtype, generator)
    v = random((batch, kv_heads, seq_len, head_dim), dtype, generator)
    scale = head_dim ** -0.5
    out = _launch(q, k, v, rows, positions, scale, config=block_config(head_dim, *blocks))
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, prefill_attention_reference(q, k, v, rows, positions, scale), **TOLERANCE[dtype])


def test_query_and_key_layouts_with_strides():
    """q, k, v as transposed views of [B, T, H, D] projections (how the model's graph hands them over)."""
    generator = torch.Generator().manual_seed(1)
    rows, positions = packed([9, 30, 5], pad=4, scratch=3)
    seq_len = rows.shape[1]
    q = random((1, seq_len, 4, 24), torch.float32, generator).transpose(1, 2)
    k = random((1, seq_len, 2, 24), torch.float32, generator).transpose(1, 2)
    v = random((1, seq_len, 2, 24), torch.float32, generator).transpose(1, 2)
    out = _launch(q, k, v, rows, positions, 0.2, config=block_config(24, 16, 16, 32))
    torch.testing.assert_close(out, prefill_attention_reference(q, k, v, rows, positions, 0.2), **TOLERANCE[torch.float32])


def test_keys_a_query_tile_cannot_see_are_not_read():
    """Two prompts of 32 tokens (16-token tiles): K and V hold NaN at every key the tile of
    prompt B's first 16 queries cannot see (all of prompt A, and B's own later keys), and at
    prompt A's later 16 keys for A's first tile. Those tiles' outputs stay finite (a loaded
    NaN would show through 0 * NaN) and equal the reference's."""
    generator = torch.Generator().manual_seed(2)
    rows, positions = packed([32, 32], pad=0, scratch=2)
    q = random((1, 2, 64, 16), torch.float32, generator)
    clean_k, clean_v = random((1, 1, 64, 16), torch.float32, generator), random((1, 1, 64, 16), torch.float32, generator)
    expected = prefill_attention_reference(q, clean_k, clean_v, rows, positions, 0.25)
    config = block_config(16, 16, 16, 32)
    for tile, unseen in ((slice(32, 48), [slice(0, 32), slice(48, 64)]), (slice(0, 16), [slice(16, 32)])):
        k, v = clean_k.clone(), clean_v.clone()
        for keys in unseen:
            k[:, :, keys] = float("nan")
            v[:, :, keys] = float("nan")
        out = _launch(q, k, v, rows, positions, 0.25, config=config)
        assert torch.isfinite(out[:, :, tile]).all()
        torch.testing.assert_close(out[:, :, tile], expected[:, :, tile])


def test_op_runs_on_cpu_and_has_a_fake():
    generator = torch.Generator().manual_seed(3)
    rows, positions = packed([3, 6], pad=7, scratch=2)
    q, k, v = (random(shape, torch.float32, generator) for shape in ((1, 4, 16, 16), (1, 2, 16, 16), (1, 2, 16, 16)))
    torch.library.opcheck(prefill_attention, (q, k, v, rows, positions, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("case, message", [
    ("heads", "query heads a multiple of KV heads"),
    ("tokens", "do not fit q"),
    ("dtype", "float32/float16/bfloat16"),
    ("rows", "rows are int"),
    ("positions", "positions are int"),
])
def test_bad_inputs_say_what_is_wrong(case, message):
    q, k, v = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    rows = positions = torch.zeros(1, 8, dtype=torch.long)
    if case == "heads":
        q = torch.zeros(1, 3, 8, 16)
    elif case == "tokens":
        k = v = torch.zeros(1, 2, 9, 16)
    elif case == "dtype":
        q = q.double()
    elif case == "rows":
        rows = torch.zeros(1, 8)
    else:
        positions = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        _launch(q, k, v, rows, positions, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [2048, 4096])
def test_qwen3_32b_prefill_of_packed_prompts_on_gpu(tokens):
    """A prefill of ShareGPT-like prompts packed as the engine packs them (lengths 18-512, the
    rest padding in the scratch row, positions wrapping at a 1472-token cache) at Qwen3-32B's
    heads (64 query, 8 KV, head_dim 128, bf16): the op (the table's launch) against what the
    graph ran before the pass, SDPA over the dense mask with repeated KV heads; both timed."""
    from paiton.fusion.timing import time_ms

    lengths = [312, 95, 18, 441, 160, 27, 230, 77, 512, 150] * (tokens // 2048)
    rows, positions = packed(lengths, tokens - sum(lengths), scratch=128, max_length=1472)
    generator = torch.Generator().manual_seed(4)
    q = random((1, tokens, 64, 128), torch.bfloat16, generator).transpose(1, 2)
    k, v = (random((1, tokens, 8, 128), torch.bfloat16, generator).transpose(1, 2) for _ in range(2))
    scale = 128 ** -0.5
    mask = (rows[:, None, :, None] == rows[:, None, None, :]) & (positions[:, None, None, :] <= positions[:, None, :, None])

    def sdpa():
        repeat = lambda x: x.repeat_interleave(8, dim=1)  # noqa: E731
        return torch.nn.functional.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask, scale=scale)

    out = prefill_attention(q, k, v, rows, positions, scale)
    torch.testing.assert_close(out, sdpa(), **TOLERANCE[torch.bfloat16])
    kernel_ms, sdpa_ms = time_ms(lambda: prefill_attention(q, k, v, rows, positions, scale)), time_ms(sdpa)
    print(f"\nprefill attention, {tokens} packed tokens, Qwen3-32B heads: kernel {kernel_ms:.3f} ms, "
          f"SDPA over the dense mask {sdpa_ms:.3f} ms ({torch.cuda.get_device_name()})")

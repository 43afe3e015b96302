"""The qk_norm_rope kernel against eager's code (Qwen3 q/k norms + apply_rotary_pos_emb)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paiton.fusion import qk_norm_rope as qk_module
from paiton.fusion.qk_norm_rope import qk_norm_rope_reference, rotate_half, slot_indices, write_cache_slots
from paiton.fusion.rms_norm import rms_norm_reference
from paiton.fusion.triton_utils import is_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def test_cpu_ops_run_the_triton_kernel():
    assert DEVICE == "cuda" or is_interpreted(qk_module._qk_norm_rope_kernel)


def random(shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype=dtype, device=DEVICE)


def merged_qkv(batch, seq, q_heads, k_heads, head_dim, dtype, seed):
    """q, k, v [batch, seq, heads, head_dim] as column slices of one merged qkv projection output."""
    qkv = random((batch, seq, (q_heads + 2 * k_heads) * head_dim), dtype, seed)
    q = qkv[..., : q_heads * head_dim].view(batch, seq, q_heads, head_dim)
    k = qkv[..., q_heads * head_dim : (q_heads + k_heads) * head_dim].view(batch, seq, k_heads, head_dim)
    v = qkv[..., (q_heads + k_heads) * head_dim :].view(batch, seq, k_heads, head_dim)
    return q, k, v


def assert_rotary_close(actual, expected, normed, cos, sin, dtype):
    """Error bound from the computation: the output is y*cos + rotate_half(y)*sin of the
    normalized y (itself a few roundings from eager's), each product and the sum rounded. So
    the error scales with |y*cos| + |rotate_half(y)*sin|, not with the (possibly cancelled)
    result: allowed 8 unit roundoffs of that (the CPU interpreter also truncates each cast)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    # Eager's memory layout ([B, S, H, D] order); a size-1 dim's stride carries no meaning.
    assert all(a == e for a, e, n in zip(actual.stride(), expected.stride(), actual.shape) if n > 1)
    y = normed.double()
    scale = (y * cos.double()).abs() + (rotate_half(y) * sin.double()).abs()
    error = (actual.double() - expected.double()).abs()
    bound = 8 * UNIT_ROUNDOFF[dtype] * scale + torch.finfo(dtype).tiny
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, worst ratio {(error / bound).max().item():.2f}"


@settings(max_examples=40)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    q_heads=st.integers(1, 9),
    gqa=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([8, 24, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    merged=st.booleans(),
    cos_batch_one=st.booleans(),
    eps=st.sampled_from([1e-6, 1e-5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_eager(batch, seq, q_heads, gqa, head_dim, dtype, merged, cos_batch_one, eps, seed):
    k_heads = max(1, q_heads // gqa)
    if merged:  # q and k as column slices of one qkv projection output
        q, k, _ = merged_qkv(batch, seq, q_heads, k_heads, head_dim, dtype, seed)
    else:
        q, k = random((batch, seq, q_heads, head_dim), dtype, seed), random((batch, seq, k_heads, head_dim), dtype, seed + 1)
    q_weight, k_weight = random((head_dim,), dtype, seed + 2), random((head_dim,), dtype, seed + 3)
    angles = random((1 if cos_batch_one else batch, seq, head_dim), torch.float32, seed + 4, scale=3.0)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    actual = torch.ops.paiton.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    expected = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
    for a, e, x, w in zip(actual, expected, (q, k), (q_weight, k_weight)):
        normed = rms_norm_reference(x, w, eps).transpose(1, 2)
        assert_rotary_close(a, e, normed, cos.unsqueeze(1), sin.unsqueeze(1), dtype)


def test_bad_shapes_are_clear_errors():
    q, k = random((1, 2, 4, 8), torch.float32, 0), random((1, 2, 2, 8), torch.float32, 1)
    w, cs = random((8,), torch.float32, 2), random((1, 2, 8), torch.float32, 3)
    with pytest.raises(ValueError, match="cos must be"):
        torch.ops.paiton.qk_norm_rope(q, k, w, w, cs[:, :1], cs, 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.paiton.qk_norm_rope(q, k, w, w, cs.double(), cs, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    qkv = random((2, 3, 8 * 16), dtype, 0)
    q, k = qkv[..., :64].view(2, 3, 4, 16), qkv[..., 64:96].view(2, 3, 2, 16)
    w, cs = random((16,), dtype, 1), random((2, 3, 16), dtype, 2)
    torch.library.opcheck(torch.ops.paiton.qk_norm_rope.default, (q, k, w, w, cs, cs, 1e-6))


@settings(max_examples=25)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 4),
    q_heads=st.integers(1, 8),
    gqa=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([8, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    cache_len=st.integers(4, 40),
    slot_dtype=st.sampled_from([torch.int64, torch.int32]),
    slot_form=st.sampled_from(["indices", "strided indices", "start"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cache_write_matches_index_copy(batch, seq, q_heads, gqa, head_dim, dtype, cache_len, slot_dtype, slot_form, seed):
    """qk_norm_rope_cache: q as qk_norm_rope gives it; k rotated and v copied into the caches
    at `slots`, exactly where `index_copy_` puts them; every other cache slot untouched. Slots
    given per token (contiguous or a strided view) or as a 0-dim start (StaticCache's counter:
    the tokens go to start, start + 1, ...)."""
    k_heads = max(1, q_heads // gqa)
    q, k, v = merged_qkv(batch, seq, q_heads, k_heads, head_dim, dtype, seed)
    v = v.transpose(1, 2)
    q_weight, k_weight = random((head_dim,), dtype, seed + 2), random((head_dim,), dtype, seed + 3)
    angles = random((1, seq, head_dim), torch.float32, seed + 4, scale=3.0)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    generator = torch.Generator().manual_seed(seed)
    if slot_form == "start":
        start = int(torch.randint(0, cache_len - seq + 1, (), generator=generator))
        slots = torch.tensor(start, device=DEVICE, dtype=slot_dtype)
        indices = torch.arange(start, start + seq, device=DEVICE)
    else:
        indices = torch.randperm(cache_len, generator=generator)[:seq].to(DEVICE)
        if slot_form == "indices":
            slots = indices.to(slot_dtype)
        else:  # every other element of a buffer twice as long
            slots = torch.stack([indices, torch.full_like(indices, -1)], dim=1).to(slot_dtype)[:, 0]
    assert torch.equal(slot_indices(slots, seq).long(), indices)
    k_cache = random((batch, k_heads, cache_len, head_dim), dtype, seed + 5)
    v_cache = random((batch, k_heads, cache_len, head_dim), dtype, seed + 6)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()

    q_out = torch.ops.paiton.qk_norm_rope_cache(q, k, v, q_weight, k_weight, cos, sin, 1e-6, k_cache, v_cache, slots)

    q_expected, k_rotated = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, 1e-6)
    expected_k.index_copy_(2, indices, k_rotated)
    expected_v.index_copy_(2, indices, v)
    cos1, sin1 = cos.unsqueeze(1), sin.unsqueeze(1)
    assert_rotary_close(q_out, q_expected, rms_norm_reference(q, q_weight, 1e-6).transpose(1, 2), cos1, sin1, dtype)
    written = torch.zeros(cache_len, dtype=torch.bool, device=DEVICE)
    written[indices] = True
    assert torch.equal(k_cache[:, :, ~written], expected_k[:, :, ~written])
    assert torch.equal(v_cache, expected_v)  # a copy: exact
    normed_k = rms_norm_reference(k, k_weight, 1e-6).transpose(1, 2)
    assert_rotary_close(k_cache[:, :, indices], k_rotated.contiguous(), normed_k, cos1, sin1, dtype)


@settings(deadline=None, max_examples=8)
@given(
    batch=st.integers(1, 4),
    seq=st.sampled_from([1, 2, 5]),
    head_dim=st.sampled_from([8, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    cache_len=st.integers(5, 24),
    shared_row=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_sequence_slots_write_each_row_at_its_own_slots(batch, seq, head_dim, dtype, cache_len, shared_row, seed):
    """Slots [B, S] (a continuous batch: every row holds a sequence of its own length): token s
    of sequence b goes to cache[b, :, slots[b, s]], as `cache[arange(B)[:, None], :, slots] =
    k.transpose(1, 2)` writes it (write_cache_slots, the CPU reference); slots [1, S] are shared
    by the rows. Only those slots change."""
    q, k, v = merged_qkv(batch, seq, 4, 2, head_dim, dtype, seed)
    v = v.transpose(1, 2)
    q_weight, k_weight = random((head_dim,), dtype, seed + 2), random((head_dim,), dtype, seed + 3)
    angles = random((batch, seq, head_dim), torch.float32, seed + 4, scale=3.0)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    generator = torch.Generator().manual_seed(seed)
    rows = 1 if shared_row else batch
    slots = torch.stack([torch.randperm(cache_len, generator=generator)[:seq] for _ in range(rows)]).to(DEVICE)
    k_cache = random((batch, 2, cache_len, head_dim), dtype, seed + 5)
    v_cache = random((batch, 2, cache_len, head_dim), dtype, seed + 6)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()

    torch.ops.paiton.qk_norm_rope_cache(q, k, v, q_weight, k_weight, cos, sin, 1e-6, k_cache, v_cache, slots)

    _, k_rotated = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, 1e-6)
    write_cache_slots(expected_k, slots, k_rotated)
    write_cache_slots(expected_v, slots, v)
    assert torch.equal(v_cache, expected_v)  # a copy: exact, and nothing else written
    written = torch.zeros(batch, cache_len, dtype=torch.bool, device=DEVICE)
    written[torch.arange(batch, device=DEVICE)[:, None], slots.expand(batch, -1)] = True
    for b in range(batch):
        assert torch.equal(k_cache[b][:, ~written[b]], expected_k[b][:, ~written[b]])
        index = slots[0 if shared_row else b]
        normed = rms_norm_reference(k[b:b + 1], k_weight, 1e-6).transpose(1, 2)
        assert_rotary_close(k_cache[b:b + 1, :, index], k_rotated[b:b + 1].contiguous(), normed,
                            cos[b:b + 1].unsqueeze(1), sin[b:b + 1].unsqueeze(1), dtype)


def test_cache_write_bad_inputs_are_clear_errors():
    q, k = random((1, 2, 4, 8), torch.float32, 0), random((1, 2, 2, 8), torch.float32, 1)
    v, w, cs = random((1, 2, 2, 8), torch.float32, 2), random((8,), torch.float32, 3), random((1, 2, 8), torch.float32, 4)
    cache, slots = random((1, 2, 6, 8), torch.float32, 5), torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="slots must be int"):
        torch.ops.paiton.qk_norm_rope_cache(q, k, v, w, w, cs, cs, 1e-6, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="slots must be int"):  # one slot per token, or one start
        torch.ops.paiton.qk_norm_rope_cache(q, k, v, w, w, cs, cs, 1e-6, cache, cache.clone(), slots[:1])
    with pytest.raises(ValueError, match="k_cache must be"):
        torch.ops.paiton.qk_norm_rope_cache(q, k, v, w, w, cs, cs, 1e-6, cache[:, :1], cache.clone(), slots)
    with pytest.raises(ValueError, match="v must be"):
        torch.ops.paiton.qk_norm_rope_cache(q, k, v[:, :, :1], w, w, cs, cs, 1e-6, cache, cache.clone(), slots)


def test_cache_write_opcheck():
    qkv = random((2, 3, 8 * 16), torch.float32, 0)
    q, k = qkv[..., :64].view(2, 3, 4, 16), qkv[..., 64:96].view(2, 3, 2, 16)
    v = qkv[..., 96:].view(2, 3, 2, 16).transpose(1, 2)
    w, cs = random((16,), torch.float32, 1), random((2, 3, 16), torch.float32, 2)
    caches = random((2, 2, 8, 16), torch.float32, 3), random((2, 2, 8, 16), torch.float32, 4)
    for slots in (torch.tensor([5, 2, 7], device=DEVICE), torch.tensor(4, device=DEVICE)):
        torch.library.opcheck(torch.ops.paiton.qk_norm_rope_cache.default, (q, k, v, w, w, cs, cs, 1e-6, *caches, slots))


@pytest.mark.parametrize("slots, kept", [([2, 8, 5], [0, 2]), (6, [0, 1]), (-1, [1, 2])],
                         ids=["indices", "start", "negative start"])
def test_cache_write_skips_slots_outside_the_cache(slots, kept):
    """Eager's index_copy_ raises on such a slot; the kernel cannot raise, and must not write
    outside the cache: the other tokens are written, the cache around it is untouched."""
    q, k, v = merged_qkv(1, 3, 4, 2, 16, torch.float32, 0)
    w, cs = random((16,), torch.float32, 1), random((1, 3, 16), torch.float32, 2)
    k_cache, v_cache = random((1, 2, 8, 16), torch.float32, 3), random((1, 2, 8, 16), torch.float32, 4)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor(slots, device=DEVICE)
    torch.ops.paiton.qk_norm_rope_cache(q, k, v.transpose(1, 2), w, w, cs, cs, 1e-6, k_cache, v_cache, slots)
    in_cache = [int(i) for i in slot_indices(slots, 3) if 0 <= i < 8]
    written = torch.zeros(8, dtype=torch.bool)
    written[in_cache] = True
    assert torch.equal(k_cache[:, :, ~written], before_k[:, :, ~written])
    assert torch.equal(v_cache[:, :, ~written], before_v[:, :, ~written])
    assert torch.equal(v_cache[:, :, in_cache], v.transpose(1, 2)[:, :, kept])


@pytest.mark.parametrize("slots", [torch.tensor(3, dtype=torch.int32), torch.tensor([5, 1], dtype=torch.int32)],
                         ids=["int32 start", "int32 slots"])
def test_cpu_reference_takes_int32_slots(monkeypatch, slots):
    """The CPU path without the interpreter (eager's operations) writes where the kernel does,
    for int32 slots too (index_copy_ itself takes int64 only)."""
    monkeypatch.setattr(qk_module, "is_interpreted", lambda kernel: False)
    q, k, v = merged_qkv(1, 2, 4, 2, 16, torch.float32, 0)
    w, cs = random((16,), torch.float32, 1).cpu(), random((1, 2, 16), torch.float32, 2).cpu()
    q, k, v = q.cpu(), k.cpu(), v.transpose(1, 2).cpu()
    k_cache, v_cache = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    torch.ops.paiton.qk_norm_rope_cache(q, k, v, w, w, cs, cs, 1e-6, k_cache, v_cache, slots)
    indices = slot_indices(slots, 2).long()
    assert torch.equal(v_cache[:, :, indices], v) and v_cache.count_nonzero() == v.count_nonzero()

"""Qwen3's per-head q/k RMSNorm followed by rotary embedding: one Triton kernel for q and k.

Eager (transformers' Qwen3Attention + apply_rotary_pos_emb), for q and for k::

    x   = Qwen3RMSNorm(x)                       # [B, S, H, D] over D, rounded to the dtype
    x   = x.transpose(1, 2)                     # [B, H, S, D]
    out = x * cos + rotate_half(x) * sin        # cos/sin [B, S, D] unsqueezed at dim 1
    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

In bf16/fp16 each product and the sum round to the dtype; the kernel rounds at the same
points. The outputs have eager's layout: shape [B, H, S, D], memory in [B, S, H, D] order
(the transpose is a view, and elementwise ops keep their input's memory order).

Op: paiton::qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps) -> (q_out, k_out). q and k
may be strided views (e.g. column slices of a merged qkv matmul): the kernel reads them in
place. cos/sin may have batch 1 (broadcast over the batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paiton.backends.target import detect_target
from paiton.fusion.l2_prefetch import CHUNK_BYTES, prefetch_arguments, prefetch_span_to_l2
from paiton.fusion.pdl import pdl_launch, wait_for_previous_kernel
from paiton.fusion.rms_norm import SUPPORTED_DTYPES, rms_norm_reference
from paiton.fusion.triton_utils import device_guard, is_interpreted


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps):
    """Eager's code: the q/k norms, the transposes, apply_rotary_pos_emb."""
    q = rms_norm_reference(q, q_weight, eps).transpose(1, 2)
    k = rms_norm_reference(k, k_weight, eps).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@triton.jit
def _norm_rope_heads(
    x_ptr, w_ptr, out_ptr, cos_ptr, sin_ptr,
    b, s, s_out, out_len, n_heads, head_dim, eps,
    stride_b, stride_s, stride_h, out_stride_b, out_stride_s, out_stride_h,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """All heads of one token: norm over head_dim, weight, then rotary embedding; written at
    out[b, s_out, head] (through the output's strides: a fresh [B, S, H, D] tensor, or the
    KV cache [B, H, L, D] at the token's cache slot) if 0 <= s_out < out_len."""
    half = head_dim // 2
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < half)
    row = x_ptr + b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + heads * stride_h
    x1 = tl.load(row + cols, mask=mask, other=0.0)
    x2 = tl.load(row + half + cols, mask=mask, other=0.0)
    dtype = x1.dtype

    # RMSNorm, rounded as Qwen3RMSNorm rounds: normalized value, then the weight multiply.
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / head_dim + eps)[:, None]
    w1 = tl.load(w_ptr + cols, mask=cols < half, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + half + cols, mask=cols < half, other=0.0).to(tl.float32)
    y1 = (w1 * (x1f * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y2 = (w2 * (x2f * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)

    # Rotary embedding: out = y * cos + rotate_half(y) * sin, each product and the sum rounded.
    cos1 = tl.load(cos_ptr + cols, mask=cols < half, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + half + cols, mask=cols < half, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + cols, mask=cols < half, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + half + cols, mask=cols < half, other=0.0).to(tl.float32)
    out1 = (y1 * cos1).to(dtype).to(tl.float32) + (-y2 * sin1).to(dtype).to(tl.float32)
    out2 = (y2 * cos2).to(dtype).to(tl.float32) + (y1 * sin2).to(dtype).to(tl.float32)

    out_row = out_ptr + b.to(tl.int64) * out_stride_b + s_out.to(tl.int64) * out_stride_s + heads * out_stride_h
    # (The slot test is a block, not a scalar: Triton's interpreter rejects scalar & block masks.)
    slot = s_out + 0 * heads
    store = mask & (slot >= 0) & (slot < out_len)
    tl.store(out_row + cols, out1.to(dtype), mask=store)
    tl.store(out_row + half + cols, out2.to(dtype), mask=store)


@triton.jit
def _copy_heads(
    x_ptr, out_ptr, b, s, s_out, out_len, n_heads, head_dim,
    stride_b, stride_s, stride_h, out_stride_b, out_stride_s, out_stride_h,
    BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """All heads of one token copied to out[b, s_out, head] (v into its cache slot) if 0 <= s_out < out_len."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (cols < head_dim)
    x = tl.load(x_ptr + b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + heads * stride_h + cols, mask=mask)
    out_row = out_ptr + b.to(tl.int64) * out_stride_b + s_out.to(tl.int64) * out_stride_s + heads * out_stride_h
    slot = s_out + 0 * heads
    tl.store(out_row + cols, x, mask=mask & (slot >= 0) & (slot < out_len))


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, q_out_ptr, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr, slot_ptr,
    seq_len, n_q_heads, n_k_heads, head_dim, cache_len, slot_stride_b, slot_stride, slot_step, eps,
    q_stride_b, q_stride_s, q_stride_h,
    k_stride_b, k_stride_s, k_stride_h,
    v_stride_b, v_stride_s, v_stride_h,
    q_out_stride_b, q_out_stride_s, q_out_stride_h,
    k_out_stride_b, k_out_stride_s, k_out_stride_h,
    v_out_stride_b, v_out_stride_s, v_out_stride_h,
    cos_stride_b, cos_stride_s, sin_stride_b, sin_stride_s,
    WRITE_CACHE: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr = False,
    prefetch_ptr=None, prefetch_bytes=0, prefetch_first_program=0, PREFETCH_CHUNKS: tl.constexpr = 0,
    PREFETCH_CHUNK_BYTES: tl.constexpr = CHUNK_BYTES,
):
    """Program (token, which): which = 0 rotates the token's q heads, 1 its k heads; with
    WRITE_CACHE, k goes to its cache slot (slot_ptr[b * slot_stride_b + s * slot_stride] + s *
    slot_step: a slot per token, shared by the batch or one per sequence, or one start slot for
    consecutive tokens) and which = 2 copies v to its slot.
    A slot outside [0, cache_len) is not written (eager's index_copy_ raises there; a kernel
    cannot, and must not write outside the cache). PDL: launched programmatically (fusion/pdl.py).
    PREFETCH_CHUNKS > 0: the programs from prefetch_first_program on (token * programs(1) +
    which: rows of programs appended past the last token) first ask L2 for their share of the
    next product's weight (attention's o_proj: fusion/l2_prefetch.py), and do nothing else."""
    token = tl.program_id(0)
    which = tl.program_id(1)
    program = token * tl.num_programs(1) + which
    prefetch_span_to_l2(prefetch_ptr, prefetch_bytes, program - prefetch_first_program, PREFETCH_CHUNKS,
                        PREFETCH_CHUNK_BYTES)
    if PREFETCH_CHUNKS > 0:  # an appended program has no token: it reads token 0's slot and writes nothing
        appended = program >= prefetch_first_program
        token = tl.where(appended, 0, token)
        which = tl.where(appended, 3, which)
    wait_for_previous_kernel(PDL)
    b = token // seq_len
    s = token % seq_len
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + b.to(tl.int64) * slot_stride_b + s * slot_stride) + s * slot_step
    else:
        slot = s
    cos_row = cos_ptr + b.to(tl.int64) * cos_stride_b + s.to(tl.int64) * cos_stride_s
    sin_row = sin_ptr + b.to(tl.int64) * sin_stride_b + s.to(tl.int64) * sin_stride_s
    if which == 0:
        _norm_rope_heads(q_ptr, q_w_ptr, q_out_ptr, cos_row, sin_row, b, s, s, seq_len, n_q_heads, head_dim, eps,
                         q_stride_b, q_stride_s, q_stride_h, q_out_stride_b, q_out_stride_s, q_out_stride_h,
                         BLOCK_HEADS, BLOCK_HALF)
    elif which == 1:
        _norm_rope_heads(k_ptr, k_w_ptr, k_out_ptr, cos_row, sin_row, b, s, slot, cache_len, n_k_heads, head_dim, eps,
                         k_stride_b, k_stride_s, k_stride_h, k_out_stride_b, k_out_stride_s, k_out_stride_h,
                         BLOCK_HEADS, BLOCK_HALF)
    elif which == 2:
        _copy_heads(v_ptr, v_out_ptr, b, s, slot, cache_len, n_k_heads, head_dim,
                    v_stride_b, v_stride_s, v_stride_h, v_out_stride_b, v_out_stride_s, v_out_stride_h,
                    BLOCK_HEADS, 2 * BLOCK_HALF)


def _check_inputs(q, k, q_weight, k_weight, cos, sin) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"paiton qk_norm_rope: q and k are [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, seq, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim or head_dim % 2:
        raise ValueError(f"paiton qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or (even) head_dim")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seq or t.shape[2] != head_dim:
            raise ValueError(f"paiton qk_norm_rope: {name} must be [batch or 1, seq, head_dim], got {tuple(t.shape)}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.dim() != 1 or w.shape[0] != head_dim:
            raise ValueError(f"paiton qk_norm_rope: {name} must be [head_dim], got {tuple(w.shape)}")
    dtypes = {t.dtype for t in (q, k, q_weight, k_weight, cos, sin)}
    if len(dtypes) != 1 or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"paiton qk_norm_rope: one dtype among float32/float16/bfloat16 for all inputs, got {dtypes}")


def _check_cache_inputs(k, v, k_cache, v_cache, slots) -> None:
    batch, seq, kv_heads, head_dim = k.shape
    if tuple(v.shape) != (batch, kv_heads, seq, head_dim) or v.dtype != k.dtype:
        raise ValueError(f"paiton qk_norm_rope_cache: v must be [batch, kv_heads, seq, head_dim] {(batch, kv_heads, seq, head_dim)} "
                         f"in k's dtype; got {tuple(v.shape)} {v.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[0] != batch or cache.shape[1] != kv_heads or cache.shape[3] != head_dim \
                or cache.dtype != k.dtype or cache.stride(-1) != 1:
            raise ValueError(f"paiton qk_norm_rope_cache: {name} must be [batch, kv_heads, cache_len, head_dim] in k's dtype "
                             f"with unit stride over head_dim; got {tuple(cache.shape)} {cache.dtype}")
    shape_ok = (slots.dim() == 0 or (slots.dim() == 1 and slots.shape[0] == seq)
                or (slots.dim() == 2 and slots.shape[0] in (1, batch) and slots.shape[1] == seq))
    if not shape_ok or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"paiton qk_norm_rope_cache: slots must be int [seq] (the cache index of each token), int "
                         f"[batch, seq] (each sequence's own indices) or a 0-dim int (the first token's index, the others "
                         f"following it); got {tuple(slots.shape)} {slots.dtype}")
    if slots.device != k.device:
        raise ValueError(f"paiton qk_norm_rope_cache: slots must be on k's device {k.device}, got {slots.device}")


def slot_indices(slots: torch.Tensor, seq: int) -> torch.Tensor:
    """The cache index of each token: `slots` itself ([seq], or [batch, seq] per sequence), or
    for a 0-dim start slot the consecutive indices from it (transformers' StaticCache writes at
    arange(seq) + counter)."""
    return slots + torch.arange(seq, device=slots.device, dtype=slots.dtype) if slots.dim() == 0 else slots


def write_cache_slots(cache: torch.Tensor, slots: torch.Tensor, value: torch.Tensor) -> None:
    """cache[b, :, slots[b, s]] = value[b, :, s] for slots [seq] (shared by the batch, as
    `index_copy_` along dim 2) or [batch or 1, seq] (each sequence's own slots): the reference
    of the kernel's cache write."""
    slots = slot_indices(slots, value.shape[2]).long()  # indexing takes int64 indices only
    if slots.dim() == 1:
        cache.index_copy_(2, slots, value)
        return
    rows = torch.arange(value.shape[0], device=cache.device)[:, None]
    cache[rows, :, slots.expand(value.shape[0], -1)] = value.transpose(1, 2)


def _slot_strides(slots: torch.Tensor) -> tuple[int, int, int]:
    """(slot_stride_b, slot_stride, slot_step) of the kernel: token s of sequence b writes at
    slots[b * stride_b + s * stride] + s * step."""
    if slots.dim() == 0:
        return 0, 0, 1
    if slots.dim() == 1:
        return 0, slots.stride(0), 0
    return (slots.stride(0) if slots.shape[0] > 1 else 0), slots.stride(1), 0


def _empty_outputs(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, S, D] tensors laid out as [B, S, H, D], as eager's rotary output is."""
    return tuple(x.new_empty(x.shape).transpose(1, 2) for x in (q, k))


def _bsh_strides(t: torch.Tensor, seq_dim: int) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, S, H, D] (seq_dim 1) or [B, H, S, D] (seq_dim 2) tensor."""
    return t.stride(0), t.stride(seq_dim), t.stride(3 - seq_dim)


def qk_norm_rope_block_sizes(n_q_heads: int, n_k_heads: int, head_dim: int) -> dict[str, int]:
    """One program holds all heads of a token, as [heads, head_dim / 2] halves."""
    return dict(BLOCK_HEADS=triton.next_power_of_2(max(n_q_heads, n_k_heads)), BLOCK_HALF=triton.next_power_of_2(head_dim // 2))


def _launch(q, k, q_weight, k_weight, cos, sin, eps, cache=None, config=None, prefetch=None, prefetch_bytes=0):
    """q/k outputs as `_empty_outputs`; with cache = (v, k_cache, v_cache, slots), k and v are
    written to their cache slots instead and only q_out is returned. `config`: the launch's
    keyword arguments; by default the lowering table's for the device."""
    _check_inputs(q, k, q_weight, k_weight, cos, sin)
    q_out, k_out = _empty_outputs(q, k)
    if cache is not None:
        v, k_cache, v_cache, slots = cache
        _check_cache_inputs(k, v, k_cache, v_cache, slots)
    batch, seq, n_q_heads, head_dim = q.shape
    if q.numel() == 0:
        return q_out if cache is not None else (q_out, k_out)
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    if cache is not None:
        v = v if v.stride(-1) == 1 else v.contiguous()
        k_target, v_source, v_target, slot_source = k_cache, v, v_cache, slots
        k_target_strides, v_strides, v_target_strides = _bsh_strides(k_cache, 2), _bsh_strides(v, 2), _bsh_strides(v_cache, 2)
        slot_strides = _slot_strides(slots)
    else:  # unused pointers and strides: WRITE_CACHE is off
        k_target, v_source, v_target, slot_source = k_out, k, k_out, q
        k_target_strides = _bsh_strides(k_out, 2)
        v_strides = v_target_strides = (0, 0, 0)
        slot_strides = (0, 0, 0)
    op = "qk_norm_rope_cache" if cache is not None else "qk_norm_rope"
    if config is None:
        from paiton.backends.lowering import launch_config  # (lowering.py imports this module)

        config = launch_config(op, detect_target(q.device), n_q_heads=n_q_heads, n_k_heads=k.shape[2], head_dim=head_dim)
    grid = (batch * seq, 3 if cache is not None else 2)
    prefetching = prefetch_arguments(op, q, prefetch, prefetch_bytes, grid[0] * grid[1])
    grid = (grid[0] + triton.cdiv(prefetching.programs, grid[1]), grid[1])  # the prefetch's rows of programs
    with device_guard(q):
        _qk_norm_rope_kernel[grid](
            q, k, v_source, q_weight, k_weight, q_out, k_target, v_target, cos, sin, slot_source,
            seq, n_q_heads, k.shape[2], head_dim, k_target.shape[2] if cache is not None else seq,
            *slot_strides, float(eps),
            *_bsh_strides(q, 1), *_bsh_strides(k, 1), *v_strides,
            *_bsh_strides(q_out, 2), *k_target_strides, *v_target_strides,
            cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
            sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
            WRITE_CACHE=cache is not None,
            **config,
            **pdl_launch(q, _qk_norm_rope_kernel),
            **prefetching.arguments,
        )
    return q_out if cache is not None else (q_out, k_out)


@torch.library.custom_op("paiton::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, eps: float, prefetch: torch.Tensor | None = None, prefetch_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, transpose to [B, H, S, D], rotary embedding. `prefetch`,
    `prefetch_bytes`: the next product's weight, asked of L2 on the way (a hint that changes no
    result: fusion/l2_prefetch.py)."""
    return _launch(q, k, q_weight, k_weight, cos, sin, eps, prefetch=prefetch, prefetch_bytes=prefetch_bytes)


@qk_norm_rope.register_kernel("cpu")
def _qk_norm_rope_cpu(q, k, q_weight, k_weight, cos, sin, eps, prefetch=None, prefetch_bytes=0):
    if is_interpreted(_qk_norm_rope_kernel):
        return _launch(q, k, q_weight, k_weight, cos, sin, eps)
    _check_inputs(q, k, q_weight, k_weight, cos, sin)
    outputs = _empty_outputs(q, k)
    for out, value in zip(outputs, qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)):
        out.copy_(value)
    return outputs


@qk_norm_rope.register_fake
def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, eps, prefetch=None, prefetch_bytes=0):
    _check_inputs(q, k, q_weight, k_weight, cos, sin)
    return _empty_outputs(q, k)


@torch.library.custom_op("paiton::qk_norm_rope_cache", mutates_args=("k_cache", "v_cache"))
def qk_norm_rope_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slots: torch.Tensor, prefetch: torch.Tensor | None = None, prefetch_bytes: int = 0,
) -> torch.Tensor:
    """qk_norm_rope, with the rotated k and v ([B, Hkv, S, D]) written into the KV cache at
    `slots` (as `k_cache.index_copy_(2, slots, k_rotated)`, the same for v) instead of
    returned. `slots`: int [S]; int [B, S], each sequence's own slots (a continuous batch,
    whose rows hold sequences of different lengths: `k_cache[b, :, slots[b, s]] = k[b, :, s]`);
    or a 0-dim int start (the tokens go to start, start + 1, ...: a StaticCache's counter read
    in the kernel, no index tensor made). Returns the rotated q. `prefetch`, `prefetch_bytes`:
    as qk_norm_rope's."""
    return _launch(q, k, q_weight, k_weight, cos, sin, eps, cache=(v, k_cache, v_cache, slots), prefetch=prefetch,
                   prefetch_bytes=prefetch_bytes)


@qk_norm_rope_cache.register_kernel("cpu")
def _qk_norm_rope_cache_cpu(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache, slots, prefetch=None,
                            prefetch_bytes=0):
    if is_interpreted(_qk_norm_rope_kernel):
        return _launch(q, k, q_weight, k_weight, cos, sin, eps, cache=(v, k_cache, v_cache, slots))
    _check_inputs(q, k, q_weight, k_weight, cos, sin)
    _check_cache_inputs(k, v, k_cache, v_cache, slots)
    q_rotated, k_rotated = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
    write_cache_slots(k_cache, slots, k_rotated)
    write_cache_slots(v_cache, slots, v)
    return _empty_outputs(q, k)[0].copy_(q_rotated)


@qk_norm_rope_cache.register_fake
def _qk_norm_rope_cache_fake(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache, slots, prefetch=None,
                             prefetch_bytes=0):
    _check_inputs(q, k, q_weight, k_weight, cos, sin)
    _check_cache_inputs(k, v, k_cache, v_cache, slots)
    return _empty_outputs(q, k)[0]

"""Prefill attention over packed prompts: a flash-attention Triton kernel that reads only the
key tiles a query tile can see.

The serving engine (models/engine.py) prefills several prompts in one row of T tokens: token t
carries its cache row `rows[t]` (its prompt) and its position `positions[t]`, and attends to
the tokens of its own prompt at or before its position. For each batch b, query t and head h::

    out[b, h, t] = softmax(scale * q[b, h, t] . k[b, h // G, j] over j in visible(b, t)) @ v[b, h // G, j]
    visible(b, t) = { j < T : rows[b, j] == rows[b, t] and positions[b, j] <= positions[b, t] }

with G = query heads per KV head (grouped-query attention). Eager runs this as SDPA over a
dense [T, T] mask: every query against every key, although a prompt of the ShareGPT workload
is about 200 tokens of a 2048-token prefill (about 1/13 of the tiles hold a visible pair), and
CUDA's SDPA with a mask is the memory-efficient kernel, not flash. What this kernel does:
  * each program (a tile of BLOCK_M queries, one query head) first scans the T rows and
    positions (a few thousand integers, SCAN at a time) for the first and last key that any of
    its queries could see: a key whose row lies within the tile's rows and whose position is at
    most the tile's largest. Its loop then covers only those keys. The bound is exact for any
    rows and positions (a key outside it is visible to no query of the tile); for packed
    prompts it is the tile's own prompts up to its last query;
  * inside that range the mask above is applied element by element, so the result is the
    definition's whatever the layout (rows need not be sorted, positions need not be
    contiguous);
  * it never materializes repeated KV heads (transformers' repeat_kv copies K and V G times).
Every query sees at least itself, so no softmax is empty.

Op: paiton::prefill_attention(q, k, v, rows, positions, scale) -> out
    q [B, Hq, T, D] and k, v [B, Hkv, T, D] (any layout with unit stride over D),
    rows and positions int [B, T] or [1, T] (shared by the batch),
    out [B, Hq, T, D], laid out as [B, T, Hq, D] in memory (as CUDA's SDPA kernels return it,
    so `out.transpose(1, 2)` is contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paiton.backends.target import detect_target
from paiton.fusion.decode_attention import attend_tile, empty_attention
from paiton.fusion.pdl import pdl_launch, wait_for_previous_kernel
from paiton.fusion.rms_norm import SUPPORTED_DTYPES
from paiton.fusion.triton_utils import device_guard, is_interpreted

# A sentinel beyond any row or position (the scan's min/max over masked-off lanes).
_FAR = tl.constexpr(1 << 62)


def prefill_attention_reference(q, k, v, rows, positions, scale):
    """The definition above, in float64 math (repeat_kv + masked softmax), cast to q.dtype."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = scale * q.double() @ k.transpose(-1, -2)  # [B, Hq, T, T]
    visible = (rows[:, :, None] == rows[:, None, :]) & (positions[:, None, :] <= positions[:, :, None])  # [B, T, T]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # queries without a visible key: zeros
    return (probs @ v).to(q.dtype)


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, rows_ptr, pos_ptr, out_ptr,
    n_q_heads, seq_len, head_dim, scale,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    v_stride_b, v_stride_h, v_stride_s,
    rows_stride_b, rows_stride_s, pos_stride_b, pos_stride_s,
    out_stride_b, out_stride_h, out_stride_s,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SCAN: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (query tile, b * Hq + query head): BLOCK_M queries of one head against the keys
    from the first to the last that one of them may see (found by a scan of rows/positions).
    PDL: launched programmatically (fusion/pdl.py)."""
    wait_for_previous_kernel(PDL)
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_q_heads).to(tl.int64)
    q_head = (bh % n_q_heads).to(tl.int64)
    kv_head = q_head // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < seq_len
    rows_base = rows_ptr + b * rows_stride_b
    pos_base = pos_ptr + b * pos_stride_b
    q_rows = tl.load(rows_base + offs_m * rows_stride_s, mask=m_valid, other=0).to(tl.int64)
    q_pos = tl.load(pos_base + offs_m * pos_stride_s, mask=m_valid, other=0).to(tl.int64)
    row_lo = tl.min(tl.where(m_valid, q_rows, _FAR), axis=0)
    row_hi = tl.max(tl.where(m_valid, q_rows, -_FAR), axis=0)
    pos_hi = tl.max(tl.where(m_valid, q_pos, -_FAR), axis=0)

    # The keys some query of the tile may see lie in [first, last]: rows within the tile's,
    # positions at most its largest. (Packed prompts: the tile's prompts up to its last query.)
    first = seq_len
    last = -1
    for n0 in range(0, seq_len, SCAN):
        cols = n0 + tl.arange(0, SCAN)
        c_valid = cols < seq_len
        k_rows = tl.load(rows_base + cols * rows_stride_s, mask=c_valid, other=0).to(tl.int64)
        k_pos = tl.load(pos_base + cols * pos_stride_s, mask=c_valid, other=0).to(tl.int64)
        may = c_valid & (k_rows >= row_lo) & (k_rows <= row_hi) & (k_pos <= pos_hi)
        first = tl.minimum(first, tl.min(tl.where(may, cols, seq_len), axis=0))
        last = tl.maximum(last, tl.max(tl.where(may, cols, -1), axis=0))
    kv_end = last + 1
    kv_start = (first // BLOCK_N) * BLOCK_N  # whole tiles (none when no key: start >= end)

    cols_d = tl.arange(0, BLOCK_D)
    d_valid = cols_d < head_dim
    q = tl.load(q_ptr + b * q_stride_b + q_head * q_stride_h + offs_m[:, None] * q_stride_s + cols_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = k_ptr + b * k_stride_b + kv_head * k_stride_h
    v_base = v_ptr + b * v_stride_b + kv_head * v_stride_h
    m_i, l_i, acc = empty_attention(BLOCK_M, BLOCK_D)
    for n0 in range(kv_start, kv_end, BLOCK_N):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = cols_n < kv_end
        k_rows = tl.load(rows_base + cols_n * rows_stride_s, mask=n_valid, other=0).to(tl.int64)
        k_pos = tl.load(pos_base + cols_n * pos_stride_s, mask=n_valid, other=0).to(tl.int64)
        visible = (m_valid[:, None] & n_valid[None, :] & (q_rows[:, None] == k_rows[None, :])
                   & (k_pos[None, :] <= q_pos[:, None]))
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + cols_n[:, None] * k_stride_s + cols_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols_n[:, None] * v_stride_s + cols_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = attend_tile(q, k, v, visible, m_i, l_i, acc, scale, DOT_FP32, DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * out_stride_b + q_head * out_stride_h + offs_m[:, None] * out_stride_s + cols_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def prefill_attention_block_sizes(head_dim: int, element_size: int, block_m: int) -> dict[str, int]:
    """The head-dim block (a power of two, at least 16: the smallest matrix-instruction tile) and
    the query tile: the table's for 2-byte types, half of it in fp32, whose tiles take twice the
    shared memory (a 128-query fp32 tile with 2 stages of 64 keys is 192 KB, over an A100's 164)."""
    return dict(BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m if element_size < 4 else max(16, block_m // 2))


def _check_inputs(q, k, v, rows, positions) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"paiton prefill_attention: q [B, Hq, T, D] and k, v [B, Hkv, T, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, q_heads, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim or q_heads % k.shape[1]:
        raise ValueError(f"paiton prefill_attention: k, v {tuple(k.shape)} do not fit q {tuple(q.shape)} (batch, tokens, "
                         "head_dim, and query heads a multiple of KV heads)")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"paiton prefill_attention: q, k and v in one of float32/float16/bfloat16, got {q.dtype}/{k.dtype}/{v.dtype}")
    for name, index in (("rows", rows), ("positions", positions)):
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 2 or index.shape[1] != seq_len or index.shape[0] not in (1, batch):
            raise ValueError(f"paiton prefill_attention: {name} are int [B or 1, T] (B = {batch}, T = {seq_len}); got "
                             f"{index.dtype} {tuple(index.shape)}")


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    batch, q_heads, seq_len, head_dim = q.shape
    return q.new_empty(batch, seq_len, q_heads, head_dim).transpose(1, 2)


def _launch(q, k, v, rows, positions, scale, config=None):
    """`config`: the launch's keyword arguments; by default the lowering table's for the device."""
    _check_inputs(q, k, v, rows, positions)
    out = _empty_output(q)
    if out.numel() == 0:
        return out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, q_heads, seq_len, head_dim = q.shape
    if config is None:
        from paiton.backends.lowering import launch_config  # (lowering.py imports this module)

        config = launch_config("prefill_attention", detect_target(q.device), head_dim=head_dim,
                               element_size=q.element_size())
    index_strides = [s for t in (rows, positions) for s in ((t.stride(0) if t.shape[0] > 1 else 0), t.stride(1))]
    grid = (triton.cdiv(seq_len, config["BLOCK_M"]), batch * q_heads)
    with device_guard(q):
        _prefill_attention_kernel[grid](
            q, k, v, rows, positions, out,
            q_heads, seq_len, head_dim, float(scale),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *index_strides,
            out.stride(0), out.stride(1), out.stride(2),
            GROUP=q_heads // k.shape[1],
            DOT_FP32=is_interpreted(_prefill_attention_kernel),
            # fp32 models get fp32 products, as eager's SDPA computes them (Triton's default for
            # fp32 dots is TF32 on NVIDIA); other dtypes keep the backend's default.
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
            **config,
            **pdl_launch(q, _prefill_attention_kernel),
        )
    return out


@torch.library.custom_op("paiton::prefill_attention", mutates_args=())
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Causal attention within each packed prompt (a token sees the tokens of its own row at or
    before its position; module doc)."""
    return _launch(q, k, v, rows, positions, scale)


@prefill_attention.register_kernel("cpu")
def _prefill_attention_cpu(q, k, v, rows, positions, scale):
    if is_interpreted(_prefill_attention_kernel):
        return _launch(q, k, v, rows, positions, scale)
    _check_inputs(q, k, v, rows, positions)
    return _empty_output(q).copy_(prefill_attention_reference(q, k, v, rows, positions, scale))


@prefill_attention.register_fake
def _prefill_attention_fake(q, k, v, rows, positions, scale):
    _check_inputs(q, k, v, rows, positions)
    return _empty_output(q)

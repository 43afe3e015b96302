"""Decode attention over a static KV cache: a split-K ("flash-decoding") Triton kernel.

For each sequence b, query i and query head h::

    out[b, h, i] = softmax(scale * q[b, h, i] . k[b, h // G, j] over j in valid(b, i)) @ v[b, h // G, j]
    valid(b, i)  = { j < L : j <= positions[b, i]  (if positions are given)
                             and kv_mask[b, i, j]   (if a mask is given) }

with G = query heads per KV head (grouped-query attention). What the kernel does not do is
what makes decoding cheap:
  * it never materializes repeated KV heads (transformers' repeat_kv copies the whole cache
    G times a step): each program loads a KV tile once for its G query heads;
  * it reads only the filled part of the cache: with positions, a sequence's loop stops at
    its largest query position, read on the device (no host sync, so it runs inside CUDA
    graphs), and per-sequence positions make ragged batches work; with only a mask (as
    transformers' generate passes it), a first pass over the mask bytes bounds the loop to
    the keys from the first to the last that some query attends to, so the unfilled cache and
    left padding cost their mask bytes (a hole inside that range is read, as eager reads it);
  * it splits the sequence across programs when (batch x KV heads) alone would leave most of
    the GPU idle, then combines the partial softmaxes (log-sum-exp weighted) in a second pass
    (or, at up to the lowering table's `combine_in_split` splits, in the last split program to
    finish);
    with positions, the splits divide each sequence's filled part (read on the device), so a
    long cache that holds a short context still spreads its keys over every split.

Op: paiton::decode_attention(q, k_cache, v_cache, positions, kv_mask, scale) -> out
    q [B, Hq, Sq, D] (any layout with unit stride over D), caches [B, Hkv, L, D],
    positions int [B, Sq], [1, Sq] or [Sq] (shared by the batch), or None (no position bound),
    kv_mask bool [B, L] (shared by the queries), [B, Sq, L] (one row per query), or None;
    a mask's batch and query dims may be 1 (broadcast).
    out [B, Hq, Sq, D], laid out as [B, Sq, Hq, D] in memory (as CUDA's SDPA kernels return
    it, so `out.transpose(1, 2)` is contiguous).
A query with no valid key gets zeros (eager SDPA would give NaN).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from paiton.backends.target import detect_target
from paiton.fusion import split_k
from paiton.fusion.pdl import pdl_launch, wait_for_previous_kernel
from paiton.fusion.rms_norm import SUPPORTED_DTYPES
from paiton.fusion.triton_utils import device_guard, is_interpreted


def decode_attention_reference(q, k_cache, v_cache, positions, kv_mask, scale):
    """The definition above, in float64 math (repeat_kv + masked softmax), cast to q.dtype."""
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // k_cache.shape[1]
    k = k_cache.double().repeat_interleave(group, dim=1)
    v = v_cache.double().repeat_interleave(group, dim=1)
    scores = scale * q.double() @ k.transpose(-1, -2)  # [B, Hq, Sq, L]
    valid = torch.ones(batch, q_len, k.shape[2], dtype=torch.bool, device=q.device)  # [B, Sq, L]
    if positions is not None:
        kv_index = torch.arange(k.shape[2], device=q.device)
        valid = valid & (kv_index[None, None, :] <= positions.expand(batch, q_len)[:, :, None])
    if kv_mask is not None:
        valid = valid & (kv_mask[:, None, :] if kv_mask.dim() == 2 else kv_mask)
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without a valid key: zeros
    return (probs @ v).to(q.dtype)


@triton.jit
def _valid_keys(cols_n, kv_end, positions, row_valid, mask_rows, mask_stride_n, HAS_MASK: tl.constexpr):
    """[BLOCK_M, len(cols_n)]: the keys `cols_n` each row attends to: before kv_end, at or
    before the row's query position, and kept by the mask."""
    valid = row_valid[:, None] & (cols_n < kv_end)[None, :] & (cols_n[None, :] <= positions[:, None])
    if HAS_MASK:
        keep = tl.load(mask_rows[:, None] + cols_n[None, :] * mask_stride_n, mask=valid, other=0)
        valid = valid & (keep != 0)
    return valid


@triton.jit
def empty_attention(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flash attention's state before the first KV tile: each row's running max (-inf), sum and
    unnormalized output (zeros)."""
    return (tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
            tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32))


@triton.jit
def attend_tile(q, k, v, valid, m_i, l_i, acc, scale, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One KV tile of flash attention's online softmax: the rows' running max `m_i`, sum `l_i` and
    unnormalized output `acc` [rows, D] after the keys of k/v [BLOCK_N, D] that `valid` [rows,
    BLOCK_N] keeps, for the queries q [rows, D]. DOT_FP32: the products in fp32, for the CPU
    interpreter, whose dot is wrong on bf16 operands (see ENV_NOTES)."""
    if DOT_FP32:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    scores = tl.where(valid, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A row with no valid key yet keeps m = -inf; shift by 0 there to avoid inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, mask_ptr, part_out_ptr, part_lse_ptr, out_ptr, count_ptr,
    n_kv_heads, q_len, head_dim, cache_len, scale,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_n,
    v_stride_b, v_stride_h, v_stride_n,
    pos_stride_b, pos_stride_s, mask_stride_b, mask_stride_s, mask_stride_n,
    split_size, n_splits,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    HAS_POSITIONS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr = False, SPLIT_FILLED: tl.constexpr = True, COMBINE: tl.constexpr = False,
):
    """Program (b * Hkv + kv head, split): the G query heads x Sq queries that share the KV
    head, over this split's part of the cache (of its filled part, with positions). Writes
    the split's normalized output and log-sum-exp per row to the partials [B, Hq, Sq, n_splits, (D)].
    PDL: launched programmatically (fusion/pdl.py). SPLIT_FILLED (with positions): the splits
    divide the filled part (below); False: splits of `split_size` over the cache, bounded by the
    last position (the layout before 2026-12-06, kept for bench/lowering_sweep.py to time).
    COMBINE: the KV head's last split to arrive (count_ptr: a counter per program row, left at
    0; fusion/split_k.py's protocol) combines the splits into out_ptr itself, as the combine
    kernel would: one launch a layer instead of two (one split: its output is the result)."""
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // n_kv_heads).to(tl.int64)
    kv_head = (pid % n_kv_heads).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)  # row = g * q_len + i
    row_valid = rows < GROUP * q_len
    q_head = kv_head * GROUP + rows // q_len
    q_index = rows % q_len
    cols_d = tl.arange(0, BLOCK_D)
    d_valid = cols_d < head_dim

    if HAS_POSITIONS:
        positions = tl.load(pos_ptr + b * pos_stride_b + q_index * pos_stride_s, mask=row_valid, other=-1)
        # Keys after the sequence's last query position are the unfilled cache: not read.
        filled = tl.minimum(tl.max(positions, axis=0) + 1, cache_len)
    else:  # no position bound: every key is in bound, the mask alone decides
        positions = tl.zeros([BLOCK_M], dtype=tl.int32) + (cache_len - 1)
        filled = cache_len
    if HAS_POSITIONS and SPLIT_FILLED:
        # The splits divide the filled part, read here (whole KV tiles each), not the cache: with
        # a cache longer than what it holds (a server's max length, HF's StaticCache), splits of
        # the cache's length left the keys to the first split or two, and those programs ran
        # every tile in turn while the rest had none (Qwen3-32B at batch 32 over a 1472 cache,
        # 150-400 keys filled: 2 splits of 768, one of them working).
        split_width = tl.cdiv(tl.cdiv(filled, n_splits), BLOCK_N) * BLOCK_N
    else:  # splits of the cache (the mask-only path, and SPLIT_FILLED=False)
        split_width = split_size
    kv_start = split * split_width
    kv_end = tl.minimum(kv_start + split_width, filled)
    mask_rows = mask_ptr + b * mask_stride_b + q_index * mask_stride_s  # row g * Sq + i reads query i's mask row
    if HAS_MASK and not HAS_POSITIONS:
        # A first pass over the split's mask bytes alone: the loop below then covers only the
        # keys from the first to the last that some row attends to, so the unfilled rest of a
        # static cache and the left padding cost their mask bytes, neither K/V reads nor
        # products. (H100, bf16, Qwen3-8B heads, cache 4096 filled 1024, batch 32: 200 us when
        # the loop ran over every tile with masked-off K/V loads, 77-80 us with this pass, 57 us
        # for the same step bounded by positions.) Steps of 8 tiles: a scan of 1-tile steps
        # took 105 us. With positions the loop is bounded already; the scan made it slower.
        # The scan reads one mask row per query (BLOCK_Q rows), not one per (query head,
        # query) row as the loop below does: the G heads of a query share its row, and a scan
        # over all BLOCK_M rows (G x Sq, at least 16) did 16 times the work at Sq = 1, on the
        # step's critical path (H200, Qwen3-8B, batch 1, ~200 keys in a cache of 246: 6.3 us a
        # layer in the bundled loop, 3.6 us bounded by positions; bench/results/NOTES.md).
        queries = tl.arange(0, BLOCK_Q)
        query_rows = mask_ptr + b * mask_stride_b + queries * mask_stride_s
        first = kv_end
        last = kv_start - 1
        for n0 in range(kv_start, kv_end, 8 * BLOCK_N):
            cols_n = n0 + tl.arange(0, 8 * BLOCK_N)
            keep = tl.load(query_rows[:, None] + cols_n[None, :] * mask_stride_n,
                           mask=(queries < q_len)[:, None] & (cols_n < kv_end)[None, :], other=0)
            attended = tl.max(keep.to(tl.int32), axis=0) != 0
            first = tl.minimum(first, tl.min(tl.where(attended, cols_n, kv_end), axis=0))
            last = tl.maximum(last, tl.max(tl.where(attended, cols_n, -1), axis=0))
        kv_start = first
        kv_end = last + 1  # <= kv_start when no key is attended to: no iteration

    q = tl.load(
        q_ptr + b * q_stride_b + q_head[:, None] * q_stride_h + q_index[:, None] * q_stride_s + cols_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :], other=0.0,
    )
    k_base = k_ptr + b * k_stride_b + kv_head * k_stride_h
    v_base = v_ptr + b * v_stride_b + kv_head * v_stride_h
    m_i, l_i, acc = empty_attention(BLOCK_M, BLOCK_D)
    for n0 in range(kv_start, kv_end, BLOCK_N):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        valid = _valid_keys(cols_n, kv_end, positions, row_valid, mask_rows, mask_stride_n, HAS_MASK)  # [BLOCK_M, BLOCK_N]
        # K/V loads do not wait on the mask: predicating them on it (to skip a hole inside the
        # attended range, which generate's masks do not have) made the mask-only step 1.6x slower
        # on the H100 (batch 8, as above: 56 us against 34 us).
        kv_mask_2d = (cols_n < kv_end)[:, None] & d_valid[None, :]
        k = tl.load(k_base + cols_n[:, None] * k_stride_n + cols_d[None, :], mask=kv_mask_2d, other=0.0)
        v = tl.load(v_base + cols_n[:, None] * v_stride_n + cols_d[None, :], mask=kv_mask_2d, other=0.0)
        m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, scale, DOT_FP32, DOT_PRECISION)

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    # Output memory is [B, Sq, Hq, D], as the combine kernel writes it.
    out_row = (b * q_len + q_index) * (GROUP * n_kv_heads) + q_head
    if COMBINE and n_splits == 1:  # the one split is the output
        tl.store(out_ptr + out_row[:, None] * head_dim + cols_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & d_valid[None, :])
    else:
        part_row = ((b * GROUP * n_kv_heads + q_head) * q_len + q_index) * n_splits + split  # [B, Hq, Sq, n_splits]
        tl.store(part_lse_ptr + part_row, lse, mask=row_valid)
        tl.store(part_out_ptr + part_row[:, None] * head_dim + cols_d[None, :], out, mask=row_valid[:, None] & d_valid[None, :])
        if COMBINE:
            tl.debug_barrier()  # every thread's partials are written before the counter says so
            arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
            if arrived == n_splits - 1:  # the last split: combine them all (read past L1: other programs wrote them)
                first_row = part_row - split
                lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
                for s in range(0, n_splits):
                    lse_s = tl.load(part_lse_ptr + first_row + s, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
                    lse_max = tl.maximum(lse_max, lse_s)
                shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
                total = tl.zeros([BLOCK_M], dtype=tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
                for s in range(0, n_splits):  # in split order: the bits do not depend on which split came last
                    lse_s = tl.load(part_lse_ptr + first_row + s, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
                    weight = tl.where(lse_s == float("-inf"), 0.0, tl.exp(lse_s - shift))
                    part = tl.load(part_out_ptr + (first_row + s)[:, None] * head_dim + cols_d[None, :],
                                   mask=row_valid[:, None] & d_valid[None, :], other=0.0, cache_modifier=".cg")
                    acc += part * weight[:, None]
                    total += weight
                combined = acc / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(out_ptr + out_row[:, None] * head_dim + cols_d[None, :], combined.to(out_ptr.dtype.element_ty),
                         mask=row_valid[:, None] & d_valid[None, :])
                tl.atomic_xchg(count_ptr + pid, 0)  # ready for the next launch


@triton.jit
def _decode_attention_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, n_q_heads, q_len, head_dim, n_splits,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (b, h, i): the log-sum-exp weighted sum of the splits' outputs. PDL: launched
    programmatically (fusion/pdl.py)."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Sq + i
    splits = tl.arange(0, BLOCK_SPLITS)
    cols_d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + row * n_splits + splits, mask=splits < n_splits, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weights = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max)))
    parts = tl.load(
        part_out_ptr + (row * n_splits + splits[:, None]) * head_dim + cols_d[None, :],
        mask=(splits[:, None] < n_splits) & (cols_d[None, :] < head_dim), other=0.0,
    )
    total = tl.sum(weights, axis=0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    # Output memory is [B, Sq, Hq, D].
    b = row // (n_q_heads * q_len)
    h = (row // q_len) % n_q_heads
    i = row % q_len
    tl.store(out_ptr + ((b * q_len + i) * n_q_heads + h) * head_dim + cols_d, out.to(out_ptr.dtype.element_ty),
             mask=cols_d < head_dim)


# A KV tile of 64 positions: at head_dim 128 in bf16, 16 KB of K and 16 KB of V per step.
# The NVIDIA tables' tile (backends/lowering.py); the CPU interpreter's too.
DECODE_BLOCK_N = 64


def decode_attention_block_sizes(group: int, q_len: int, head_dim: int) -> dict[str, int]:
    """The query-row and head-dim blocks: all G x Sq rows that share a KV head in one block of
    at least 16 rows (the smallest matrix-instruction tile), head_dim padded to a power of two;
    and the Sq queries' block (their mask rows, for the mask scan)."""
    return dict(BLOCK_M=max(16, triton.next_power_of_2(group * q_len)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_Q=triton.next_power_of_2(q_len))


def split_kernel_combines(n_splits: int, config: dict) -> bool:
    """Whether a launch's split kernel combines its splits itself (no combine kernel): at up to
    the configuration's `combine_in_split` splits. Its last program sums the splits in turn, so
    many splits are the combine kernel's, whose programs load them at once (H100, Qwen3-32B
    heads, 150-400 of 1472 keys: batch 32, 2 splits, 18.8 us against the two kernels' 21.0;
    batch 1, 23 splits, 15.4 us against 9.0)."""
    return n_splits <= config.get("combine_in_split", 0)


def decode_attention_splits(batch_kv_heads: int, cache_len: int, multiprocessors: int, block_n: int = DECODE_BLOCK_N) -> int:
    """How many sequence splits: enough programs for two waves over the GPU, but no split
    shorter than one KV tile."""
    wanted = triton.cdiv(2 * multiprocessors, max(batch_kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(cache_len, block_n)))


def default_split_layout(batch_kv_heads: int, cache_len: int, multiprocessors: int, block_n: int) -> tuple[int, int]:
    """(split size, number of splits) of a launch that does not name its split count: the
    launcher's, and what the lowering table, the AOT checks and the sweep report for it."""
    wanted = decode_attention_splits(batch_kv_heads, cache_len, multiprocessors, block_n)
    return decode_attention_split_layout(cache_len, wanted, block_n)


def decode_attention_split_layout(cache_len: int, n_splits: int, block_n: int) -> tuple[int, int]:
    """(split size, number of splits) for about `n_splits` splits that start at tile
    boundaries, so that each split's loads stay tile-aligned."""
    split_size = triton.cdiv(triton.cdiv(cache_len, n_splits), block_n) * block_n
    return split_size, triton.cdiv(cache_len, split_size)


def _check_inputs(q, k_cache, v_cache, positions, kv_mask) -> None:
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"paiton decode_attention: q [B, Hq, Sq, D] and caches [B, Hkv, L, D] of one shape; got q {tuple(q.shape)}, "
            f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    batch, q_heads, q_len, head_dim = q.shape
    cache_len = k_cache.shape[2]
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim or q_heads % k_cache.shape[1]:
        raise ValueError(
            f"paiton decode_attention: caches {tuple(k_cache.shape)} do not fit q {tuple(q.shape)} (batch, head_dim, and "
            "query heads a multiple of KV heads)"
        )
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"paiton decode_attention: q and caches in one of float32/float16/bfloat16, got {q.dtype}/{k_cache.dtype}")
    if positions is not None:
        if positions.dtype not in (torch.int32, torch.int64) or positions.dim() not in (1, 2) or positions.shape[-1] != q_len:
            raise ValueError(
                f"paiton decode_attention: positions are int [B, Sq] or [Sq] (Sq = {q_len}), or None; got {positions.dtype} "
                f"{tuple(positions.shape)}"
            )
        if positions.dim() == 2 and positions.shape[0] not in (1, batch):
            raise ValueError(f"paiton decode_attention: positions batch {positions.shape[0]} does not match q's {batch}")
    if kv_mask is not None:
        shape = tuple(kv_mask.shape)
        fits = (
            kv_mask.dim() in (2, 3) and shape[-1] == cache_len and shape[0] in (1, batch)
            and (kv_mask.dim() == 2 or shape[1] in (1, q_len))
        )
        if kv_mask.dtype != torch.bool or not fits:
            raise ValueError(
                f"paiton decode_attention: kv_mask is bool [B, L] or [B, Sq, L] (B = {batch}, Sq = {q_len}, L = {cache_len}; "
                f"B and Sq may be 1 to broadcast), or None; got {kv_mask.dtype} {shape}"
            )


def _mask_strides(kv_mask: torch.Tensor) -> tuple[int, int, int]:
    """Element strides of a [B, L] or [B, Sq, L] mask over (batch, query, key); 0 where it
    broadcasts (a dim of 1, or no query dim)."""
    if kv_mask.dim() == 2:
        kv_mask = kv_mask[:, None]
    batch_stride, query_stride = (0 if size == 1 else stride for size, stride in zip(kv_mask.shape[:2], kv_mask.stride()[:2]))
    return batch_stride, query_stride, kv_mask.stride(2)


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    batch, q_heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, q_heads, head_dim).transpose(1, 2)


def _launch(q, k_cache, v_cache, positions, kv_mask, scale, n_splits=None, config=None, split_lse=None):
    """`n_splits`: how many programs share one sequence's keys (default: two waves over the
    chip). `config`: the launch's keyword arguments, the split kernel's and the combine
    kernel's `combine_num_warps` and `combine_in_split` (up to that many splits, the split kernel
    combines them: no combine kernel; 0: never); by default the lowering table's for the device.
    `split_lse`: a list that gets the splits' log-sum-exps [B, Hq, Sq, n_splits] (-inf: the split
    read no key), for tests of how the keys are divided (the two kernels then run)."""
    _check_inputs(q, k_cache, v_cache, positions, kv_mask)
    out = _empty_output(q)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    if positions is not None and positions.dim() == 1:
        positions = positions[None]
    pos_strides = (positions.stride(0) if positions.shape[0] > 1 else 0, positions.stride(1)) if positions is not None else (0, 0)
    mask_strides = _mask_strides(kv_mask) if kv_mask is not None else (0, 0, 0)
    group = q_heads // kv_heads
    target = detect_target(q.device)
    if config is None:
        from paiton.backends.lowering import launch_config  # (lowering.py imports this module)

        config = launch_config("decode_attention", target, group=group, q_len=q_len, head_dim=head_dim)
    config = dict(config)
    block_n = config["BLOCK_N"]
    if n_splits is None:
        split_size, n_splits = default_split_layout(batch * kv_heads, cache_len, target.multiprocessors, block_n)
    else:
        split_size, n_splits = decode_attention_split_layout(cache_len, n_splits, block_n)
    combines = split_kernel_combines(n_splits, config) and split_lse is None
    combine_num_warps = config.pop("combine_num_warps")
    config.pop("combine_in_split", None)
    part_out = torch.empty(batch, q_heads, q_len, n_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, q_heads, q_len, n_splits, dtype=torch.float32, device=q.device)
    # The split kernel combines where counters are to be had (not before they exist inside a
    # CUDA graph capture: then the combine kernel does). A caller that asks for the splits'
    # log-sum-exps gets the two kernels, which write them all (one combining split writes none).
    counters = split_k.tile_counters(q.device, batch * kv_heads) if combines else None
    with device_guard(q):
        _decode_attention_split_kernel[(batch * kv_heads, n_splits)](
            # An absent positions/mask tensor is never read (constexpr flags); q stands in for its pointer,
            # and out for the counters' without COMBINE.
            q, k_cache, v_cache, q if positions is None else positions, q if kv_mask is None else kv_mask, part_out, part_lse,
            out, out if counters is None else counters,
            kv_heads, q_len, head_dim, cache_len, float(scale),
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *pos_strides, *mask_strides,
            split_size, n_splits,
            GROUP=group, HAS_POSITIONS=positions is not None, HAS_MASK=kv_mask is not None,
            DOT_FP32=is_interpreted(_decode_attention_split_kernel),
            # fp32 models get fp32 products, as eager's SDPA computes them: Triton's default for
            # fp32 dots is TF32 on NVIDIA (seen on an H100: 2% relative error against eager).
            # Other dtypes keep the backend's default (AMD's gfx950 rejects an explicit "tf32").
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
            COMBINE=counters is not None,
            **config,
            **pdl_launch(q, _decode_attention_split_kernel),
        )
        if counters is None:
            _decode_attention_combine_kernel[(batch * q_heads * q_len,)](
                part_out, part_lse, out, q_heads, q_len, head_dim, n_splits,
                BLOCK_SPLITS=triton.next_power_of_2(n_splits), BLOCK_D=config["BLOCK_D"], num_warps=combine_num_warps,
                **pdl_launch(q, _decode_attention_combine_kernel),
            )
    if split_lse is not None:
        split_lse.append(part_lse)
    return out


@torch.library.custom_op("paiton::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor | None,
    kv_mask: torch.Tensor | None, scale: float,
) -> torch.Tensor:
    """Attention of a few query tokens per sequence over a static KV cache, bounded by query
    positions (causal) and/or a boolean mask (module doc)."""
    return _launch(q, k_cache, v_cache, positions, kv_mask, scale)


@decode_attention.register_kernel("cpu")
def _decode_attention_cpu(q, k_cache, v_cache, positions, kv_mask, scale):
    if is_interpreted(_decode_attention_split_kernel):
        return _launch(q, k_cache, v_cache, positions, kv_mask, scale)
    _check_inputs(q, k_cache, v_cache, positions, kv_mask)
    out = _empty_output(q)
    return out.copy_(decode_attention_reference(q, k_cache, v_cache, positions, kv_mask, scale))


@decode_attention.register_fake
def _decode_attention_fake(q, k_cache, v_cache, positions, kv_mask, scale):
    _check_inputs(q, k_cache, v_cache, positions, kv_mask)
    return _empty_output(q)


def default_scale(head_dim: int) -> float:
    """SDPA's default softmax scale."""
    return 1.0 / math.sqrt(head_dim)

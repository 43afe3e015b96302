"""QK-norm + RoPE and the KV-cache write after it -> one kernel that writes the cache slots.

After the QK-norm + RoPE pass, a step over a static KV cache reads (transformers' StaticCache
writes with `index_copy_`, a hand-written loop with `index_put_`; both reach the ATen graph as
a functional `index_put` plus a copy back into the cache input at the end)::

    q_rot, k_rot = paiton.qk_norm_rope(q, k, q_w, k_w, cos, sin, eps)
    k_all = index_put(k_cache, [None, None, slots], k_rot)        # k_rot [B, Hkv, S, D]
    v_all = index_put(v_cache, [None, None, slots], v)
    attention(q_rot, k_all, v_all, ...)                           # paiton.decode_attention or SDPA
    ... copy_(k_cache, k_all); copy_(v_cache, v_all)               # the mutation, at the end

or, in a continuous batch (models/engine.SlotCache: every row holds a sequence of its own
length, so each writes at its own positions [B, S])::

    k_all = index_put(k_cache, [arange(B)[:, None], None, positions], k_rot.transpose(1, 2))

Fused (auto_functionalized: the graph stays functional; Inductor's reinplacing turns it into
the in-place kernel call and drops the copies back, as for any mutating custom op)::

    q_rot, k_all, v_all = auto_functionalized(paiton.qk_norm_rope_cache, q, k, v, q_w, k_w,
                                              cos, sin, eps, k_cache, v_cache, slots)

so the rotated k is written once, straight into its cache slot, v is copied by the same
kernel, and no [B, Hkv, S, D] k is materialized.

Matched only when: both writes are plain (`accumulate=False`) index_puts along the sequence
dim with one index tensor `slots`, [S] (shared), or [B, S] with sequence b written to row b
(the row index is arange(B)); the caches are graph inputs (a cache made inside the
graph would be cloned, not written in place) used by nothing but their write and the copy
back; the v write is the one whose result the same attention node reads as its values (found
by walking from attention's key and value arguments through views and repeat_kv). Anything
else (a cache written at other indices for k and v, a cache read before the write) is left
alone.
"""

from __future__ import annotations

import operator

import torch

from paiton.passes.decode_attention import SDPA_OPS, bound_args, is_arange, is_call, val
from paiton.passes.matcher_utils import same_size as same
from paiton.passes.paiton_pass import PaitonPass

aten = torch.ops.aten

# Ops between a cache write and the attention that reads it: views, and repeat_kv's
# unsqueeze/expand/clone/reshape.
GLUE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.expand.default, aten.clone.default, aten.slice.Tensor, aten.permute.default, aten.alias.default,
}


def _attention_nodes():
    return {torch.ops.paiton.decode_attention.default, *SDPA_OPS}


def _source_write(node):
    """The index_put that `node` (an attention key/value argument) is a view or repeat of."""
    for _ in range(8):
        if is_call(node, aten.index_put.default):
            return node
        if not is_call(node, *GLUE_OPS):
            return None
        node = node.args[0]
    return None


def _reading_attention(write):
    """The attention node whose key is (a view or repeat of) `write`."""
    frontier, attention = [write], _attention_nodes()
    for _ in range(8):
        next_frontier = []
        for node in frontier:
            for user in node.users:
                if user.op == "call_function" and user.target in attention and _source_write(user.args[1]) is write:
                    return user
                if is_call(user, *GLUE_OPS):
                    next_frontier.append(user)
        frontier = next_frontier
    return None


VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default)


def _same_but_leading_ones(a, b) -> bool:
    """The shapes differ at most by leading size-1 dims (setitem views its value that way
    before index_put, which broadcasts it back)."""
    def strip(shape):
        shape = list(shape)
        while shape and shape[0] == 1:
            shape.pop(0)
        return shape

    return strip(a) == strip(b)


def _is_noop_view(node) -> bool:
    before, after = val(node.args[0]) if is_call(node, *VIEW_OPS) else None, val(node)
    return before is not None and after is not None and _same_but_leading_ones(before.shape, after.shape)


def _through_noop_views(node):
    """Follow single views that only add or drop leading size-1 dims (`cache[:, :, pos] = k`)."""
    while len(node.users) == 1 and _is_noop_view(next(iter(node.users))):
        node = next(iter(node.users))
    return node


def _before_noop_views(node):
    while _is_noop_view(node):
        node = node.args[0]
    return node


def _is_seq_major(node) -> bool:
    """`node` is x.transpose(1, 2) of a 4-D x: [B, H, S, D] -> [B, S, H, D] (a per-sequence
    write's value, as advanced indexing over rows and slots lays it out)."""
    if is_call(node, aten.permute.default):
        return list(node.args[1]) == [0, 2, 1, 3]
    if is_call(node, aten.transpose.int):
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2] and val(node) is not None and val(node).dim() == 4
    if is_call(node, *VIEW_OPS):  # with one token (or one head) the transpose moves no element: a view
        before, after = val(node.args[0]), val(node)
        if before is None or after is None or before.dim() != 4 or after.dim() != 4:
            return False
        b, h, s, d = before.shape
        return (same(h, 1) or same(s, 1)) and all(same(x, y) for x, y in zip(after.shape, (b, s, h, d)))
    return False


def _is_full_slice(node, length) -> bool:
    """slice(x, 0, 0 or None, end >= length, 1): `x[:]`, which Dynamo may leave in the graph."""
    if not is_call(node, aten.slice.Tensor):
        return False
    window = bound_args(node)
    return window["dim"] == 0 and window["start"] in (None, 0) and window["step"] == 1 \
        and (window["end"] in (None, 2**63 - 1) or same(window["end"], length))


def _is_row_index(node, batch) -> bool:
    """`node` is arange(batch)[:, None]: sequence b writes cache row b."""
    if not is_call(node, aten.unsqueeze.default) or node.args[1] not in (1, -1):
        return False
    node = node.args[0]
    while _is_full_slice(node, batch):
        node = node.args[0]
    return is_arange(node, batch)


def _written_value(write):
    """The [B, H, S, D] value an index_put cache write writes (the one before the per-sequence
    form's transpose and the views that drop its leading ones)."""
    value = write.args[2]
    if write.args[1][0] is not None and _is_seq_major(_before_noop_views(value)):
        return _before_noop_views(value).args[0]
    return value


def _cache_write(node, value, slots=None):
    """(cache, slots) if `node` writes `value` [B, Hkv, S, D] into a graph-input cache
    [B, Hkv, L, D] that nothing else reads, in one of two forms; else None:
      index_put(cache, [None, None, slots], value)                        slots [S]: shared
      index_put(cache, [arange(B)[:, None], None, slots], value.transpose(1, 2))
                                                   slots [B or 1, S]: each sequence's own
    (the second is `cache[rows, :, positions] = k.transpose(1, 2)`, a continuous batch's write:
    its rows hold sequences of different lengths)."""
    if not is_call(node, aten.index_put.default):
        return None
    if (len(node.args) > 3 and node.args[3]) or node.kwargs.get("accumulate", False):
        return None
    cache, indices = node.args[0], node.args[1]
    if not (isinstance(indices, (list, tuple)) and len(indices) == 3 and indices[1] is None):
        return None
    per_sequence = indices[0] is not None
    written = node.args[2]
    if per_sequence:
        written = _before_noop_views(written)  # value[0] when a row of one token is written
        if not (_is_seq_major(written) and written.args[0] is value):
            return None
    elif written is not value:
        return None
    index = indices[2]
    if slots is not None and index is not slots:
        return None
    cache_val, index_val, value_val = val(cache), val(index), val(value)
    if cache_val is None or index_val is None or value_val is None or cache.op != "placeholder":
        return None
    if index_val.dtype not in (torch.int32, torch.int64) or cache_val.dim() != 4:
        return None
    if per_sequence:
        if not _is_row_index(indices[0], cache_val.shape[0]) or index_val.dim() != 2:
            return None
        if not (same(index_val.shape[0], cache_val.shape[0]) or same(index_val.shape[0], 1)) \
                or not same(index_val.shape[1], value_val.shape[2]):
            return None
    elif index_val.dim() != 1:
        return None
    if index_val.device != cache_val.device:  # eager indexes a GPU cache with CPU positions; the kernel cannot
        return None
    if any(user is not node and not is_call(user, aten.copy_.default) for user in cache.users):
        return None
    return cache, index


def _write_of(value):
    """(the cache write of `value`, its only user, directly or through the per-sequence form's
    transpose and views; the nodes between), or (None, [])."""
    if len(value.users) != 1:
        return None, []
    user = next(iter(value.users))
    between = []
    if _is_seq_major(user):
        between.append(user)
        node = user
        while len(node.users) == 1 and _is_noop_view(next(iter(node.users))):
            node = next(iter(node.users))
            between.append(node)
        if len(node.users) != 1:
            return None, []
        user = next(iter(node.users))
    return (user, between) if _cache_write(user, value) is not None else (None, [])


class KVCacheWritePass(PaitonPass):
    name = "kv_cache_write"
    fused_op = "qk_norm_rope_cache"
    depends_on = ("paiton.fusion.qk_norm_rope", "paiton.passes.decode_attention")

    def apply(self, graph: torch.fx.Graph) -> int:
        import paiton.fusion.decode_attention  # noqa: F401  (the ops this pass looks for and makes)
        import paiton.fusion.qk_norm_rope  # noqa: F401

        rewritten = 0
        for node in list(graph.nodes):
            if is_call(node, torch.ops.paiton.qk_norm_rope.default) and self._rewrite(graph, node):
                rewritten += 1
        return rewritten

    def _rewrite(self, graph: torch.fx.Graph, rope: torch.fx.Node) -> bool:
        outputs = {user.args[1]: user for user in rope.users if user.target is operator.getitem}
        if len(outputs) != 2 or len(rope.users) != 2:
            return False
        # The pattern is symmetric in q and k: whichever output is written to a cache is k.
        for k_side in (1, 0):
            k_value = _through_noop_views(outputs[k_side])
            k_write, k_between = _write_of(k_value)
            if k_write is not None:
                break
        else:
            return False
        k_out = outputs[k_side]
        k_cache, slots = _cache_write(k_write, k_value)
        attention = _reading_attention(k_write)
        if attention is None:
            return False
        v_write = _source_write(attention.args[2])
        if v_write is None or v_write is k_write or len(v_write.args[1]) != 3:
            return False
        found = _cache_write(v_write, _written_value(v_write), slots)
        v = _before_noop_views(_written_value(v_write))
        if found is None:
            return False
        v_cache = found[0]
        k_val, v_val, kc_val, vc_val = val(k_out), val(v), val(k_cache), val(v_cache)
        if v_val.shape != k_val.shape or v_val.dtype != k_val.dtype or kc_val.shape != vc_val.shape:
            return False
        # index_put broadcasts its value (a batch-1 k into a batch-B cache); the kernel does not.
        if kc_val.shape[:2] != k_val.shape[:2] or kc_val.shape[3] != k_val.shape[3]:
            return False
        if kc_val.dtype != k_val.dtype or vc_val.dtype != k_val.dtype or kc_val.stride(-1) != 1 or vc_val.stride(-1) != 1:
            return False

        q_side = 1 - k_side
        q, k, weights, cos, sin, eps = rope.args[q_side], rope.args[k_side], rope.args[2:4], *rope.args[4:7]
        kwargs = dict(q=q, k=k, v=v, q_weight=weights[q_side], k_weight=weights[k_side], cos=cos, sin=sin,
                      eps=eps, k_cache=k_cache, v_cache=v_cache, slots=slots)
        op = torch.ops.paiton.qk_norm_rope_cache.default
        # Inserted at the k write. If v is defined later (the graph's order is free there), the
        # manager's stable topological sort, run after every pass that rewrote, moves the op
        # after it, and q's users after the op.
        with graph.inserting_before(k_write):
            fused = graph.call_function(torch.ops.higher_order.auto_functionalized, (op,), kwargs)
            results = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
        fake_kwargs = {name: val(a) if isinstance(a, torch.fx.Node) else a for name, a in kwargs.items()}
        with val(q).fake_mode:
            fused.meta["val"] = torch.ops.higher_order.auto_functionalized(op, **fake_kwargs)
        for i, result in enumerate(results):
            result.meta["val"] = fused.meta["val"][i]
        for old, new in ((outputs[q_side], results[0]), (k_write, results[1]), (v_write, results[2])):
            new.meta.update({key: value for key, value in old.meta.items() if key != "val"})
            old.replace_all_uses_with(new)
        k_views = []  # between k's output and its write, last first
        node = k_value
        while node is not k_out:
            k_views.append(node)
            node = node.args[0]
        v_between, node = [], v_write.args[2]
        while node is not _written_value(v_write):
            v_between.append(node)
            node = node.args[0]
        for node in (k_write, v_write, *reversed(k_between), *k_views, outputs[0], outputs[1], rope):
            graph.erase_node(node)
        for node in v_between:  # the transpose to the write's layout, if nothing else reads it
            if not node.users:
                graph.erase_node(node)
        return True


"""A static KV cache's per-layer position counters: read by the cache-write kernel, advanced by one foreach.

transformers' StaticCache keeps one 0-dim int counter per layer (`StaticLayer.cumulative_length`)
and, in every layer's `update`, writes at `arange(S) + counter` and advances the counter. After
the KV-cache write pass a decode step's ATen graph holds, per layer::

    slots = add(iota(S), counter_i)                         # an index tensor, made per layer
    ... qk_norm_rope_cache(..., slots=slots) ...
    advanced_i = add(counter_i, S)
    ... copy_(counter_i, advanced_i)                         # the mutation, at the end

Inductor cannot fuse these tiny pointwise ops with the custom ops around them, so each layer
pays one or two kernel launches (and their gaps) for a few integers: ~48 launches per Qwen3-8B
step, 0.05 ms of kernels on an H200 (bench/results/NOTES.md). Rewritten::

    ... qk_norm_rope_cache(..., slots=counter_i) ...         # a 0-dim start: the kernel adds s
    advanced = _foreach_add.Scalar([counter_0, ..., counter_n], S)   # after the last read
    ... copy_(counter_i, advanced[i])

The slot index tensors disappear (the cache-write kernel reads the counter and adds the token's
index itself), and Inductor turns the foreach plus its copies back into one in-place
`_foreach_add_`, one kernel for every counter on a GPU (as it does for an optimizer's steps).
Measured on an H200 (Qwen3-8B, batch 1): 378 -> 344 launches and -64 us per decode step.

Rewritten, with the count reporting each: (1) a cache write whose slots are `arange(S) + c`
(iota from 0, step 1) with `c` a 0-dim int tensor; (2) counters that are 0-dim int graph inputs
advanced in place by the same int (`copy_(c, add(c, k))`, the add used only by the copy),
when two or more of them are, placed after every other read of those counters. Left alone:
slots from any other index tensor (a hand-written loop's positions), a counter on another device
than its slots, a counter advanced by a tensor or read after its advance, a lone counter
(nothing to merge).
"""

from __future__ import annotations

import operator

import torch

from paiton.passes.decode_attention import is_call, val
from paiton.passes.paiton_pass import PaitonPass

aten, prims = torch.ops.aten, torch.ops.prims
INT_DTYPES = (torch.int32, torch.int64)


def _is_zero_dim_int(node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype in INT_DTYPES


def _is_arange_from_zero(node) -> bool:
    """iota(n, start=0, step=1) (or arange(n)) of ints: 0, 1, ..., n - 1."""
    if val(node) is None or val(node).dtype not in INT_DTYPES:
        return False
    if is_call(node, prims.iota.default):
        return node.kwargs.get("start", 0) == 0 and node.kwargs.get("step", 1) == 1
    if is_call(node, aten.arange.default):
        return True
    if is_call(node, aten.arange.start, aten.arange.start_step):
        return node.args[0] == 0 and (node.args[2] if len(node.args) > 2 else 1) == 1
    return False


def start_of_consecutive_slots(slots):
    """The 0-dim counter `c` if `slots` is `arange(S) + c` (either order, alpha 1) with `c` on
    the slots' device, else None. (A 0-dim CPU tensor adds to a GPU arange in eager, but the
    kernel cannot read it.)"""
    if not is_call(slots, aten.add.Tensor) or len(slots.args) != 2 or slots.kwargs.get("alpha", 1) != 1:
        return None
    a, b = slots.args
    for arange, start in ((a, b), (b, a)):
        if _is_arange_from_zero(arange) and _is_zero_dim_int(start) and val(slots) is not None \
                and val(start).device == val(slots).device:
            return start
    return None


def _is_int_step(step) -> bool:
    """A Python int, or a graph value that is a symbolic int (a prefill's dynamic length)."""
    if isinstance(step, torch.fx.Node):
        return isinstance(val(step), torch.SymInt)
    return isinstance(step, int) and not isinstance(step, bool)


def _advance(copy):
    """(counter, step, add node) if `copy` is copy_(c, add(c, step)): c a 0-dim int graph input,
    step an int (or symbolic int), the add used by nothing else; else None."""
    if not is_call(copy, aten.copy_.default) or len(copy.args) != 2:
        return None
    counter, added = copy.args
    if counter.op != "placeholder" or not _is_zero_dim_int(counter) or not is_call(added, aten.add.Tensor):
        return None
    if len(added.args) != 2 or added.args[0] is not counter or added.kwargs.get("alpha", 1) != 1:
        return None
    step = added.args[1]
    if not _is_int_step(step) or len(added.users) != 1:
        return None
    if val(added) is None or val(added).dtype != val(counter).dtype:
        return None
    return counter, step, added


class CacheCountersPass(PaitonPass):
    name = "cache_counters"
    fused_op = None  # the cache-write op is the KV-cache write pass's; the foreach is Inductor's
    depends_on = ("paiton.fusion.qk_norm_rope", "paiton.passes.decode_attention")

    def apply(self, graph: torch.fx.Graph) -> int:
        import paiton.fusion.qk_norm_rope  # noqa: F401  (the op this pass looks for)

        return self._read_counters_in_cache_writes(graph) + self._advance_counters_together(graph)

    def _read_counters_in_cache_writes(self, graph: torch.fx.Graph) -> int:
        rewritten = 0
        for node in graph.nodes:
            if not (is_call(node, torch.ops.higher_order.auto_functionalized)
                    and node.args[0] is torch.ops.paiton.qk_norm_rope_cache.default):
                continue
            start = start_of_consecutive_slots(node.kwargs.get("slots"))
            if start is None:
                continue
            node.kwargs = {**node.kwargs, "slots": start}
            # Inductor lays a custom op's arguments out as eager saw them: those were the old ones.
            node.meta.pop("eager_input_vals", None)
            rewritten += 1
        return rewritten

    def _advance_counters_together(self, graph: torch.fx.Graph) -> int:
        order = {node: i for i, node in enumerate(graph.nodes)}
        groups: dict[tuple, list] = {}
        for node in graph.nodes:
            found = _advance(node)
            if found is not None:
                counter, step, added = found
                groups.setdefault((step, val(counter).dtype, val(counter).device), []).append((counter, added, node))
        rewritten = 0
        for (step, _, _), members in groups.items():
            # The merged advance goes before the first copy back; a counter read after that point
            # (besides its own copy) would see the advance too early: it stays as it is.
            first_copy = min((copy for _, _, copy in members), key=order.get)
            members = [(c, a, copy) for c, a, copy in members
                       if all(order[user] < order[first_copy] or user is a or user is copy for user in c.users)]
            if len(members) < 2:
                continue
            counters = [c for c, _, _ in members]
            with graph.inserting_before(first_copy):
                advanced = graph.call_function(aten._foreach_add.Scalar, (counters, step))
                items = [graph.call_function(operator.getitem, (advanced, i)) for i in range(len(members))]
            with val(counters[0]).fake_mode:
                step_value = val(step) if isinstance(step, torch.fx.Node) else step
                advanced.meta["val"] = aten._foreach_add.Scalar([val(c) for c in counters], step_value)
            for item, (_, added, _), value in zip(items, members, advanced.meta["val"]):
                item.meta.update({key: v for key, v in added.meta.items() if key != "val"})
                item.meta["val"] = value
                added.replace_all_uses_with(item)
                graph.erase_node(added)
            rewritten += len(members)
        return rewritten

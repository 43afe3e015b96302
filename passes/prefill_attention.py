"""Prefill attention over packed prompts -> one `paiton.prefill_attention` op.

Unfused, as the serving engine's prefill (models/engine.py, PrefillForward) reaches
transformers' sdpa attention: T tokens of several prompts in one row, each token with its cache
row `rows` [1, T] (its prompt) and its position `positions` [1, T], the mask built in the
graph::

    same_prompt = eq(rows[:, None, :, None], rows[:, None, None, :])          # [B, 1, T, T]
    causal      = le(positions[:, None, None, :], positions[:, None, :, None])  # key <= query
    mask        = bitwise_and(same_prompt, causal)        (either operand order; logical_and too)
    k = reshape(clone(expand(unsqueeze(k_new, 2), [B, Hkv, G, T, D])), [B, Hq, T, D])   # repeat_kv
    v = (the same for v_new)
    [where(mask, 0, -inf)]                                # SDPA's lowering: an additive mask
    out = <SDPA>(q, k, v, mask, scale=s)[0]               # _for_cpu, efficient, cudnn, or the op

Fused::

    out = paiton.prefill_attention(q, k_new, v_new, rows, positions, s)

The keys are this step's own (as many as the queries): attention within the new tokens, which
is what a prefill of fresh prompts is. On CUDA SDPA runs such a mask as the memory-efficient
kernel over every (query, key) pair of the bucket; the op reads only the key tiles a query tile
may see (fusion/prefill_attention.py).

Left alone: a mask that is not exactly "same row and key position <= query position" (a strict
<, the comparison the other way round, a sliding window, a mask that is a graph input), keys
not of the queries' length (decode over a cache: decode_attention.py), is_causal, dropout,
enable_gqa, or a use of SDPA's other outputs. The no-op slices that indexing with `:` leaves in
the graph (`slice(x, d, 0, 2**63 - 1)`) are looked through.
"""

from __future__ import annotations

import operator

import torch
from torch._subclasses.fake_tensor import FakeTensor

from paiton.passes.decode_attention import (SDPA_OPS, VIEW_OPS, boolean_mask, bound_args, is_call,
                                            output_layout_matches, val)
from paiton.passes.matcher_utils import same_size as same
from paiton.passes.paiton_pass import PaitonPass

aten = torch.ops.aten
AND_OPS = (aten.bitwise_and.Tensor, aten.logical_and.default)


def strip_noop_slices(node):
    """`node` before the slices that keep a whole dim (`x[:, None]` leaves `slice(x, 1, 0, 2**63 - 1)`)."""
    while is_call(node, aten.slice.Tensor):
        args = bound_args(node)
        source = val(args["self"])
        if source is None or args["step"] != 1 or args["start"] not in (None, 0):
            return node
        end = args["end"]
        if not (end is None or (isinstance(end, int) and end >= 2**62) or same(end, source.shape[args["dim"]])):
            return node
        node = args["self"]
    return node


def index_source(node, seq_len):
    """(the int [B or 1, T] tensor, "query" or "key") if `node` is it unsqueezed to [B, 1, T, 1]
    (a query's value) or [B, 1, 1, T] (a key's), through no-op slices; else None."""
    shape = getattr(val(node), "shape", None)
    if shape is None or len(shape) != 4 or not same(shape[1], 1):
        return None
    if same(seq_len, 1) and all(same(n, 1) for n in shape[2:]):
        side = "either"  # one token: a query's value and a key's are the same one
    elif same(shape[2], seq_len) and same(shape[3], 1):
        side = "query"
    elif same(shape[2], 1) and same(shape[3], seq_len):
        side = "key"
    else:
        return None
    node = strip_noop_slices(node)
    while is_call(node, aten.unsqueeze.default):
        node = strip_noop_slices(node.args[0])
    source = val(node)
    if source is None or source.dim() != 2 or not same(source.shape[1], seq_len) or source.dtype not in (torch.int32, torch.int64):
        return None
    return node, side


def fits(sides, *wanted) -> bool:
    """The operands' sides are one of the `wanted` orders ("either" fits both)."""
    return any(all(side in (w, "either") for side, w in zip(sides, order)) for order in wanted)


def same_row_causal(mask, seq_len):
    """(rows, positions) if the boolean `mask` is exactly eq(rows query, rows key) & le(positions
    key, positions query); else None."""
    if not is_call(mask, *AND_OPS):
        return None
    found = {}
    for part in mask.args[:2]:
        if is_call(part, aten.eq.Tensor):
            sides = [index_source(arg, seq_len) for arg in part.args[:2]]
            if None in sides or sides[0][0] is not sides[1][0] or not fits([s for _, s in sides], ("query", "key"), ("key", "query")):
                return None
            found["rows"] = sides[0][0]
        elif is_call(part, aten.le.Tensor, aten.ge.Tensor):
            sides = [index_source(arg, seq_len) for arg in part.args[:2]]
            if None in sides or sides[0][0] is not sides[1][0]:
                return None
            # le(key, query) or ge(query, key): the key's position at most the query's.
            wanted = ("key", "query") if part.target is aten.le.Tensor else ("query", "key")
            if not fits([s for _, s in sides], wanted):
                return None
            found["positions"] = sides[0][0]
        else:
            return None
    if set(found) != {"rows", "positions"}:
        return None
    return found["rows"], found["positions"]


def new_kv_source(node) -> tuple[torch.fx.Node, int] | None:
    """(the [B, Hkv, T, D] tensor, G) if `node` is repeat_kv of it (through no-op slices), G = 1 if no repeat."""
    if is_call(node, *VIEW_OPS) and is_call(node.args[0], aten.clone.default):
        expand = node.args[0].args[0]
        if not is_call(expand, aten.expand.default):
            return None
        unsqueezed = strip_noop_slices(expand.args[0])
        expanded = val(expand)
        if (is_call(unsqueezed, aten.unsqueeze.default) and unsqueezed.args[1] == 2 and expanded is not None
                and expanded.dim() == 5 and isinstance(expanded.shape[2], int)):
            return strip_noop_slices(unsqueezed.args[0]), expanded.shape[2]
        return None
    return node, 1


class PrefillAttentionPass(PaitonPass):
    name = "prefill_attention"
    fused_op = "prefill_attention"
    depends_on = ("paiton.fusion.prefill_attention", "paiton.passes.decode_attention")

    def apply(self, graph: torch.fx.Graph) -> int:
        import paiton.fusion.prefill_attention  # noqa: F401  (registers torch.ops.paiton.prefill_attention)

        rewritten = 0
        for node in list(graph.nodes):
            if is_call(node, *SDPA_OPS) and self._rewrite(graph, node):
                rewritten += 1
        return rewritten

    def _rewrite(self, graph: torch.fx.Graph, sdpa: torch.fx.Node) -> bool:
        mask_name = SDPA_OPS[sdpa.target]
        if mask_name is None:
            return False
        args = bound_args(sdpa)
        if args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False) or args.get("enable_gqa", False):
            return False
        if sdpa.target is aten.scaled_dot_product_attention.default:
            output = sdpa
        else:  # only the attention output may be used (not the log-sum-exp or debug outputs)
            getitems = {user.args[1]: user for user in sdpa.users if user.target is operator.getitem}
            if len(getitems) != len(sdpa.users) or 0 not in getitems:
                return False
            if any(user.users for index, user in getitems.items() if index != 0):
                return False
            output = getitems[0]
        q, mask = args["query"], args.get(mask_name)
        q_val, out_val = val(q), val(output)
        if not isinstance(q_val, FakeTensor) or not isinstance(out_val, torch.Tensor) or q_val.dim() != 4 or mask is None:
            return False
        batch, q_heads, seq_len, head_dim = q_val.shape
        k_source, v_source = new_kv_source(args["key"]), new_kv_source(args["value"])
        if k_source is None or v_source is None or k_source[1] != v_source[1]:
            return False
        (k, group), (v, _) = k_source, v_source
        k_val, v_val = val(k), val(v)
        if k_val is None or v_val is None or k_val.dim() != 4 or k_val.shape != v_val.shape:
            return False
        if not (same(k_val.shape[0], batch) and same(k_val.shape[1] * group, q_heads) and same(k_val.shape[2], seq_len)
                and same(k_val.shape[3], head_dim)):
            return False
        if q_val.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k_val.dtype != q_val.dtype:
            return False
        mask = boolean_mask(mask, seq_len)
        found = same_row_causal(mask, seq_len) if mask is not None else None
        if found is None:
            return False
        rows, positions = found
        if not all(same(val(t).shape[0], 1) or same(val(t).shape[0], batch) for t in found):
            return False
        scale = args.get("scale")
        if scale is None:
            from paiton.fusion.decode_attention import default_scale

            scale = default_scale(head_dim)
        with graph.inserting_before(output):
            fused = graph.call_function(torch.ops.paiton.prefill_attention.default, (q, k, v, rows, positions, float(scale)))
        with q_val.fake_mode:
            fused.meta["val"] = torch.ops.paiton.prefill_attention.default(q_val, k_val, v_val, val(rows), val(positions),
                                                                           float(scale))
        result = fused
        if not output_layout_matches(out_val, fused.meta["val"]):
            if not out_val.is_contiguous():
                graph.erase_node(fused)
                return False
            # The CPU lowering returns [B, H, T, D] contiguous, another layout than the op's: copy.
            with graph.inserting_after(fused):
                result = graph.call_function(aten.clone.default, (fused,), {"memory_format": torch.contiguous_format})
            with q_val.fake_mode:
                result.meta["val"] = fused.meta["val"].clone(memory_format=torch.contiguous_format)
        output.replace_all_uses_with(result)
        for node in (fused, result):
            node.meta.update({key: value for key, value in output.meta.items() if key != "val"})
        # Erase SDPA here (its CUDA lowerings' RNG outputs would keep it alive through dead-code
        # elimination); the mask and repeat_kv before it go with the manager's cleanup.
        if sdpa is not output:
            for getitem in list(sdpa.users):
                graph.erase_node(getitem)
        graph.erase_node(sdpa)
        return True

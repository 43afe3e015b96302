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

import torch
from torch._subclasses.fake_tensor import FakeTensor

from paiton.passes.decode_attention import (SDPA_OPS, boolean_mask, bound_args, is_call, repeated_kv_pair, replace_sdpa,
                                            sdpa_attention_output, strip_noop_slices, val)
from paiton.passes.matcher_utils import same_size as same
from paiton.passes.paiton_pass import PaitonPass

aten = torch.ops.aten
AND_OPS = (aten.bitwise_and.Tensor, aten.logical_and.default)


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
        output = sdpa_attention_output(sdpa)
        if output is None:
            return False
        args = bound_args(sdpa)
        q, mask = args["query"], args.get(SDPA_OPS[sdpa.target])
        q_val, out_val = val(q), val(output)
        if not isinstance(q_val, FakeTensor) or not isinstance(out_val, torch.Tensor) or q_val.dim() != 4 or mask is None:
            return False
        batch, q_heads, seq_len, head_dim = q_val.shape
        kv = repeated_kv_pair(args["key"], args["value"])
        if kv is None:
            return False
        k, v, group = kv
        k_val, v_val = val(k), val(v)
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
        # The CPU lowering's and cuDNN's [B, H, T, D] layout is another than the op's: a copy then.
        return replace_sdpa(graph, sdpa, output, fused)

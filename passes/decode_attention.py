"""Decode-step attention over a static KV cache -> one `paiton.decode_attention` op.

Unfused, as transformers' sdpa attention runs a decode step over a StaticCache (and as a
hand-written loop with a static cache writes it)::

    k = reshape(clone(expand(unsqueeze(k_cache, 2), [B, Hkv, G, L, D])), [B, Hq, L, D])   # repeat_kv
    v = (the same for v_cache)
    mask = one of
      (a) le(kv_index, q_position)   # built in the graph: kv_index = arange(L), q_position = positions [Sq]
      (b) a graph input, bool [B or 1, 1, Sq or 1, L]   # built outside the compiled forward
    [expand to [B, 1, Sq, L]] [where(mask, 0, -inf or <= -65504): an additive mask]
    [pad + slice of the additive mask: efficient attention's 16-aligned rows]
    out = <SDPA>(q, k, v, mask, scale=s)[0]  # the device's lowering: _for_cpu, efficient, cudnn

Fused::

    (a) out = paiton.decode_attention(q, k_cache, v_cache, positions, None, s)
    (b) out = paiton.decode_attention(q, k_cache, v_cache, None, squeeze(mask, 1), s)

k_cache/v_cache are whatever tensors repeat_kv expanded: the cache after this step's write
(the write itself, an index_put, stays in the graph and Inductor performs it in place).

(a) is the faster form: the kernel's loop stops at the largest query position. It is how a
model that builds its causal mask inside the forward (gpt-fast style, or transformers'
forward called directly) appears. (b) is how `model.generate(..., cache_implementation=
"static", compile_config=...)` appears: transformers builds the mask before calling the
compiled forward. Seen with transformers 5.24 on CPU (tiny Qwen3, fp32): the decode graph
has one placeholder `bool [B, 1, 1, L]` (L = the cache length; left padding shows as False
entries), shared by every layer, which SDPA's lowering turns into
`where(mask, full([], 0.0), full([], -inf))` for `_scaled_dot_product_flash_attention_for_cpu`.
The kernel reads the boolean mask itself: a first pass over its bytes bounds the loop to the
keys from the first to the last that some query attends to, so the unfilled cache and left
padding are not read (H100, bf16, Qwen3-8B heads, cache 4096 filled 1024, batch 32: 80 us
for (b), 57 us for (a)). Any boolean mask is exactly what the kernel computes, so (b) needs
no proof of causality; a float mask that is a graph input is left alone, since its values
need not be only 0 and -inf.

Why a graph walk rather than a traced pattern: the SDPA node is a different ATen op on each
device (and can only be traced there), and the glue before it comes in a few spellings
(view or reshape, expand to batch or not, a boolean or an additive mask). The walk accepts
exactly the forms listed above and checks shapes, so anything else is left alone: prefill
(more than MAX_DECODE_QUERIES queries), a mask built in the graph that is not exactly "key
position <= query position" (sliding window, custom masks), a float mask input, a mask input
per head, is_causal=True, dropout, returned attention weights or log-sum-exp.
"""

from __future__ import annotations

import operator

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from paiton.passes.matcher_utils import same_size as same
from paiton.passes.paiton_pass import PaitonPass

aten = torch.ops.aten
prims = torch.ops.prims

# Decode steps have one query per sequence (a few with speculative decoding); more is prefill,
# which stays with SDPA's flash kernels.
MAX_DECODE_QUERIES = 8

SDPA_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: "attn_mask",
    aten._scaled_dot_product_efficient_attention.default: "attn_bias",
    aten._scaled_dot_product_cudnn_attention.default: "attn_bias",
    aten._scaled_dot_product_flash_attention.default: None,  # takes no mask: never a cache decode
    aten.scaled_dot_product_attention.default: "attn_mask",
}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def bound_args(node: torch.fx.Node) -> dict:
    """The call's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    values = {}
    for index, arg in enumerate(schema.arguments):
        if index < len(node.args) and not arg.kwarg_only:
            values[arg.name] = node.args[index]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def is_call(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def strip_unsqueezes(node):
    while is_call(node, aten.unsqueeze.default):
        node = node.args[0]
    return node


def strip_noop_slices(node):
    """`node` before the slices that keep a whole dim (`x[:, None]` can leave `slice(x, 1, 0, 2**63 - 1)`)."""
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


def repeated_kv_source(node) -> tuple[torch.fx.Node, int] | None:
    """(the [B, Hkv, L, D] tensor, G) if `node` is repeat_kv of it (through no-op slices), G = 1
    if no repeat."""
    if is_call(node, *VIEW_OPS) and is_call(node.args[0], aten.clone.default):
        expand = node.args[0].args[0]
        unsqueezed = strip_noop_slices(expand.args[0]) if is_call(expand, aten.expand.default) else None
        if is_call(unsqueezed, aten.unsqueeze.default):
            source, dim = unsqueezed.args
            expanded = val(expand)
            if dim == 2 and expanded is not None and expanded.dim() == 5 and isinstance(expanded.shape[2], int):
                return strip_noop_slices(source), expanded.shape[2]
        return None
    return node, 1


def repeated_kv_pair(key, value):
    """(k, v, G) if SDPA's key and value are repeat_kv (G-fold, G = 1 if none) of two [B, Hkv, L,
    D] tensors k and v of one shape; else None."""
    k_source, v_source = repeated_kv_source(key), repeated_kv_source(value)
    if k_source is None or v_source is None or k_source[1] != v_source[1]:
        return None
    k_val, v_val = val(k_source[0]), val(v_source[0])
    if k_val is None or v_val is None or k_val.dim() != 4 or k_val.shape != v_val.shape:
        return None
    return k_source[0], v_source[0], k_source[1]


def is_arange(node, length) -> bool:
    """arange(length) as it lowers: iota(length, start=0, step=1), maybe `+ 0`."""
    if is_call(node, aten.add.Tensor) and node.args[1] == 0:
        node = node.args[0]
    def size(arg):  # a dynamic size is a node computing the SymInt
        return val(arg) if isinstance(arg, torch.fx.Node) else arg

    if is_call(node, prims.iota.default):
        return same(size(node.args[0]), length) and node.kwargs.get("start", 0) == 0 and node.kwargs.get("step", 1) == 1
    if is_call(node, aten.arange.default, aten.arange.start):
        args = node.args if node.target is aten.arange.start else (0, node.args[0])
        return args[0] == 0 and same(size(args[1]), length)
    return False


def boolean_mask(mask, cache_len):
    """The boolean mask SDPA's mask argument applies: the argument itself if boolean, or the
    condition of an additive `where(condition, 0, -inf or <= -65504)`, with the layout steps
    (strip_mask_layout) peeled off on either side. None for any other mask: a float mask's
    values are not known to be only "keep" and "drop"."""
    mask = strip_mask_layout(mask, cache_len)
    if is_call(mask, aten.where.self):
        condition, keep, drop = mask.args
        if not (_is_scalar(keep, lambda x: x == 0.0) and _is_scalar(drop, masks_out)):
            return None
        mask = strip_mask_layout(condition, cache_len)
    mask_val = val(mask)
    return mask if isinstance(mask_val, torch.Tensor) and mask_val.dtype == torch.bool else None


def causal_positions(mask, batch, q_len, cache_len):
    """The query-positions node [Sq] or [B, Sq] if the boolean `mask` is exactly "kv index <=
    query position", expanded or not; else None."""
    mask = strip_mask_layout(mask, cache_len)
    if not is_call(mask, aten.le.Tensor):
        return None
    kv_index, q_position = mask.args
    kv_values, q_values = val(kv_index), val(q_position)
    if kv_values is None or q_values is None or kv_values.dim() != 4 or q_values.dim() != 4:
        return None
    # kv_index [1, 1, 1, L] from arange(L); q_position [1 or B, 1, Sq, 1] from positions.
    if not (all(same(n, 1) for n in kv_values.shape[:3]) and same(kv_values.shape[3], cache_len)):
        return None
    if not (same(q_values.shape[1], 1) and same(q_values.shape[2], q_len) and same(q_values.shape[3], 1)):
        return None
    if not is_arange(strip_unsqueezes(kv_index), cache_len):
        return None
    positions = strip_unsqueezes(q_position)
    values = val(positions)
    if values is None or values.dtype not in (torch.int64, torch.int32):
        return None
    if values.dim() == 1 and same(values.shape[0], q_len) and same(q_values.shape[0], 1):
        return positions
    if values.dim() == 2 and same(values.shape[1], q_len) and (same(values.shape[0], batch) or same(values.shape[0], 1)):
        return positions
    return None


def input_mask(mask, batch, q_len, cache_len):
    """The boolean `mask` if it is a graph input of shape [B or 1, 1, Sq or 1, L] (one mask
    for all heads; the op broadcasts a batch or query dim of 1); else None."""
    mask_val = val(mask)
    if not (isinstance(mask, torch.fx.Node) and mask.op == "placeholder" and mask_val is not None and mask_val.dim() == 4):
        return None
    mask_batch, heads, mask_q_len, mask_len = mask_val.shape
    if not (same(mask_batch, batch) or same(mask_batch, 1)) or not same(heads, 1):
        return None
    if not (same(mask_q_len, q_len) or same(mask_q_len, 1)) or not same(mask_len, cache_len):
        return None
    return mask


def strip_mask_layout(mask, cache_len):
    """The mask before the layout steps SDPA's lowerings put around it: expand to [B, H, Sq, L],
    and, for efficient attention (fp32 on CUDA) with L not a multiple of 16, pad_bias's
    `slice(constant_pad_nd(mask, [0, p]), -1, 0, L)` (pads the row stride, keeps the values)."""
    while True:
        if is_call(mask, aten.expand.default):
            mask = mask.args[0]
        elif is_call(mask, aten.slice.Tensor) and is_call(mask.args[0], aten.constant_pad_nd.default):
            padded, window = mask.args[0], bound_args(mask)
            padded_val, pad = val(padded), padded.args[1]
            if padded_val is None or window["dim"] not in (-1, padded_val.dim() - 1) or window["step"] != 1:
                return mask
            if window["start"] not in (None, 0) or not same(window["end"], cache_len) or list(pad[:1]) != [0] or len(pad) != 2:
                return mask
            mask = padded.args[0]
        else:
            return mask


def masks_out(value: float) -> bool:
    """An additive mask value that removes a key: -inf, or a negative number so large that
    exp(score + value - max) is 0 in fp32 for any real attention score. On the H100
    (transformers 5.17) the bf16 mask holds -65536: float16's minimum, rounded to bf16."""
    return value <= -65504.0


def _is_scalar(node, test) -> bool:
    """`node` is a number passing `test`: a Python number, a 0-d full/scalar_tensor, or a 0-d
    constant (`torch.tensor(0.0)` in a forward becomes lift_fresh_copy of a get_attr)."""
    if isinstance(node, (int, float)):
        return test(node)
    if is_call(node, aten.full.default) and node.args[0] == []:
        return test(node.args[1])
    if is_call(node, aten.scalar_tensor.default):
        return test(node.args[0])
    if is_call(node, aten.lift_fresh_copy.default):
        node = node.args[0]
    if isinstance(node, torch.fx.Node) and node.op == "get_attr" and node.graph.owning_module is not None:
        constant = getattr(node.graph.owning_module, node.target, None)
        if not isinstance(constant, torch.Tensor) or constant.numel() != 1:
            return False
        with unset_fake_temporarily():  # a real constant, read while the compiler's fake mode is on
            return test(constant.item())
    return False


def output_layout_matches(sdpa_out, ours) -> bool:
    """Users of SDPA's output were traced against its strides (a view after the transpose
    relies on them); the fused op must give the same wherever a dim has more than one element."""
    return all(same(a, b) for a, b, n in zip(sdpa_out.stride(), ours.stride(), sdpa_out.shape) if not same(n, 1))


def sdpa_attention_output(sdpa: torch.fx.Node) -> torch.fx.Node | None:
    """The node that carries SDPA's attention output, if a fused attention op can take the call's
    place: a lowering with a mask argument, no dropout, not is_causal, no enable_gqa, and no use
    of its other outputs (log-sum-exp, debug outputs); else None."""
    if SDPA_OPS[sdpa.target] is None:
        return None
    args = bound_args(sdpa)
    if args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False) or args.get("enable_gqa", False):
        return None
    if sdpa.target is aten.scaled_dot_product_attention.default:
        return sdpa
    getitems = {user.args[1]: user for user in sdpa.users if user.target is operator.getitem}
    if len(getitems) != len(sdpa.users) or 0 not in getitems:
        return None
    if any(user.users for index, user in getitems.items() if index != 0):
        return None
    return getitems[0]


def replace_sdpa(graph: torch.fx.Graph, sdpa: torch.fx.Node, output: torch.fx.Node, fused: torch.fx.Node) -> bool:
    """Put `fused` (an attention op inserted before `output`, its fake value in meta) in the place
    of SDPA's `output` (sdpa_attention_output) and erase the call. Where the lowering's output
    has another layout than the op's, a contiguous copy of the op's output takes the place (the
    CPU lowering returns [B, H, S, D] contiguous); where neither fits, `fused` is erased and
    nothing changes (False)."""
    out_val, fused_val = val(output), fused.meta["val"]
    result = fused
    if not output_layout_matches(out_val, fused_val):
        if not out_val.is_contiguous():
            graph.erase_node(fused)
            return False
        with graph.inserting_after(fused):
            result = graph.call_function(aten.clone.default, (fused,), {"memory_format": torch.contiguous_format})
        with fused_val.fake_mode:
            result.meta["val"] = fused_val.clone(memory_format=torch.contiguous_format)
    output.replace_all_uses_with(result)
    for node in (fused, result):
        node.meta.update({key: value for key, value in output.meta.items() if key != "val"})
    # Erase SDPA here: the CUDA lowerings carry RNG outputs, which makes FX's dead-code
    # elimination keep them (it would compute attention a second time). The glue before it
    # (repeat_kv, the mask) is pure and goes with the manager's cleanup.
    if sdpa is not output:
        for getitem in list(sdpa.users):
            graph.erase_node(getitem)
    graph.erase_node(sdpa)
    return True


class DecodeAttentionPass(PaitonPass):
    name = "decode_attention"
    fused_op = "decode_attention"
    depends_on = ("paiton.fusion.decode_attention",)

    def apply(self, graph: torch.fx.Graph) -> int:
        import paiton.fusion.decode_attention  # noqa: F401  (registers torch.ops.paiton.decode_attention)

        rewritten = 0
        mask_views = {}  # mask input -> its [B, Sq, L] view: one for all layers
        for node in list(graph.nodes):
            if is_call(node, *SDPA_OPS) and self._rewrite(graph, node, mask_views):
                rewritten += 1
        return rewritten

    def _rewrite(self, graph: torch.fx.Graph, sdpa: torch.fx.Node, mask_views: dict) -> bool:
        output = sdpa_attention_output(sdpa)
        if output is None:
            return False
        args = bound_args(sdpa)
        q, k, v, mask = args["query"], args["key"], args["value"], args.get(SDPA_OPS[sdpa.target])
        q_val, out_val = val(q), val(output)
        if not isinstance(q_val, FakeTensor) or not isinstance(out_val, torch.Tensor) or q_val.dim() != 4:
            return False
        batch, q_heads, q_len, head_dim = q_val.shape
        if not isinstance(q_len, int) or q_len > MAX_DECODE_QUERIES:
            return False
        kv = repeated_kv_pair(k, v)
        if kv is None:
            return False
        k_cache, v_cache, group = kv
        k_val, v_val = val(k_cache), val(v_cache)
        if not (same(k_val.shape[1] * group, q_heads) and same(k_val.shape[0], batch) and same(k_val.shape[3], head_dim)):
            return False
        if q_val.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k_val.dtype != q_val.dtype:
            return False
        cache_len = k_val.shape[2]
        mask = boolean_mask(mask, cache_len) if mask is not None else None
        if mask is None:
            return False
        positions = causal_positions(mask, batch, q_len, cache_len)
        mask = input_mask(mask, batch, q_len, cache_len) if positions is None else None
        if positions is None and mask is None:
            return False
        scale = args.get("scale")
        if scale is None:
            from paiton.fusion.decode_attention import default_scale

            scale = default_scale(head_dim)

        kv_mask = None
        if mask is not None:
            kv_mask = mask_views.get(mask)
            if kv_mask is None:  # [B, 1, Sq, L] -> [B, Sq, L]: a view, no copy
                with graph.inserting_before(output):
                    kv_mask = mask_views[mask] = graph.call_function(aten.squeeze.dim, (mask, 1))
                with q_val.fake_mode:
                    kv_mask.meta["val"] = aten.squeeze.dim(val(mask), 1)
        with graph.inserting_before(output):
            fused = graph.call_function(
                torch.ops.paiton.decode_attention.default, (q, k_cache, v_cache, positions, kv_mask, float(scale))
            )
        with q_val.fake_mode:
            fused.meta["val"] = torch.ops.paiton.decode_attention.default(
                q_val, k_val, v_val, val(positions), val(kv_mask), float(scale)
            )
        # With several queries the CPU lowering's layout is another than the op's: a copy then
        # (a decode step's output is a few KB).
        return replace_sdpa(graph, sdpa, output, fused)

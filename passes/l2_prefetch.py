"""The first small kernel after a product asks L2 for the next product's weight.

A decode step alternates products, which stream their weights at the copy rate, with small
kernels (norms, the q/k norm + rotary kernel, attention) during which memory is idle: a few
microseconds a norm and about nine for attention at batch 1 on an H100, 1 ms of Qwen3-32B's FP8
step (fusion/l2_prefetch.py). Between two products this pass gives the first of those kernels,
if it is a Paiton norm or rotary kernel, the next product's weight to prefetch::

    gate_up = fp8_linear(x, [W_gate, W_up], ...)         # (any Paiton product)
    h = silu_mul_fp8_linear(gate, up, [W_down], ...)
    x, r = fused_add_rms_norm(h, r, w, eps)              # -> (..., prefetch=W_q, prefetch_bytes=|W_q|+|W_k|+|W_v|)
    qkv = fp8_linear(x, [W_q, W_k, W_v], ...)
    q = qk_norm_rope_cache(...)                          # -> (..., prefetch=W_o, prefetch_bytes=|W_o|)
    attn = decode_attention(...)
    o = fp8_linear(attn, [W_o], ...)

`prefetch_bytes` is the span of the packed weights from the first (they lie consecutively: see
fusion/packed_linear.py); how much of it a kernel asks for is the chip's lowering table's
choice (backends/lowering.py, "l2_prefetch"), made at launch. The prefetch is a hint: the
rewritten graph computes exactly what it did. Off by default: timed on an H100 it made a
decode step slower (bench/results/NOTES.md, 2026-12-06; fusion/l2_prefetch.py says why); the
pass runs, and its kernels prefetch, under PAITON_L2_PREFETCH=1.

Rewritten, with the count reporting each: a Paiton product (packed_linear, fp8_linear or their
SwiGLU forms) whose weights are graph inputs or attributes, preceded, since the product or
matrix multiplication before it, by a norm or rotary op without a prefetch of its own. Left
alone: a product with nothing but other kernels since the last one (gate/up into down_proj),
a window whose products are Inductor's or the vendor's (`mm`: a prefill's o_proj; the window
ends there), weights computed in the graph. On chips without a bulk L2 prefetch (before
sm_90, AMD, CPU) the pass does not run.
"""

from __future__ import annotations

import torch

from paiton.passes.paiton_pass import PaitonPass

aten = torch.ops.aten


def _window_ops() -> dict:
    import paiton.fusion.qk_norm_rope  # noqa: F401  (registers the ops)
    import paiton.fusion.rms_norm  # noqa: F401

    ops = torch.ops.paiton
    return {ops.rms_norm.default, ops.fused_add_rms_norm.default, ops.qk_norm_rope.default, ops.qk_norm_rope_cache.default}


def _product_weights() -> dict:
    """Paiton's product ops -> the index of their weight list among the op's arguments."""
    import paiton.fusion.fp8_linear  # noqa: F401  (registers the ops)
    import paiton.fusion.packed_linear  # noqa: F401

    ops = torch.ops.paiton
    return {ops.packed_linear.default: 1, ops.fp8_linear.default: 1, ops.silu_mul_packed_linear.default: 2,
            ops.silu_mul_fp8_linear.default: 2, ops.packed_linear_silu_mul.default: 1, ops.fp8_linear_silu_mul.default: 1}


# Products Paiton does not make: they end a window without taking its prefetch.
OTHER_PRODUCTS = (aten.mm.default, aten.addmm.default, aten._scaled_mm.default, aten.bmm.default)


def _weight_span(node: torch.fx.Node, weights_at: int) -> tuple[torch.fx.Node, int] | None:
    """(the first weight's node, the packed weights' bytes) when every weight is a graph input or
    attribute with a known value; else None."""
    weights = node.args[weights_at] if len(node.args) > weights_at else None
    if not isinstance(weights, (list, tuple)) or not weights:
        return None
    total = 0
    for w in weights:
        value = w.meta.get("val") if isinstance(w, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or w.op not in ("placeholder", "get_attr"):
            return None
        total += value.numel() * value.element_size()
    return weights[0], int(total)


class L2PrefetchPass(PaitonPass):
    """Runs only under PAITON_L2_PREFETCH=1 or with `options={"paiton.l2_prefetch": True}`;
    `False` switches it off."""

    name = "l2_prefetch"
    fused_op = "l2_prefetch"
    depends_on = ("paiton.fusion.l2_prefetch", "paiton.fusion.rms_norm", "paiton.fusion.qk_norm_rope")

    @classmethod
    def on_by_default(cls) -> bool:
        """Only under PAITON_L2_PREFETCH=1: on an H100 it made Qwen3-8B's batch-1 step 10-13%
        slower (bench/results/NOTES.md, 2026-12-06)."""
        from paiton.fusion.l2_prefetch import prefetch_requested

        return prefetch_requested()

    def apply(self, graph: torch.fx.Graph) -> int:
        window_ops, product_weights = _window_ops(), _product_weights()
        rewritten = 0
        opener = None  # the first window op since the last product
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if _window_op(node) in window_ops:
                if opener is None and node.kwargs.get("prefetch") is None:
                    opener = node
            elif node.target in product_weights or node.target in OTHER_PRODUCTS:
                span = _weight_span(node, product_weights[node.target]) if node.target in product_weights else None
                if opener is not None and span is not None:
                    # (A get_attr weight read after the opener: the pass manager's stable
                    # topological sort, after every pass that rewrote, moves it up.)
                    weight, nbytes = span
                    opener.kwargs = {**opener.kwargs, "prefetch": weight, "prefetch_bytes": nbytes}
                    rewritten += 1
                opener = None
        return rewritten


def _window_op(node: torch.fx.Node):
    """The op a node calls: its target, or for a mutating op kept functional
    (auto_functionalized(op, **kwargs): the rotary kernel writing the KV cache,
    passes/kv_cache_write.py) the op it wraps. The op's arguments are the node's kwargs there,
    so the prefetch joins them the same way."""
    if node.target is torch.ops.higher_order.auto_functionalized and node.args:
        return node.args[0]
    return node.target


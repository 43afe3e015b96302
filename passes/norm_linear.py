"""A decode step's RMSNorms into its one-row products (fusion/norm_linear.py): no norm kernel
between the products of a layer at batch 1.

At batch 1, after the other passes, a Qwen3 layer's products and norms are::

    y               = paiton.packed_linear(attn, [W_o])           # or fp8_linear; down_proj's:
                                                                  # silu_mul_(packed|fp8)_linear
    normed, summed  = paiton.fused_add_rms_norm(y, residual, w, eps)
    z               = paiton.packed_linear(normed, [W_gate, W_up])   # or fp8_linear

Rewritten::

    summed, squares = paiton.linear_add(attn, None, [W_o], [], residual)   # the add in y's GEMV
    z = paiton.rms_norm_linear(summed, squares, w, eps, [W_gate, W_up], [])   # the norm in z's GEMV

`squares` being the sums of summed's squares, which y's GEMV takes as it writes summed. Each
rewrite takes one norm kernel out of the step (Qwen3-32B: 128 of its 129; the first layer's
input norm, on the embedding, and the final norm stay).

Rewritten only when every product involved has one row (every leading dimension static and 1:
the GEMV's case), the norm's output feeds nothing but the product (its input), the first
product's output feeds nothing but the norm, the norm's weight has the input's dtype and
width, and no L2 prefetch rides on the norm (the l2_prefetch pass runs after this one). Left
alone: several rows (batch > 1, prefill), a norm output with other users (the final norm's,
sliced for the lm_head, where one is), a residual add whose operands are not a product, a
plain RMSNorm (no product before it to sum the squares).

Off unless PAITON_NORM_LINEAR=1 (or `options={"paiton.norm_linear": True}`) until timed on a
GPU, as PDL and the L2 prefetch were (bench configurations take a `-nl` suffix for it). On
chips whose lowering table leaves one-row linears to Inductor (AMD) the pass does not run.
"""

from __future__ import annotations

import operator

import torch

from paiton.fusion.triton_utils import switched_on
from paiton.passes.decode_attention import bound_args, is_call, val
from paiton.passes.one_row_linear import is_one_row
from paiton.passes.paiton_pass import PaitonPass

NORM_LINEAR_ENV = "PAITON_NORM_LINEAR"


def _products():
    ops = torch.ops.paiton
    # op -> (its input's argument name, gated)
    return {ops.packed_linear.default: ("x", False), ops.fp8_linear.default: ("x", False),
            ops.silu_mul_packed_linear.default: ("gate", True), ops.silu_mul_fp8_linear.default: ("gate", True)}


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _weights_and_scales(product: torch.fx.Node) -> tuple[list, list]:
    args = bound_args(product)
    return args["weights"], args.get("scales", [])


class NormLinearPass(PaitonPass):
    name = "norm_linear"
    fused_op = "norm_linear"
    depends_on = ("paiton.fusion.norm_linear", "paiton.fusion.gemv", "paiton.passes.decode_attention",
                  "paiton.passes.one_row_linear")

    @classmethod
    def on_by_default(cls) -> bool:
        return switched_on(NORM_LINEAR_ENV)

    def apply(self, graph: torch.fx.Graph) -> int:
        import paiton.fusion.norm_linear  # noqa: F401  (registers the ops)

        rewritten = 0
        for node in list(graph.nodes):
            if is_call(node, torch.ops.paiton.fused_add_rms_norm.default):
                rewritten += self._fuse(graph, node)
        return rewritten

    @staticmethod
    def _consumer(normed: torch.fx.Node, norm: torch.fx.Node) -> torch.fx.Node | None:
        """The one-row product that is `normed`'s only user, taking it as its input, where the
        norm's weight has its input's dtype and width."""
        consumer = _sole_user(normed)
        if not is_call(consumer, torch.ops.paiton.packed_linear.default, torch.ops.paiton.fp8_linear.default):
            return None
        norm_args = bound_args(norm)
        x, weight = val(norm_args["x"]), val(norm_args["weight"])
        if bound_args(consumer)["x"] is not normed or not is_one_row(val(normed)) or norm_args.get("prefetch") is not None:
            return None
        if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype or tuple(weight.shape) != (x.shape[-1],):
            return None
        return consumer

    @staticmethod
    def _product(norm_args: dict, norm: torch.fx.Node) -> tuple[torch.fx.Node, str] | None:
        """(the one-row product that is an operand of the norm's add and feeds nothing else, the
        other operand's name): either one (x + residual is residual + x, bit for bit)."""
        for product_at, residual_at in (("x", "residual"), ("residual", "x")):
            product = norm_args[product_at]
            if is_call(product, *_products()) and _sole_user(product) is norm and is_one_row(val(product)):
                return product, residual_at
        return None

    def _fuse(self, graph: torch.fx.Graph, norm: torch.fx.Node) -> int:
        outputs = {user.args[1]: user for user in norm.users if is_call(user, operator.getitem)}
        if len(outputs) != len(norm.users) or 0 not in outputs:
            return 0
        normed, summed = outputs[0], outputs.get(1)
        norm_args = bound_args(norm)
        consumer, found = self._consumer(normed, norm), self._product(norm_args, norm)
        if consumer is None or found is None:
            return 0
        product, residual_at = found
        input_name, gated = _products()[product.target]
        product_args = bound_args(product)
        with graph.inserting_before(norm):
            added = graph.call_function(torch.ops.paiton.linear_add.default, (
                product_args[input_name], product_args["up"] if gated else None, *_weights_and_scales(product),
                norm_args[residual_at]))
            new_summed = graph.call_function(operator.getitem, (added, 0))
            squares = graph.call_function(operator.getitem, (added, 1))
        with graph.inserting_before(consumer):
            fused = graph.call_function(torch.ops.paiton.rms_norm_linear.default, (
                new_summed, squares, norm_args["weight"], norm_args["eps"], *_weights_and_scales(consumer)))
        _copy_metadata(product, (added, new_summed, squares))
        fused.meta.update({key: value for key, value in consumer.meta.items() if key != "eager_input_vals"})
        y = val(product)
        if y is not None:
            sums = _squares_value(y)
            added.meta["val"], new_summed.meta["val"], squares.meta["val"] = (y, sums), y, sums
        consumer.replace_all_uses_with(fused)
        graph.erase_node(consumer)
        if summed is not None:
            summed.replace_all_uses_with(new_summed)
            graph.erase_node(summed)
        graph.erase_node(normed)
        graph.erase_node(norm)
        graph.erase_node(product)
        return 1


def _copy_metadata(source: torch.fx.Node, nodes) -> None:
    for node in nodes:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in source.meta:
                node.meta[key] = source.meta[key]


def _squares_value(y: torch.Tensor) -> torch.Tensor:
    """The example value of linear_add's sums of squares for an output like `y` (a fake tensor in
    y's fake mode when y is one)."""
    import contextlib

    from paiton.fusion.gemv import squares_count

    mode = getattr(y, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        return y.new_empty((*y.shape[:-1], squares_count(y.shape[-1])), dtype=torch.float32)

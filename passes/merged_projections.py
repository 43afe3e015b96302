"""Linear layers that read the same input -> one matrix product against their merged weight.

Unfused, Qwen3's attention and MLP (Dynamo's graph, weights are parameters)::

    q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)       # three reads of x, three GEMMs
    gate = linear(h, Wg); up = linear(h, Wu)

Fused::

    qkv  = linear(x, W_qkv)            # W_qkv = rows of Wq, Wk, Wv, one buffer
    q, k, v = narrow(qkv, -1, 0, Nq), narrow(qkv, -1, Nq, Nk), narrow(qkv, -1, Nq + Nk, Nv)

The consumers read the slices in place: Paiton's silu_mul and qk_norm_rope kernels take
strided inputs, so the merged output is not copied apart.

The merged weight must exist once, not per call, and the model must not hold two copies of
these weights. So this pass does not concatenate in the graph (that would copy every weight
every step); it packs the *parameters* once:

1. `__call__` (before the graph is compiled): the group's linears become one
   `paiton.packed_linear(x, [W_1, ..., W_n])` and `narrow`s of its output. The op multiplies
   by the [sum N, K] matrix the weights form once packed, after checking that they do
   (fusion/packed_linear.py).
2. `after_compile` (once the graph is compiled, before it first runs): the group's weights are
   copied, in order, into one new [sum N, K] buffer, and each parameter is pointed at its
   block of rows (`param.data = buffer[a:b]`). The old storages are freed, so memory stays
   flat (peak: one group's weights more, while copying). Values, shapes, strides, names and
   the model's eager forward are unchanged. It packs after compiling because the tracer has
   recorded the parameters' storage offsets; a later graph (the decode step after prefill)
   finds the weights packed already.

This is the one Paiton pass that runs on Dynamo's graph, before AOTAutograd, rather than on
the ATen graph: only here are the real parameters at hand, and only they can show that
weights are (or can be made) adjacent blocks of one buffer (fake tensors do not keep storage
identity).

FP8 weights (models/fp8.py's Fp8Linear calls `paiton.fp8_linear(x, [W8], [s])` where a bf16
model has `linear(x, W)`): the same, a group of those on one input becomes one
`paiton.fp8_linear(x, [W8_1, ..., W8_n], [s_1, ..., s_n])`, and after compiling the FP8
weights are packed into one buffer and their scales into another (per-channel scales [N_i]
into [sum N_i]; per-block scales as rows, where the weights fill whole 128-row blocks).

Merged: a group of at least two `linear(x, W, bias=None)` on the same input node `x` whose
weights are distinct 2-D `nn.Parameter`s (graph inputs) of one dtype, device and in_features,
each owning its whole storage and sharing it with no other tensor (tied or aliased weights
are left alone), or already packed by this pass. A weight joins at most one group (one used
on two inputs is merged with the first). Graphs under autocast are left alone. Left alone: linears with a bias, weights that are not
parameters (a CUDA graph copies other inputs each replay, and only its own elements), or
that are computed in the graph.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

log = logging.getLogger(__name__)

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


class MergedProjectionsPass:
    """Runs on Dynamo's graph with the example inputs (real tensors), see the module docstring.
    `name` is its option: `options={"paiton.merged_projections": False}` switches it off."""

    name = "merged_projections"
    fused_op = "packed_linear"  # its lowering decides whether the pass runs (backends/lowering.py)

    def __init__(self) -> None:
        self._to_pack: list[list[torch.nn.Parameter]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> int:
        """Rewrite `gm`; return the number of groups merged. Call `after_compile` next."""
        inputs = {node: value for node, value in zip(_placeholders(gm.graph), example_inputs)}
        storage_users = defaultdict(int)
        for value in example_inputs:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage_users[_storage_key(value)] += 1

        if _uses_autocast(gm.graph):
            # Under autocast a linear computes in the autocast dtype; the merged op has no
            # autocast rule and would compute in the weights' dtype.
            return 0
        rewritten = 0
        claimed: set[int] = set()  # a weight joins one group: packing it twice would move it
        for group in _shared_input_groups(gm.graph, inputs):
            weights = [inputs[node.args[1]] for node in group]
            if any(id(w) in claimed for w in weights):
                continue
            if not _is_packed(weights):
                if not _can_pack(weights, storage_users):
                    continue
                self._to_pack.append(weights)
            claimed.update(id(w) for w in weights)
            _rewrite(gm.graph, group, weights)
            rewritten += 1
        for group in _shared_input_fp8_groups(gm.graph, inputs):
            weights = [inputs[node.args[1][0]] for node in group]
            scales = [inputs[node.args[2][0]] for node in group]
            if any(id(t) in claimed for t in weights + scales):
                continue
            for tensors in (weights, scales):
                if not _is_packed(tensors):
                    if not _can_pack(tensors, storage_users):
                        break
            else:
                for tensors in (weights, scales):
                    if not _is_packed(tensors):
                        self._to_pack.append(tensors)
                claimed.update(id(t) for t in weights + scales)
                _rewrite_fp8(gm.graph, group, weights)
                rewritten += 1
        return finish_rewrite(gm, rewritten)

    def after_compile(self) -> None:
        """Pack the weights the rewritten graph expects packed."""
        for weights in self._to_pack:
            _pack(weights)
        self._to_pack.clear()


def finish_rewrite(gm: torch.fx.GraphModule, rewritten: int) -> int:
    """After a Dynamo-graph pass: check and regenerate the module's code if anything changed."""
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _placeholders(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [node for node in graph.nodes if node.op == "placeholder"]


def _uses_autocast(graph: torch.fx.Graph) -> bool:
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        return True
    return any(node.op == "call_function" and "autocast" in getattr(node.target, "__name__", str(node.target))
               for node in graph.nodes)


def _storage_use_count(t: torch.Tensor) -> int | None:
    """How many tensors share `t`'s storage (1: `t` alone), where torch can tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    storage = t.untyped_storage()
    return count(storage._cdata) - 1  # the Python storage object made here holds one reference


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _linear_weight(node: torch.fx.Node, inputs: dict) -> torch.nn.Parameter | None:
    """The weight of `linear(x, W)` without bias when W is a 2-D parameter input, else None."""
    if node.op != "call_function" or node.target not in LINEAR_TARGETS or node.kwargs.keys() - {"bias"}:
        return None
    args = list(node.args) + [node.kwargs.get("bias")]
    if len(node.args) not in (2, 3) or args[2] is not None:
        return None
    weight = inputs.get(args[1])
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2 or not isinstance(args[0], torch.fx.Node):
        return None
    x = args[0].meta.get("example_value")
    if not isinstance(x, torch.Tensor) or x.dtype != weight.dtype:  # mixed dtypes: not the op's contract
        return None
    return weight


def _shared_input_groups(graph: torch.fx.Graph, inputs: dict) -> list[list[torch.fx.Node]]:
    """Linears (in graph order) grouped by input, dtype, device and in_features; groups of 2+."""
    groups: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        weight = _linear_weight(node, inputs)
        if weight is not None:
            groups[(node.args[0], weight.dtype, weight.device, weight.shape[1])].append(node)
    result = []
    for nodes in groups.values():
        distinct, seen = [], set()
        for node in nodes:  # the same weight twice on one input is one product, not two
            if node.args[1] not in seen:
                seen.add(node.args[1])
                distinct.append(node)
        if len(distinct) == len(nodes) and len(nodes) >= 2:
            result.append(nodes)
    return result


def _fp8_parts(node: torch.fx.Node, inputs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W8, scales) of `paiton.fp8_linear(x, [W8], [scales])` (one weight: an Fp8Linear's call)
    when both are parameter inputs, else None."""
    import paiton.fusion.fp8_linear  # noqa: F401  (registers torch.ops.paiton.fp8_linear)

    if node.op != "call_function" or node.target not in (torch.ops.paiton.fp8_linear, torch.ops.paiton.fp8_linear.default):
        return None
    if len(node.args) != 3 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
        return None
    weights, scales = node.args[1], node.args[2]
    if not (isinstance(weights, (list, tuple)) and isinstance(scales, (list, tuple)) and len(weights) == len(scales) == 1):
        return None
    weight, scale = inputs.get(weights[0]), inputs.get(scales[0])
    if not isinstance(weight, torch.nn.Parameter) or not isinstance(scale, torch.nn.Parameter) or weight.dim() != 2:
        return None
    return weight, scale


def _shared_input_fp8_groups(graph: torch.fx.Graph, inputs: dict) -> list[list[torch.fx.Node]]:
    """FP8 linears (in graph order) grouped by input, weight dtype, device, in_features and scale
    layout; groups of 2+. Per-block scales merge only where every weight but the last fills
    whole 128-row blocks (the scales' rows must line up with the weights')."""
    from paiton.fusion.gemv import BLOCK_SCALES, SCALE_BLOCK, scales_kind

    groups: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        parts = _fp8_parts(node, inputs)
        if parts is None:
            continue
        weight, scale = parts
        try:
            kind = scales_kind(weight, scale)
        except ValueError:
            continue
        groups[(node.args[0], weight.dtype, weight.device, weight.shape[1], kind)].append(node)
    result = []
    for (_, _, _, _, kind), nodes in groups.items():
        weights = [inputs[node.args[1][0]] for node in nodes]
        if len(nodes) < 2 or len({id(w) for w in weights}) != len(nodes):
            continue
        if kind == BLOCK_SCALES and any(w.shape[0] % SCALE_BLOCK for w in weights[:-1]):
            continue
        result.append(nodes)
    return result


def _is_packed(weights: list[torch.Tensor]) -> bool:
    """The weights are consecutive row blocks, in this order, of one buffer they fill exactly."""
    first = weights[0]
    offset = 0
    for w in weights:
        if _storage_key(w) != _storage_key(first) or not w.is_contiguous() or w.storage_offset() != offset:
            return False
        offset += w.numel()
    return first.untyped_storage().nbytes() == offset * first.element_size()


def _can_pack(weights: list[torch.Tensor], storage_users: dict) -> bool:
    """Each weight owns its whole storage, which no other tensor shares (in this graph's
    inputs, or anywhere torch can count): moving it must not decouple an alias."""
    for w in weights:
        owns_storage = w.is_contiguous() and w.storage_offset() == 0 and w.untyped_storage().nbytes() == w.numel() * w.element_size()
        if not owns_storage or storage_users[_storage_key(w)] != 1 or _storage_use_count(w) not in (None, 1):
            return False
    return True


def _pack(weights: list[torch.nn.Parameter]) -> None:
    with unset_fake_temporarily(), torch.no_grad():
        first = weights[0]
        rows = sum(w.shape[0] for w in weights)
        buffer = torch.empty((rows, *first.shape[1:]), dtype=first.dtype, device=first.device)
        start = 0
        for w in weights:
            block = buffer[start : start + w.shape[0]]
            block.copy_(w)
            w.data = block  # the parameter keeps its identity; its old storage is freed
            start += w.shape[0]
    log.debug("paiton: packed %d tensors into one %s buffer", len(weights), list(buffer.shape))


def _rewrite(graph: torch.fx.Graph, group: list[torch.fx.Node], weights: list[torch.Tensor]) -> None:
    import paiton.fusion.packed_linear  # noqa: F401  (registers torch.ops.paiton.packed_linear)

    _replace_by_one_product(graph, group, weights, torch.ops.paiton.packed_linear.default,
                            ([node.args[1] for node in group],))


def _rewrite_fp8(graph: torch.fx.Graph, group: list[torch.fx.Node], weights: list[torch.Tensor]) -> None:
    _replace_by_one_product(graph, group, weights, torch.ops.paiton.fp8_linear.default,
                            ([node.args[1][0] for node in group], [node.args[2][0] for node in group]))


def _replace_by_one_product(graph, group, weights, op, operands) -> None:
    """`op(x, *operands)` before the group's first linear, and each linear's uses moved to its
    `narrow` of that product (the rows of its weight)."""
    x = group[0].args[0]
    with graph.inserting_before(group[0]):
        product = graph.call_function(op, (x, *operands))
        parts, start = [], 0
        for node, w in zip(group, weights):
            parts.append(graph.call_function(torch.narrow, (product, -1, start, w.shape[0])))
            node.replace_all_uses_with(parts[-1])
            start += w.shape[0]
    for node in group:
        graph.erase_node(node)
    _set_example_values([product] + parts)


def _set_example_values(new_nodes) -> None:
    """Dynamo's nodes carry fake example values that Inductor's pre-grad passes read; give
    the new nodes theirs, computed in the fake mode of their inputs' example values."""
    def example(a):
        if isinstance(a, (list, tuple)):
            return [example(item) for item in a]
        return a.meta.get("example_value") if isinstance(a, torch.fx.Node) else a

    for node in new_nodes:
        args = [example(a) for a in node.args]
        if any(a is None or (isinstance(a, list) and any(item is None for item in a)) for a in args):
            return
        mode = next((getattr(a, "fake_mode", None) for a in args if getattr(a, "fake_mode", None)), None)
        if mode is None:  # the weights of a list argument
            mode = next((getattr(t, "fake_mode", None) for a in args if isinstance(a, list) for t in a
                         if getattr(t, "fake_mode", None)), None)
        if mode is None:
            return
        with mode:
            node.meta["example_value"] = node.target(*args)

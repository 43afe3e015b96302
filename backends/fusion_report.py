"""Which fusions fired, per compiled graph, and for a given model.

The backend records one `GraphFusions` per graph it compiles (a model usually gives two:
prefill and decode; recompiles add more). A record remembers the tensors the graph was
compiled with (parameters, buffers, inputs), so `fusion_counts(model)` finds the graphs of
that model however it was compiled: `torch.compile(model)`, `torch.compile(model.forward)`,
`model.compile()`, or transformers' `generate` with a `CompileConfig`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GraphFusions:
    """The rewrites Paiton made in one compiled graph."""

    compile_id: str  # Dynamo's "frame/attempt" id, as in TORCH_LOGS output
    inner_compiler: str
    counts: dict[str, int]  # pass name -> subgraphs rewritten
    target: str = ""  # the arch whose lowering table the passes followed
    _tensors: dict[int, weakref.ref] = field(default_factory=dict, repr=False, compare=False)

    def add_tensors(self, tensors: Iterable) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._tensors[id(t)] = weakref.ref(t)

    def uses_any(self, tensors: Iterable[torch.Tensor]) -> bool:
        for t in tensors:
            ref = self._tensors.get(id(t))
            if ref is not None and ref() is t:  # the id may have been reused after a free
                return True
        return False


_records: list[GraphFusions] = []


def record_graph(
    gm: torch.fx.GraphModule, example_inputs, compile_id: str, inner_compiler: str, counts: dict[str, int], target: str = ""
) -> GraphFusions:
    record = GraphFusions(compile_id=compile_id, inner_compiler=inner_compiler, counts=dict(counts), target=target)
    record.add_tensors(example_inputs)
    record.add_tensors(list(gm.parameters()) + list(gm.buffers()))  # when Dynamo keeps modules as attributes
    _records.append(record)
    return record


def attribute_runs(compiled, record: GraphFusions, example_inputs):
    """Wrap a compiled graph so that running it with another module's parameters attributes the
    graph to that module too.

    Dynamo passes parameters as graph inputs and guards on their shapes, not their identity: a
    second instance of the same model class runs the first one's compiled graph without a new
    compile. The check costs one dict lookup per call (the first parameter input's identity).
    """
    anchor = next((i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)), None)
    if anchor is None:
        return compiled

    def run(*args):
        if not record.uses_any((args[anchor],)):
            record.add_tensors(args)
        return compiled(*args)

    return run


def clear_fusion_records() -> None:
    _records.clear()


def _tensors_of(model) -> list[torch.Tensor]:
    """Parameters and buffers of a module, a torch.compile'd module, or a compiled bound method."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, torch.nn.Module) and not hasattr(model, "_orig_mod"):
            return list(model.parameters()) + list(model.buffers())
        model = (
            getattr(model, "_orig_mod", None)  # OptimizedModule
            or getattr(model, "_torchdynamo_orig_callable", None)  # torch.compile(fn)
            or getattr(model, "__self__", None)  # bound method, e.g. model.forward
            or model
        )
    raise TypeError(
        f"fusion_counts() needs a torch.nn.Module, a torch.compile'd module or a compiled bound method "
        f"of one; got {type(model).__name__}. Call fusion_counts() without arguments for every graph."
    )


def fusion_graphs(model=None) -> list[GraphFusions]:
    """Records of the graphs Paiton compiled (for `model`, or all since the last reset)."""
    if model is None:
        return list(_records)
    tensors = _tensors_of(model)
    return [r for r in _records if r.uses_any(tensors)]


def fusion_counts(model=None) -> dict[str, int]:
    """How many subgraphs each Paiton fusion rewrote, summed over the compiled graphs of
    `model` (a module, compiled module or compiled bound method), or over every graph compiled
    since the last `torch._dynamo.reset()` when `model` is None. Every pass that runs by default is
    listed, fired or not, and any other that ran (l2_prefetch or norm_linear, when asked for).

    >>> compiled = torch.compile(model, backend="paiton"); compiled(ids)
    >>> paiton.fusion_counts(compiled)
    {'fused_add_rms_norm': 8, 'rms_norm': 9}
    """
    from paiton.passes.pass_manager import PASS_NAMES, switched_on_by_default

    totals = {name: 0 for name in PASS_NAMES if switched_on_by_default(name)}
    for record in fusion_graphs(model):
        for name, n in record.counts.items():
            totals[name] = totals.get(name, 0) + n
    return totals

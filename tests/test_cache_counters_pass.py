"""The cache-counters pass: a static cache's per-layer position counters are read by the
cache-write kernel (no slot index tensor per layer) and advanced by one foreach, through
backend="paiton".

The module is a stack of attention layers, each over its own static cache with its own 0-dim
position counter, written as transformers' StaticLayer writes (`slots = arange(S) + counter;
counter.add_(S)`). Outputs, caches and counters after the step are compared with eager's
(the fused ops run their CPU references; attention's computes in float64: 1e-5 in fp32).
"""

import contextlib
import unittest.mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER, CachedAttention, attention_inputs, capture_paiton_graphs, fusions

from paiton.fusion import qk_norm_rope as qk_module
from paiton.fusion import rms_norm as rms_norm_module

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
Q_HEADS, KV_HEADS, HEAD_DIM, CACHE_LEN = 4, 2, 16, 12


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    for module in (qk_module, rms_norm_module):
        monkeypatch.setattr(module, "is_interpreted", lambda kernel: False)


@contextlib.contextmanager
def rewritten_graphs():
    """Yields a list of the ATen graphs as Paiton's passes leave them, for every graph compiled
    in the block."""
    from paiton.passes.pass_manager import PaitonPassManager

    graphs, original = [], PaitonPassManager.__call__

    def recording(self, graph):
        original(self, graph)
        graphs.append(graph)

    with unittest.mock.patch.object(PaitonPassManager, "__call__", recording):
        yield graphs


def counter_uses(graph):
    """(the counters: 0-dim graph inputs; the cache writes' slots arguments; the foreach
    advances; the adds left that advance a counter by a constant)."""
    counters = [n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta["val"], torch.Tensor)
                and n.meta["val"].dim() == 0]
    slots = [n.kwargs["slots"] for n in graph.nodes if n.op == "call_function"
             and n.target is torch.ops.higher_order.auto_functionalized
             and n.args[0] is torch.ops.paiton.qk_norm_rope_cache.default]
    foreach = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten._foreach_add.Scalar]
    single = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.add.Tensor
              and n.args[0] in counters and isinstance(n.args[1], int)]
    return counters, slots, foreach, single


class CountedLayers(torch.nn.Module):
    """`layers` CachedAttention layers, each with a position counter as StaticLayer keeps it.
    `variant` writes what the pass must leave alone: slots that do not start at the counter
    ("offset_slots"), a counter read after it advanced ("read_after_advance"), counters advanced
    by different amounts ("mixed_steps")."""

    def __init__(self, layers, start, batch=1, variant=None):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            CachedAttention(batch, Q_HEADS, KV_HEADS, HEAD_DIM, CACHE_LEN, torch.float32) for _ in range(layers))
        for i in range(layers):
            self.register_buffer(f"counter{i}", torch.tensor(start))
        self.variant = variant

    def forward(self, q, k, v, cos, sin):
        seq, out, late_reads = q.shape[1], 0, 0
        for i, layer in enumerate(self.layers):
            counter = getattr(self, f"counter{i}")
            slots = torch.arange(seq) + counter
            if self.variant == "offset_slots":
                slots = torch.arange(1, seq + 1) + counter - 1
            counter.add_(2 * seq if self.variant == "mixed_steps" and i % 2 else seq)
            out = out + layer(q, k, v, cos, sin, slots)
            if self.variant == "read_after_advance" and i == 0:
                late_reads = late_reads + counter
        return out + late_reads

    def counters(self):
        return [getattr(self, f"counter{i}").clone() for i in range(len(self.layers))]

    def caches(self):
        return [c.clone() for layer in self.layers for c in (layer.k_cache, layer.v_cache)]


def run_step(layers, seq, start, batch=1, variant=None, options=EAGER_INNER, steps=1, dynamic_seq=False):
    """(compiled output, eager output, graph records, rewritten graphs) after `steps` steps;
    asserts that the caches and counters match eager's after every step. `dynamic_seq`: the
    token count is symbolic in the graph (as in a prefill compiled for any prompt length)."""
    torch._dynamo.reset()
    compiled_module = CountedLayers(layers, start, batch, variant)
    eager_module = CountedLayers(layers, start, batch, variant)
    eager_module.load_state_dict(compiled_module.state_dict())
    compiled = torch.compile(compiled_module, backend="paiton", options=options)
    with torch.no_grad(), rewritten_graphs() as rewritten, capture_paiton_graphs() as graphs:
        for step in range(steps):
            args = attention_inputs(batch, seq, Q_HEADS, KV_HEADS, HEAD_DIM, start + step * seq, torch.float32, seed=step)[:5]
            if dynamic_seq:
                for arg in args:
                    torch._dynamo.mark_dynamic(arg, 1)
            expected, actual = eager_module(*args), compiled(*args)
            for a, e in zip(compiled_module.counters(), eager_module.counters()):
                assert torch.equal(a, e), (compiled_module.counters(), eager_module.counters())
            for a, e in zip(compiled_module.caches(), eager_module.caches()):
                # The same roundings: exact, unless Inductor generates the code around the ops
                torch.testing.assert_close(a, e, **(TOLERANCE if options is None else dict(rtol=0, atol=0)))
    return actual, expected, graphs, rewritten


def fused_counts(layers, slots=None, advanced=None, decode=True):
    """The passes a CountedLayers step fires: per layer the norms, QK-norm + RoPE, the cache
    write and (a static token count: `decode`) decode attention; the counter pass rewrites
    each layer's slots and merges the advances of two or more counters."""
    slots = layers if slots is None else slots
    advanced = (layers if layers >= 2 else 0) if advanced is None else advanced
    return fusions(rms_norm=2 * layers, qk_norm_rope=layers, kv_cache_write=layers, decode_attention=layers if decode else 0,
                   cache_counters=slots + advanced)


@settings(deadline=None, max_examples=8)
@given(layers=st.integers(1, 4), seq=st.sampled_from([1, 2, 5]), batch=st.integers(1, 2), data=st.data())
def test_counters_are_read_by_the_cache_write_and_advanced_together(layers, seq, batch, data):
    start = data.draw(st.integers(0, CACHE_LEN - seq))
    actual, expected, graphs, rewritten = run_step(layers, seq, start, batch)
    assert graphs[0][2] == fused_counts(layers)
    counters, slots, foreach, single = counter_uses(rewritten[0])
    assert len(counters) == layers and slots == counters  # each layer's write reads its counter
    if layers >= 2:
        assert len(foreach) == 1 and foreach[0].args == (counters, seq) and not single
    else:
        assert not foreach and len(single) == 1
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_two_steps_advance_from_the_advanced_counters():
    """The second step reads the counters the first one advanced (CUDA-graph-free replay of
    the same compiled graph)."""
    actual, expected, graphs, _ = run_step(3, 1, 4, steps=2)
    assert len(graphs) == 1 and graphs[0][2] == fused_counts(3)
    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("variant, slots, advanced", [
    ("offset_slots", 0, 3),        # arange(1, S + 1) + c - 1: the right slots, another pattern
    ("read_after_advance", 3, 2),  # layer 0's counter is read after its advance: it stays apart
    ("mixed_steps", 3, 2),         # by S in layers 0 and 2 (merged), by 2S in layer 1 (alone)
])
def test_near_misses_are_left_alone(variant, slots, advanced):
    actual, expected, graphs, _ = run_step(3, 2, 3, variant=variant)
    assert graphs[0][2] == fused_counts(3, slots=slots, advanced=advanced)
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_switched_off():
    _, _, graphs, _ = run_step(2, 1, 3, options={**EAGER_INNER, "paiton.cache_counters": False})
    assert graphs[0][2] == fusions(rms_norm=4, qk_norm_rope=2, kv_cache_write=2, decode_attention=2)
    assert graphs[0][1]["aten._foreach_add.Scalar"] == 0


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic length"])
def test_through_inductor_the_counters_advance_in_place(monkeypatch, dynamic):
    """Inductor turns the foreach and its copies back into the counters into one in-place
    `_foreach_add_` (the form it emits one kernel for on a GPU): no copy into a counter is left.
    With a dynamic token count (a prefill's) the counters advance by the symbolic length."""
    import torch._inductor.fx_passes.post_grad as post_grad

    after_reinplacing = []
    original = post_grad.reinplace_inplaceable_ops

    def recording(fake_tensor_updater, graph):
        original(fake_tensor_updater, graph)
        after_reinplacing.append(graph)

    monkeypatch.setattr(post_grad, "reinplace_inplaceable_ops", recording)
    # Compiled here, not taken from the FX graph cache: reinplacing must run to be checked.
    with torch._inductor.config.patch(fx_graph_cache=False):
        actual, expected, graphs, _ = run_step(3, 2 if dynamic else 1, 5, options=None, steps=2, dynamic_seq=dynamic)
    assert graphs[0][2] == fused_counts(3, decode=not dynamic)
    graph = after_reinplacing[0]
    counters = {n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta["val"], torch.Tensor)
                and n.meta["val"].dim() == 0}
    inplace = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten._foreach_add_.Scalar]
    assert len(inplace) == 1 and set(inplace[0].args[0]) == counters
    step = inplace[0].args[1]  # the token count: the graph's symbolic length, or the constant 1
    assert isinstance(step, torch.fx.Node) and isinstance(step.meta["val"], torch.SymInt) if dynamic else step == 1
    assert not [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.copy_.default
                and n.args[0] in counters]
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_a_counter_on_another_device_stays_an_index_tensor():
    """`arange(S, device=gpu) + cpu_counter` is valid eager (a 0-dim CPU tensor broadcasts), but
    the cache-write kernel cannot read a CPU counter: such slots are left as they are."""
    from paiton.passes.cache_counters import start_of_consecutive_slots

    graph = torch.fx.Graph()
    counter = graph.placeholder("counter")
    arange = graph.call_function(torch.ops.prims.iota.default, (3,), dict(start=0, step=1, dtype=torch.int64,
                                                                          device=torch.device("meta"), requires_grad=False))
    slots = graph.call_function(torch.ops.aten.add.Tensor, (arange, counter))
    arange.meta["val"], slots.meta["val"] = torch.arange(3, device="meta"), torch.arange(3, device="meta")
    counter.meta["val"] = torch.tensor(4, device="meta")
    assert start_of_consecutive_slots(slots) is counter
    counter.meta["val"] = torch.tensor(4)  # on the CPU
    assert start_of_consecutive_slots(slots) is None


def test_a_counter_read_after_the_first_copy_back_keeps_its_own_advance():
    """The merged advance goes before the first copy back into a counter; a counter that the
    graph reads after that point (here: after the other counter's copy) would see its new value
    too early, so only the others are merged (here: none, one counter is left)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from paiton.passes.cache_counters import CacheCountersPass

    mode = FakeTensorMode()
    graph = torch.fx.Graph()
    counters = [graph.placeholder(f"counter{i}") for i in range(3)]
    advanced = [graph.call_function(torch.ops.aten.add.Tensor, (c, 1)) for c in counters]
    copies = [graph.call_function(torch.ops.aten.copy_.default, (counters[0], advanced[0]))]
    late_read = graph.call_function(torch.ops.aten.mul.Tensor, (counters[1], 2))  # after counter0's copy back
    copies += [graph.call_function(torch.ops.aten.copy_.default, (c, a)) for c, a in zip(counters[1:], advanced[1:])]
    graph.output((late_read,))
    with mode:
        for node in counters + advanced + copies + [late_read]:
            node.meta["val"] = torch.tensor(3)
    assert CacheCountersPass()(graph) == 2  # counter0 and counter2 merged
    foreach = [n for n in graph.nodes if n.target is torch.ops.aten._foreach_add.Scalar]
    assert len(foreach) == 1 and foreach[0].args == ([counters[0], counters[2]], 1)
    assert advanced[1] in graph.nodes and copies[1].args[1] is advanced[1]

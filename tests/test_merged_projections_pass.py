"""The merged-projections pass: linear layers that share an input become one product against
their weights packed into one buffer, through backend="paiton" (eager inner compiler).

Tolerance: the merged product is one GEMM of N = sum of the parts' rows where eager runs one
per part; a BLAS may block the K reduction differently for another N, so fp32 compares within
1e-5 (relative) and bf16 within one bf16 rounding of the output (2**-7 relative, plus a floor
for values near zero). The packing itself is checked exactly: every weight keeps its values.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER, capture_paiton_graphs, compile_and_capture, fusions

import paiton
from paiton.fusion.packed_linear import packed_weight

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2e-2)}


class SharedInput(torch.nn.Module):
    """`parts` bias-free projections of one input (Qwen3's q/k/v, gate/up), summed back to the
    input width so the output depends on every part."""

    def __init__(self, hidden, outs, dtype, bias=False):
        super().__init__()
        self.projections = torch.nn.ModuleList(torch.nn.Linear(hidden, n, bias=bias, dtype=dtype) for n in outs)

    def forward(self, x):
        return [p(x) for p in self.projections]


def storages(module) -> set:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def assert_packed(weights) -> None:
    """One buffer, the weights as consecutive row blocks in order, filling it exactly."""
    base = weights[0].untyped_storage()
    offset = 0
    for w in weights:
        assert w.untyped_storage().data_ptr() == base.data_ptr()
        assert w.storage_offset() == offset and w.is_contiguous()
        offset += w.numel()
    assert base.nbytes() == offset * weights[0].element_size()


@settings(deadline=None, max_examples=12)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    hidden=st.sampled_from([16, 48, 64]),
    outs=st.lists(st.sampled_from([8, 16, 24, 64]), min_size=2, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_shared_input_projections_are_merged(batch, seq, hidden, outs, dtype):
    torch._dynamo.reset()
    module = SharedInput(hidden, outs, dtype)
    x = torch.randn(batch, seq, hidden, dtype=dtype)
    before = [p.detach().clone() for p in module.parameters()]
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    assert graphs[0][2] == fusions(merged_projections=1)
    assert graphs[0][1]["paiton.packed_linear.default"] == 1 and graphs[0][1]["aten.mm.default"] == 0
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOLERANCE[dtype])
    weights = list(module.parameters())
    assert_packed(weights)
    # The model holds one copy: the same values, in one buffer the size of the weights.
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    # The eager forward still works on the packed parameters, and agrees.
    with torch.no_grad():
        for a, e in zip(module(x), expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_packing_happens_once_and_a_second_graph_reuses_it():
    """The decode step is compiled after prefill: it finds the weights packed and merges them
    without moving them again (CUDA graphs of the first graph keep valid addresses)."""
    torch._dynamo.reset()
    module = SharedInput(32, [32, 16, 16], torch.float32)
    compile_and_capture(module, torch.randn(1, 7, 32))
    buffer = module.projections[0].weight.untyped_storage().data_ptr()
    _, graphs = compile_and_capture(module, torch.randn(2, 1, 32))
    assert graphs and graphs[-1][2] == fusions(merged_projections=1)
    assert module.projections[0].weight.untyped_storage().data_ptr() == buffer


@pytest.mark.parametrize("case", ["bias", "different_inputs", "plain_tensor_weights", "shared_storage", "one"])
def test_near_misses_are_left_alone(case):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 16)
    if case == "bias":
        module = SharedInput(16, [8, 8], torch.float32, bias=True)
    elif case == "one":
        module = SharedInput(16, [8], torch.float32)
    elif case == "different_inputs":

        class DifferentInputs(SharedInput):
            def forward(self, x):
                return self.projections[0](x), self.projections[1](x + 1)

        module = DifferentInputs(16, [8, 8], torch.float32)
    elif case == "plain_tensor_weights":
        # Not parameters: a CUDA graph would copy such inputs at each replay, their own
        # elements only; a product reading past the first one's rows would read stale memory.
        weights = [torch.randn(8, 16), torch.randn(8, 16)]

        class PlainTensors(torch.nn.Module):
            def forward(self, x, w0, w1):
                return torch.nn.functional.linear(x, w0), torch.nn.functional.linear(x, w1)

        expected = PlainTensors()(x, *weights)
        with torch.no_grad(), capture_paiton_graphs() as graphs:
            actual = torch.compile(PlainTensors(), backend="paiton", options=EAGER_INNER)(x, *weights)
        assert graphs[0][2] == fusions()
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e)
        return
    elif case == "shared_storage":
        # Weights that are already views of one buffer, not in packing order (say, loaded
        # that way): moving them could break whatever else holds that buffer.
        module = SharedInput(16, [8, 8], torch.float32)
        buffer = torch.randn(16, 16)
        module.projections[0].weight.data = buffer[8:]
        module.projections[1].weight.data = buffer[:8]
    owned_before = storages(module)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    assert graphs[0][2] == fusions()
    assert storages(module) == owned_before
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_switched_off():
    torch._dynamo.reset()
    module = SharedInput(16, [8, 8], torch.float32)
    owned_before = storages(module)
    _, graphs = compile_and_capture(module, torch.randn(2, 16), options={"paiton.merged_projections": False})
    assert graphs[0][2]["merged_projections"] == 0 and "merged_projections" in paiton.PASS_NAMES
    assert storages(module) == owned_before


def test_a_weight_replaced_after_compiling_is_an_error_not_garbage():
    """The product reads the packed buffer; if the user points any of its parameters somewhere
    else (Dynamo does not guard storage), the op says so instead of using stale weights."""
    torch._dynamo.reset()
    module = SharedInput(16, [8, 8, 8], torch.float32)
    compiled = torch.compile(module, backend="paiton", options=EAGER_INNER)
    x = torch.randn(2, 16)
    with torch.no_grad():
        compiled(x)
        module.projections[2].weight.data = torch.randn(8, 16)
        with pytest.raises(RuntimeError, match="weight 2 .* is not where the packed buffer has it"):
            compiled(x)
    buffer = torch.randn(24, 16)
    assert torch.equal(packed_weight(list(buffer.split(8))), buffer)


def test_a_weight_used_on_two_inputs_is_packed_once():
    """W on x1 beside A, and on x2 beside B: W joins the first group only (packing it into both
    would move it out of the first buffer). Found in review: A's product came out as B's."""
    torch._dynamo.reset()

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.a, self.b = (torch.nn.Linear(16, 8, bias=False) for _ in range(3))

        def forward(self, x1, x2):
            return self.w(x1), self.a(x1), self.w(x2), self.b(x2)

    module = TwoInputs()
    x1, x2 = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        expected = module(x1, x2)
        with capture_paiton_graphs() as graphs:
            actual = torch.compile(module, backend="paiton", options=EAGER_INNER)(x1, x2)
        again = torch.compile(module, backend="paiton", options=EAGER_INNER)(x1, x2)
    assert graphs[0][2]["merged_projections"] == 1
    assert_packed([module.w.weight, module.a.weight])
    for a, b, e in zip(actual, again, expected):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float32])
        torch.testing.assert_close(b, e, **TOLERANCE[torch.float32])


def test_autocast_and_aliased_weights_are_left_alone():
    """Under autocast a linear computes in the autocast dtype (the merged op would not); a
    weight whose storage another tensor shares must not be moved away from it."""
    torch._dynamo.reset()

    class Autocast(SharedInput):
        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().forward(x)

    module, x = Autocast(16, [8, 8], torch.float32), torch.randn(2, 16)
    with torch.no_grad():
        expected = module(x)
    actual, graphs = compile_and_capture(module, x)
    assert graphs[0][2]["merged_projections"] == 0
    assert [a.dtype for a in actual] == [e.dtype for e in expected] == [torch.bfloat16] * 2

    torch._dynamo.reset()
    module = SharedInput(16, [8, 8], torch.float32)
    alias = module.projections[1].weight.detach().view(-1)  # e.g. a flat view some other code keeps
    _, graphs = compile_and_capture(module, x)
    assert graphs[0][2]["merged_projections"] == 0
    assert alias.data_ptr() == module.projections[1].weight.data_ptr()


def test_a_packed_model_saves_and_loads_with_transformers(tmp_path):
    """Packed parameters share one storage per group; transformers' save_pretrained must still
    write every weight (not take the shared storage for tied weights and drop some)."""
    from transformers import Qwen3ForCausalLM

    from paiton.models.qwen3 import build_qwen3

    torch._dynamo.reset()
    model = build_qwen3("tiny", dtype=torch.float32, num_hidden_layers=1)
    with torch.no_grad():
        torch.compile(model, backend="paiton", options=EAGER_INNER)(torch.randint(0, 512, (1, 4)))
    attention = model.model.layers[0].self_attn
    assert_packed([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    model.save_pretrained(tmp_path)
    saved, loaded = model.state_dict(), Qwen3ForCausalLM.from_pretrained(tmp_path).state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)

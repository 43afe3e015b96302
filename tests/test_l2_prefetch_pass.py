"""The L2 prefetch pass (passes/l2_prefetch.py): the first norm or rotary op after a product is
given the next Paiton product's weight to prefetch, and nothing else changes.

Graphs: decode layers written with Paiton's ops (as the other passes leave a decode step:
fused add + RMSNorm, packed q/k/v, q/k norm + rotary, o_proj, fused add + RMSNorm, packed
gate/up, SwiGLU into down_proj; a final norm and lm_head), traced with make_fx, then the pass
alone. o_proj is, per layer, Paiton's product or a plain `mm` (a prefill's: the window ends
there without a prefetch). The rewritten graph must compute exactly what it did (the ops run
their CPU references, which ignore the prefetch; on a GPU it is a hint), each prefetch must be
the next product's first weight with the packed weights' bytes, and the count must say how
many. Near misses: a product right after a product (gate/up into down_proj), a weight computed
in the graph (the lm_head's here, in one variant), a window that already prefetches (the pass
run twice).

End to end (tiny Qwen3, plain and FP8, backend="paiton", eager inner compiler,
`paiton.target="sm_90"`): the decode graph gets one prefetch per product after a norm or the
rotary kernel (q/k/v, o_proj, gate/up per layer, and the lm_head), the prefill graph two per
layer (three for FP8; its lm_head is `mm`), and the greedy tokens' logits equal those without
the pass bit for bit. On the CPU target, and AMD's, the pass does not run.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER

import paiton
import paiton.fusion.packed_linear  # noqa: F401  (registers the ops)
import paiton.fusion.qk_norm_rope  # noqa: F401
import paiton.fusion.rms_norm  # noqa: F401
from paiton.fusion.l2_prefetch import CHUNK_BYTES, prefetch_plan
from paiton.passes.l2_prefetch import L2PrefetchPass

ops = torch.ops.paiton
HEADS, KV_HEADS, HEAD_DIM, EPS = 2, 1, 8, 1e-6


def packed(*rows_each: int, k: int, dtype) -> list[torch.Tensor]:
    """Weights of these row counts lying consecutively in one buffer (as merged projections pack them)."""
    buffer = torch.randn(sum(rows_each), k, dtype=dtype) * k ** -0.5
    return list(buffer.split(list(rows_each)))


def make_model(o_proj_kinds: list[str], hidden: int, inner: int, dtype, computed_lm_head: bool):
    """(step function, its inputs) for len(o_proj_kinds) decode layers."""
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    params = []
    for _ in o_proj_kinds:
        params.append(dict(n1=1 + 0.1 * torch.randn(hidden, dtype=dtype), qkv=packed(q_out, kv_out, kv_out, k=hidden, dtype=dtype),
                           q_w=1 + 0.1 * torch.randn(HEAD_DIM, dtype=dtype), k_w=1 + 0.1 * torch.randn(HEAD_DIM, dtype=dtype),
                           o=packed(hidden, k=q_out, dtype=dtype), n2=1 + 0.1 * torch.randn(hidden, dtype=dtype),
                           gate_up=packed(inner, inner, k=hidden, dtype=dtype), down=packed(hidden, k=inner, dtype=dtype)))
    final = dict(norm=1 + 0.1 * torch.randn(hidden, dtype=dtype), lm_head=packed(48, k=hidden, dtype=dtype))
    flat = [t for p in params for v in p.values() for t in (v if isinstance(v, list) else [v])]
    flat += [final["norm"], *final["lm_head"]]

    def step(h, cos, sin, *weights):
        weights = list(weights)

        def take(n):
            taken = weights[:n]
            del weights[:n]
            return taken

        rows = h.shape[0]
        residual = None
        for kind in o_proj_kinds:
            n1, wq, wk, wv, q_w, k_w, wo, n2, wg, wu, wd = take(11)
            if residual is None:
                x, residual = ops.rms_norm(h, n1, EPS), h
            else:
                x, residual = ops.fused_add_rms_norm(h, residual, n1, EPS)
            qkv = ops.packed_linear(x, [wq, wk, wv])
            q = qkv[:, :q_out].reshape(rows, 1, HEADS, HEAD_DIM)
            k = qkv[:, q_out:q_out + kv_out].reshape(rows, 1, KV_HEADS, HEAD_DIM)
            q, k = ops.qk_norm_rope(q, k, q_w, k_w, cos, sin, EPS)
            attn = (q * k.sum(1, keepdim=True)).transpose(1, 2).reshape(rows, q_out)  # stands in for attention
            o = ops.packed_linear(attn, [wo]) if kind == "paiton" else torch.mm(attn, wo.t())
            x, residual = ops.fused_add_rms_norm(o, residual, n2, EPS)
            gate_up = ops.packed_linear(x, [wg, wu])
            h = ops.silu_mul_packed_linear(gate_up[:, :inner], gate_up[:, inner:], [wd])
        norm, lm_head = take(2)
        x, _ = ops.fused_add_rms_norm(h, residual, norm, EPS)
        return ops.packed_linear(x, [lm_head * 1.0 if computed_lm_head else lm_head])

    return step, flat


def expected_prefetches(o_proj_kinds, computed_lm_head):
    return sum(2 + (kind == "paiton") for kind in o_proj_kinds) + (0 if computed_lm_head else 1)


def products(graph):
    paiton_products = {ops.packed_linear.default: 1, ops.silu_mul_packed_linear.default: 2}
    return [(n, n.args[paiton_products[n.target]]) for n in graph.nodes
            if n.op == "call_function" and n.target in paiton_products]


@settings(max_examples=12, deadline=None)
@given(o_proj_kinds=st.lists(st.sampled_from(["paiton", "mm"]), min_size=1, max_size=3), rows=st.sampled_from([1, 2]),
       hidden=st.sampled_from([16, 24]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       computed_lm_head=st.booleans())
def test_each_window_prefetches_the_next_products_weight(o_proj_kinds, rows, hidden, dtype, computed_lm_head):
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    step, weights = make_model(o_proj_kinds, hidden, 40, dtype, computed_lm_head)
    h = torch.randn(rows, hidden, dtype=dtype)
    cos, sin = torch.randn(1, 1, HEAD_DIM, dtype=dtype), torch.randn(1, 1, HEAD_DIM, dtype=dtype)
    inputs = (h, cos, sin, *weights)
    gm = make_fx(step)(*inputs)
    before = gm(*inputs)

    count = L2PrefetchPass()(gm.graph)
    gm.recompile()

    assert count == expected_prefetches(o_proj_kinds, computed_lm_head)
    assert torch.equal(gm(*inputs), before)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    windows = [n for n in gm.graph.nodes if n.op == "call_function" and n.kwargs.get("prefetch") is not None]
    assert len(windows) == count
    for window in windows:
        # The next Paiton product after the window: its first weight, all of its packed bytes.
        node, product_weights = min((p for p in products(gm.graph) if order[p[0]] > order[window]), key=lambda p: order[p[0]])
        assert window.kwargs["prefetch"] is product_weights[0]
        assert window.kwargs["prefetch_bytes"] == sum(w.meta["val"].numel() * w.meta["val"].element_size()
                                                      for w in product_weights)
        assert window.target in (ops.rms_norm.default, ops.fused_add_rms_norm.default, ops.qk_norm_rope.default)
    # down_proj (right after gate/up) never gets one: no window op between them.
    for node, product_weights in products(gm.graph):
        if node.target is ops.silu_mul_packed_linear.default:
            assert all(w.kwargs.get("prefetch") is not product_weights[0] for w in windows)
    assert L2PrefetchPass()(gm.graph) == 0  # a window that prefetches keeps its prefetch


@given(nbytes=st.integers(0, 1 << 30), budget=st.integers(0, 64 << 20), max_programs=st.integers(1, 4096),
       chunk_bytes=st.sampled_from([16 << 10, CHUNK_BYTES, 256 << 10]))
def test_the_prefetch_plan_covers_what_it_asks_for(nbytes, budget, max_programs, chunk_bytes):
    """Bytes: at most the weight and the budget, a multiple of 16, all of min(weight, budget)
    but its last 15; chunks a program: a power of two, the fewest that cover the bytes in at most
    max_programs programs; programs: as few as cover them, each with a chunk to ask for."""
    asked, programs, chunks = prefetch_plan(nbytes, budget, max_programs, chunk_bytes)
    assert asked == min(nbytes, budget) // 16 * 16
    if asked == 0:
        assert programs == chunks == 0
        return
    assert chunks & (chunks - 1) == 0 and programs <= max_programs
    needed = -(-asked // chunk_bytes)
    assert chunks * programs >= needed > chunks * (programs - 1)
    assert chunks == 1 or (chunks // 2) * max_programs < needed


@pytest.mark.parametrize("fp8", [False, True])
def test_a_qwen3_gets_one_prefetch_per_product_after_a_window(fp8):
    """bf16-style products: prefill gets q/k/v's and gate/up's a layer (its o_proj and lm_head are
    `mm`), decode (one row) also o_proj's and the lm_head's. An FP8 model (models/fp8.py): its
    decoder linears are fp8_linear at any row count, so prefill's o_proj gets one as well (its
    bf16 lm_head is `mm` there). The greedy steps' logits equal those without the pass."""
    from paiton.models.hf_loop import hf_static_cache_greedy
    from paiton.models.qwen3 import build_qwen3

    model = build_qwen3("tiny", dtype=torch.float32, seed=2, num_hidden_layers=2)
    model = paiton.quantize_fp8(model) if fp8 else model
    layers = model.config.num_hidden_layers
    input_ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    results = {}
    for on in (True, False):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="paiton",
                                 options={**EAGER_INNER, "paiton.target": "sm_90", "paiton.l2_prefetch": on})
        with torch.no_grad():
            results[on] = hf_static_cache_greedy(compiled, model, input_ids, new_tokens=3)
        counts = [g.counts.get("l2_prefetch") for g in paiton.fusion_graphs(compiled)]
        assert counts == ([(3 if fp8 else 2) * layers, 3 * layers + 1] if on else [None, None])
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))


@pytest.mark.parametrize("target", ["cpu", "gfx942", "sm_80"])
def test_the_pass_runs_only_when_asked_and_where_the_chip_can_prefetch(monkeypatch, target):
    """Timed a loss (NOTES.md, 2026-12-06): off by default, on under PAITON_L2_PREFETCH=1 (read
    when a graph compiles) or with the option; never on a chip without the bulk prefetch."""
    from paiton.backends.options import PaitonOptions
    from paiton.backends.target import target_named
    from paiton.fusion.l2_prefetch import PREFETCH_ENV
    from paiton.passes.pass_manager import PaitonPassManager

    sm_90 = target_named("sm_90")
    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert not PaitonPassManager(target=sm_90).runs("l2_prefetch")
    assert not PaitonPassManager(PaitonOptions.from_backend_kwargs().passes, sm_90).runs("l2_prefetch")
    assert PaitonPassManager({"l2_prefetch": True}, sm_90).runs("l2_prefetch")
    monkeypatch.setenv(PREFETCH_ENV, "1")
    assert PaitonPassManager(target=sm_90).runs("l2_prefetch")
    assert PaitonPassManager(PaitonOptions.from_backend_kwargs().passes, sm_90).runs("l2_prefetch")
    assert not PaitonPassManager({"l2_prefetch": False}, sm_90).runs("l2_prefetch")
    assert not PaitonPassManager(target=target_named(target)).runs("l2_prefetch")
    assert not PaitonPassManager({"l2_prefetch": True}, target_named(target)).runs("l2_prefetch")


@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "gfx942"])
def test_launches_prefetch_only_when_asked_and_where_the_chip_can(monkeypatch, arch):
    """prefetch_arguments: nothing unless PAITON_L2_PREFETCH=1, nothing on a chip without the
    instruction, nothing for a CPU tensor (the interpreter) or a misaligned weight; else the
    table's budget for the kernel (the weight's bytes when fewer), spread over programs appended to
    its grid, which begin at its own programs' count."""
    import types

    from paiton.backends.target import target_named
    from paiton.fusion import l2_prefetch

    monkeypatch.setattr(l2_prefetch, "detect_target", lambda device: target_named(arch))
    cuda = torch.device("cuda", 0)

    def weight(nbytes, address=1 << 20):
        storage = types.SimpleNamespace(nbytes=lambda: nbytes)
        return types.SimpleNamespace(device=cuda, data_ptr=lambda: address, untyped_storage=lambda: storage,
                                     storage_offset=lambda: 0, element_size=lambda: 1)

    like = types.SimpleNamespace(device=cuda)
    big, small = weight(100 << 20), weight(3 << 20)
    monkeypatch.delenv(l2_prefetch.PREFETCH_ENV, raising=False)
    assert l2_prefetch.prefetch_arguments("fused_add_rms_norm", like, big, 100 << 20, 1) == l2_prefetch.NO_PREFETCH
    monkeypatch.setenv(l2_prefetch.PREFETCH_ENV, "1")
    launch = l2_prefetch.prefetch_arguments("fused_add_rms_norm", like, big, 100 << 20, 2)
    if arch != "sm_90":
        assert launch == l2_prefetch.NO_PREFETCH
        return
    from paiton.backends.lowering import L2_PREFETCH_BYTES

    budget, chunk = L2_PREFETCH_BYTES["fused_add_rms_norm"], L2_PREFETCH_BYTES["chunk_bytes"]
    chunks = -(-budget // chunk // L2_PREFETCH_BYTES["programs"])
    assert launch.arguments == dict(prefetch_ptr=big, prefetch_bytes=budget, prefetch_first_program=2,
                                    PREFETCH_CHUNKS=chunks, PREFETCH_CHUNK_BYTES=chunk)
    assert launch.programs == budget // chunk // chunks
    rotary = l2_prefetch.prefetch_arguments("qk_norm_rope_cache", like, small, 3 << 20, 3)
    assert rotary.arguments["prefetch_bytes"] == 3 << 20 and rotary.programs == (3 << 20) // chunk
    assert l2_prefetch.prefetch_arguments("fused_add_rms_norm", like, weight(100 << 20, address=(1 << 20) + 8),
                                          100 << 20, 1) == l2_prefetch.NO_PREFETCH
    assert l2_prefetch.prefetch_arguments("fused_add_rms_norm", types.SimpleNamespace(device=torch.device("cpu")),
                                          big, 100 << 20, 1) == l2_prefetch.NO_PREFETCH


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the bulk L2 prefetch needs sm_90 or later")
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_with_prefetch_matches_without_on_gpu(monkeypatch, batch):
    """Qwen3-8B's widths (2 layers, bf16), prefill + 8 decode steps under CUDA graphs: every
    step's logits with the prefetch (the pass, and PAITON_L2_PREFETCH=1) equal those without,
    bit for bit, and the norm and rotary kernels were launched with a prefetch (not only given
    one)."""
    from paiton.fusion import l2_prefetch, qk_norm_rope, rms_norm
    from paiton.models.hf_loop import hf_static_cache_greedy
    from paiton.models.qwen3 import build_qwen3

    launched = []

    def recording(*args):
        launch = l2_prefetch.prefetch_arguments(*args)
        launched.append(launch.programs)
        return launch

    for module in (qk_norm_rope, rms_norm):
        monkeypatch.setattr(module, "prefetch_arguments", recording)
    model = build_qwen3("qwen3-8b", device="cuda", dtype=torch.bfloat16, num_hidden_layers=2)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, 32), device="cuda")
    runs = {}
    for on in (False, True):
        launched.clear()
        monkeypatch.setenv(l2_prefetch.PREFETCH_ENV, "1" if on else "0")
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="paiton", options={"paiton.l2_prefetch": on, "triton.cudagraphs": True})
        runs[on] = hf_static_cache_greedy(compiled, model, input_ids, new_tokens=9, follow=runs.get(False))
        assert any(launched) == on, on
    for step, (with_prefetch, without) in enumerate(zip(runs[True], runs[False])):
        assert torch.equal(with_prefetch, without), (step, (with_prefetch.float() - without.float()).abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the bulk L2 prefetch needs sm_90 or later")
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_programs_appended_for_the_prefetch_write_nothing_on_gpu(monkeypatch, rows):
    """The norm and rotary kernels launched with programs appended for the prefetch (as the ops
    launch them under PAITON_L2_PREFETCH=1; fusion/l2_prefetch.py) give the same outputs bit for
    bit, and the rotary kernel's appended programs, which have no token, leave every cache slot
    but the tokens' own untouched (the caches start as NaN: a stray write would show)."""
    from paiton.fusion import l2_prefetch, qk_norm_rope, rms_norm

    appended = {False: [], True: []}

    def recording(*args):
        launch = l2_prefetch.prefetch_arguments(*args)
        appended[l2_prefetch.prefetch_requested()].append(launch.programs)
        return launch

    for module in (qk_norm_rope, rms_norm):
        monkeypatch.setattr(module, "prefetch_arguments", recording)
    cuda, dtype = torch.device("cuda"), torch.bfloat16
    weight = torch.zeros(64 << 20, dtype=torch.uint8, device=cuda)  # a product's bytes (64 MB)
    hidden, q_heads, kv_heads, head_dim, cache_len = 5120, 64, 8, 128, 64
    x, residual = (torch.randn(rows, hidden, device=cuda, dtype=dtype) for _ in range(2))
    norm_weight = torch.randn(hidden, device=cuda, dtype=dtype)
    q = torch.randn(1, rows, q_heads, head_dim, device=cuda, dtype=dtype)
    k = torch.randn(1, rows, kv_heads, head_dim, device=cuda, dtype=dtype)
    v = torch.randn(1, kv_heads, rows, head_dim, device=cuda, dtype=dtype)
    q_w, k_w = (torch.randn(head_dim, device=cuda, dtype=dtype) for _ in range(2))
    angles = torch.randn(1, rows, head_dim, device=cuda, dtype=dtype)
    slots = torch.arange(rows, device=cuda) + 7
    results = {}
    for on in (False, True):
        monkeypatch.setenv(l2_prefetch.PREFETCH_ENV, "1" if on else "0")
        caches = [torch.full((1, kv_heads, cache_len, head_dim), float("nan"), device=cuda, dtype=dtype) for _ in range(2)]
        results[on] = (
            ops.rms_norm(x, norm_weight, EPS, weight, weight.numel()),
            *ops.fused_add_rms_norm(x, residual, norm_weight, EPS, weight, weight.numel()),
            *ops.qk_norm_rope(q, k, q_w, k_w, angles.cos(), angles.sin(), EPS, weight, weight.numel()),
            ops.qk_norm_rope_cache(q, k, v, q_w, k_w, angles.cos(), angles.sin(), EPS, *caches, slots, weight,
                                   weight.numel()),
            *caches,
        )
        torch.cuda.synchronize()
    assert all(appended[True]) and not any(appended[False]), appended
    for index, (with_prefetch, without) in enumerate(zip(results[True], results[False])):  # NaN where NaN, else equal
        assert torch.equal(with_prefetch.isnan(), without.isnan()), index
        assert torch.equal(with_prefetch.nan_to_num(), without.nan_to_num()), index
    for cache in results[True][-2:]:
        written = torch.zeros(cache_len, dtype=torch.bool, device=cuda)
        written[slots] = True
        assert not cache[:, :, written].isnan().any() and cache[:, :, ~written].isnan().all()

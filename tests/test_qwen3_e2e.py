"""End to end: a tiny random Qwen3 from transformers through `backend="paiton"`.

Per decoder layer Qwen3 has four RMSNorms: input_layernorm, post_attention_layernorm, q_norm
and k_norm, plus the final norm. The residual adds feed three of them per pair of layers:

    layer 0 input norm              <- embeddings                     rms_norm
    post-attention norm (each)      <- residual + attention output    fused_add_rms_norm
    layer i>0 input norm            <- residual + previous MLP output fused_add_rms_norm
    final norm                      <- residual + last MLP output     fused_add_rms_norm
    q_norm, k_norm (each)           <- projections, per head          rms_norm

so per graph: fused_add_rms_norm = 2L, rms_norm = 2L + 1. Then the q/k norms (2 of the
rms_norm rewrites a layer) and the rotary embedding after them fuse into one op:
qk_norm_rope = L; with a static cache, the k/v cache write joins that op: kv_cache_write = L.
The q/k/v projections and the gate/up projections each become one GEMM against packed
weights: merged_projections = 2L. Each layer's MLP has one SwiGLU (silu(gate) * up): swiglu = L. Attention
over the StaticCache (repeat_kv, causal mask, SDPA) becomes the decode kernel in graphs of up
to MAX_DECODE_QUERIES query tokens (every decode step): decode_attention = L there.

On CPU the fused ops run the Triton kernels in the interpreter, so these compare the kernels'
numerics with eager as well. The tiny model's logits are below 1 in magnitude. Tolerances:
fp32 within 1e-5 (the kernels reduce in another order; measured 3e-7); bf16 within 0.03 + 2%,
about 8 bf16 ulps at the logits' scale (one-ulp differences in normalized activations pass
through bf16 matmuls; on CPU the interpreter also rounds fp32->bf16 toward zero; measured
0.008-0.010).
"""

from __future__ import annotations

import pytest
import torch
from paiton_testing import EAGER_INNER, qwen3_fusions

import paiton
from paiton.models.hf_loop import hf_static_cache_greedy
from paiton.models.qwen3 import build_qwen3

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_eager_without_cache(num_layers, dtype):
    model = build_qwen3("tiny", dtype=dtype, num_hidden_layers=num_layers)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = model(input_ids).logits
        actual = torch.compile(model, backend="paiton", options=EAGER_INNER)(input_ids).logits
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    assert paiton.fusion_counts(model) == qwen3_fusions(num_layers, queries=11, static_cache=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_decode_matches_eager(dtype):
    """Prefill and decode are two graphs; both fuse every norm, and every step's logits match."""
    num_layers = 2
    model = build_qwen3("tiny", dtype=dtype, num_hidden_layers=num_layers)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    compiled = torch.compile(model, backend="paiton", options=EAGER_INNER)
    with torch.no_grad():
        expected = hf_static_cache_greedy(model, model, input_ids, new_tokens=5)
        actual = hf_static_cache_greedy(compiled, model, input_ids, new_tokens=5, follow=expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOLERANCE[dtype], msg=lambda m: f"step {step}: {m}")

    graphs = paiton.fusion_graphs(compiled)
    assert len(graphs) == 2, [g.compile_id for g in graphs]  # prefill, decode: no recompiles per step
    assert [g.counts for g in graphs] == [qwen3_fusions(num_layers, queries=9, batch=2),
                                         qwen3_fusions(num_layers, queries=1, batch=2)]
    decode_step = graphs[1].counts
    assert decode_step["decode_attention"] == num_layers  # every layer's attention: the decode kernel


@pytest.mark.slow
def test_through_inductor_with_static_cache():
    """The default inner compiler (Inductor) on prefill + decode, fp32: same tokens, logits within
    fp32 tolerance, every norm fused in both graphs."""
    num_layers = 2
    model = build_qwen3("tiny", dtype=torch.float32, num_hidden_layers=num_layers)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 8))
    compiled = torch.compile(model, backend="paiton")
    with torch.no_grad():
        expected = hf_static_cache_greedy(model, model, input_ids, new_tokens=4)
        actual = hf_static_cache_greedy(compiled, model, input_ids, new_tokens=4)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float32])
        assert torch.equal(a.argmax(-1), e.argmax(-1))
    graphs = paiton.fusion_graphs(model)
    assert [g.counts for g in graphs] == [qwen3_fusions(num_layers, queries=8), qwen3_fusions(num_layers, queries=1)]
    assert all(g.inner_compiler == "inductor" for g in graphs)


@pytest.mark.slow
@pytest.mark.parametrize("left_padding", [None, 3], ids=["batch1", "batch2-left-padded"])
def test_transformers_generate_with_compile_config(left_padding):
    """`generate` with a static cache and CompileConfig(backend="paiton"): transformers passes
    mode="reduce-overhead" to the backend and compiles the decode step; tokens equal eager's.
    Also a batch of two whose second prompt is left-padded (padding masked out by the mask)."""
    from transformers import CompileConfig

    num_layers = 2
    model = build_qwen3("tiny", dtype=torch.float32, num_hidden_layers=num_layers)
    input_ids = torch.randint(0, model.config.vocab_size, (1 if left_padding is None else 2, 6))
    attention_mask = torch.ones_like(input_ids)
    if left_padding is not None:
        attention_mask[1, :left_padding] = 0
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, cache_implementation="static")
    expected = model.generate(input_ids, **kwargs)
    compile_config = CompileConfig(backend="paiton", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles only on GPUs otherwise
    actual = model.generate(input_ids, **kwargs, compile_config=compile_config)
    assert torch.equal(actual, expected)
    # The decode step. generate builds the boolean mask [B, 1, 1, L] outside the compiled forward
    # and passes it in; the decode kernel applies it as given (no proof of causality needed).
    assert [g.counts for g in paiton.fusion_graphs(model)] == [qwen3_fusions(num_layers, queries=1, batch=len(input_ids))]

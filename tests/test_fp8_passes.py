"""Paiton's passes on FP8 models (models/fp8.py): the Fp8Linear's `paiton.fp8_linear` call is
taken as a linear is. q/k/v and gate/up merge into one FP8 product over packed FP8 weights and
packed scales; SwiGLU feeds down_proj's one-row FP8 GEMV; the compiled model gives eager's
logits (fp32: the kernels' and references' sums differ in order only); near misses stay."""

import pytest
import torch
from paiton_testing import EAGER_INNER, fusions

import paiton
from paiton.fusion.fp8_linear import quantize_weight
from paiton.models.fp8 import Fp8Linear
from paiton.models.hf_loop import hf_static_cache_greedy
from paiton.models.qwen3 import build_qwen3


def fp8_model(**overrides):
    return paiton.quantize_fp8(build_qwen3("tiny", dtype=torch.float32, seed=2, **overrides))


def test_fp8_qwen3_prefill_and_decode_fuse_and_match_eager():
    model = fp8_model()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))  # <= 8: decode attention too
    expected = hf_static_cache_greedy(model, model, ids, new_tokens=5)
    compiled = torch.compile(model, backend="paiton", options=EAGER_INNER)
    actual = hf_static_cache_greedy(compiled, model, ids, new_tokens=5, follow=expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    common = dict(merged_projections=2 * layers, fused_add_rms_norm=2 * layers, rms_norm=2 * layers + 1,
                  qk_norm_rope=layers, decode_attention=layers, kv_cache_write=layers, cache_counters=2 * layers,
                  swiglu=layers)
    assert [g.counts for g in paiton.fusion_graphs(model)] == [
        fusions(**common),
        # Decode at batch 1: down_proj's FP8 GEMV applies SwiGLU as it loads; the bf16 lm_head
        # takes the one-row linear (the FP8 linears need no such pass: their op has the GEMV).
        fusions(**common, one_row_linear=1, silu_mul_linear=layers),
    ]
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for group in ((attention.q_proj, attention.k_proj, attention.v_proj), (mlp.gate_proj, mlp.up_proj)):
        for name in ("weight", "weight_scale"):  # one buffer each, in order
            tensors = [getattr(m, name) for m in group]
            assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
            assert [t.storage_offset() for t in tensors] == [sum(u.numel() for u in tensors[:i]) for i in range(len(tensors))]


def block_scaled(linear_rows, in_features, seed):
    """An Fp8Linear with 128 x 128 block scales, as a public FP8 checkpoint holds them."""
    w8, _ = quantize_weight(torch.randn(linear_rows, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05)
    scales = torch.rand(-(-linear_rows // 128), -(-in_features // 128), generator=torch.Generator().manual_seed(seed)) * 1e-3
    return Fp8Linear(w8, scales.contiguous())


class TwoProjections(torch.nn.Module):
    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return torch.cat([self.first(x) * 2, self.second(x)], dim=-1)


@pytest.mark.parametrize("rows, merged", [((256, 128), 1), ((200, 128), 0)], ids=["whole blocks", "a partial block first"])
def test_block_scaled_projections_merge_where_their_blocks_line_up(rows, merged):
    """Block-scaled weights merge when every one but the last fills whole 128-row blocks (the
    scales' rows then line up with the weights'); a weight of 200 rows first would put a
    block's scales across two weights: left alone."""
    module = TwoProjections(block_scaled(rows[0], 256, 0), block_scaled(rows[1], 256, 1))
    x = torch.randn(3, 256)
    with torch.no_grad():
        expected = module(x)
        actual = torch.compile(module, backend="paiton", options=EAGER_INNER)(x)
    assert paiton.fusion_counts(module)["merged_projections"] == merged
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # several rows: the same dequantize + linear


def test_mixed_scale_layouts_do_not_merge():
    w8, scales = quantize_weight(torch.randn(128, 256) * 0.05)
    module = TwoProjections(Fp8Linear(w8, scales), block_scaled(128, 256, 3))
    with torch.no_grad():
        torch.compile(module, backend="paiton", options=EAGER_INNER)(torch.randn(2, 256))
    assert paiton.fusion_counts(module)["merged_projections"] == 0


def test_fp8_model_in_the_bundled_loop_and_the_engine():
    """The bundled loop and the continuous-batching engine run an FP8 model compiled with Paiton
    to eager's greedy tokens."""
    from paiton.models.decode_loop import DecodeLoop
    from paiton.models.engine import Engine

    model = fp8_model(num_hidden_layers=1)
    prompts = [[5, 6, 7, 8], [11, 12, 13, 14, 15, 16]]
    expected = DecodeLoop(model, max_batch_size=2, max_length=32, backend="eager").generate(prompts, 6).tokens
    assert DecodeLoop(model, max_batch_size=2, max_length=32, options=EAGER_INNER).generate(prompts, 6).tokens == expected
    torch._dynamo.reset()
    assert Engine(model, max_slots=2, max_length=32, options=EAGER_INNER).generate(prompts, 6).tokens == expected

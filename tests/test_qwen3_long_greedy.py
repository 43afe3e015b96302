"""64 greedy steps of a tiny random Qwen3 in fp32, Paiton against eager, with no teacher
forcing: every token Paiton picks must be eager's, through a StaticCache decode loop and
through transformers' `generate`. (Each step runs the fused ops; on CPU their Triton kernels
in the interpreter.) The tiny model's logits differ from eager's by about 3e-7 (see
test_qwen3_e2e.py), far below the gap between its top two logits at these seeds, so a
differing token means a wrong kernel or rewrite, not rounding."""

import torch
from paiton_testing import EAGER_INNER, qwen3_fusions

import paiton
from paiton.models.hf_loop import hf_static_cache_greedy
from paiton.models.qwen3 import build_qwen3

STEPS = 64


def test_static_cache_loop_64_greedy_tokens_equal_eager():
    model = build_qwen3("tiny", dtype=torch.float32, num_hidden_layers=2, seed=1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = hf_static_cache_greedy(model, model, input_ids, new_tokens=STEPS)
    compiled = torch.compile(model, backend="paiton", options=EAGER_INNER)
    actual = hf_static_cache_greedy(compiled, model, input_ids, new_tokens=STEPS)
    assert [a.argmax(-1).tolist() for a in actual] == [e.argmax(-1).tolist() for e in expected]
    assert [g.counts for g in paiton.fusion_graphs(compiled)] == [qwen3_fusions(2, queries=7, batch=2), qwen3_fusions(2, queries=1, batch=2)]


def test_generate_64_greedy_tokens_equal_eager():
    from transformers import CompileConfig

    model = build_qwen3("tiny", dtype=torch.float32, num_hidden_layers=2, seed=2)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, cache_implementation="static")
    expected = model.generate(input_ids, **kwargs)
    compile_config = CompileConfig(backend="paiton", fullgraph=True, mode=None, options=EAGER_INNER)
    compile_config._compile_all_devices = True  # transformers compiles only on GPUs otherwise
    actual = model.generate(input_ids, compile_config=compile_config, **kwargs)
    assert actual.shape[1] == input_ids.shape[1] + STEPS
    assert torch.equal(actual, expected)
    assert all(g.counts["qk_norm_rope"] == 2 for g in paiton.fusion_graphs(model))

"""GPU-only checks (marked `gpu`, skipped without CUDA/ROCm): end-to-end parity through
Inductor, with and without CUDA graphs, at real Qwen3 row widths; and the kernel
micro-benchmark against stock Inductor (correctness asserted, times printed)."""

import sys
from pathlib import Path

import pytest
import torch
from paiton_testing import assert_close_ulps, qwen3_fusions

import paiton
from paiton.fusion.rms_norm import rms_norm_reference
from paiton.models.hf_loop import hf_static_cache_greedy
from paiton.models.qwen3 import build_qwen3

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "preset, layers, dtype, mode, batch",
    [
        ("tiny", 2, torch.float32, "default", 2),
        ("tiny", 2, torch.bfloat16, "reduce-overhead", 2),
        ("qwen3-0.6b", 4, torch.bfloat16, "default", 2),
        ("qwen3-8b", 2, torch.bfloat16, "reduce-overhead", 2),
        # One sequence: every decode linear is a one-row product (Paiton's GEMV or cuBLAS, as the
        # card's measured table says or as timed at first use).
        ("tiny", 2, torch.float32, "default", 1),
        ("qwen3-8b", 2, torch.bfloat16, "reduce-overhead", 1),
    ],
)
def test_decode_parity_on_gpu(preset, layers, dtype, mode, batch):
    """Prefill + 8 decode steps (StaticCache), Paiton and stock Inductor both fed eager's greedy
    tokens. fp32: logits within 1e-4 of eager and the same tokens. bf16: compiled code does not
    round intermediates where eager does, so both compilers move away from eager; Paiton must
    stay as close to eager as stock Inductor is (within 1.5x its largest logit difference).
    Every norm is fused in both graphs."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = build_qwen3(preset, device="cuda", dtype=dtype, num_hidden_layers=layers)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, 32), device="cuda")
    compile_mode = None if mode == "default" else mode
    expected = hf_static_cache_greedy(model, model, input_ids, new_tokens=9)
    paiton_logits = hf_static_cache_greedy(
        torch.compile(model, backend="paiton", mode=compile_mode), model, input_ids, new_tokens=9, follow=expected
    )
    assert [g.counts for g in paiton.fusion_graphs(model)] == [qwen3_fusions(layers, 32, batch=batch), qwen3_fusions(layers, 1, batch=batch)]
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were skipped"

    def max_diff(logits):
        return max((a.float() - e.float()).abs().max().item() for a, e in zip(logits, expected))

    if dtype == torch.float32:
        for a, e in zip(paiton_logits, expected):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
            assert torch.equal(a.argmax(-1), e.argmax(-1))
        return
    torch._dynamo.reset()
    inductor_logits = hf_static_cache_greedy(
        torch.compile(model, mode=compile_mode), model, input_ids, new_tokens=9, follow=expected
    )
    paiton_diff, inductor_diff = max_diff(paiton_logits), max_diff(inductor_logits)
    print(f"{preset} x{layers} {mode} batch {batch}: max |logit - eager| paiton {paiton_diff:.4f}, stock inductor {inductor_diff:.4f}")
    assert paiton_diff <= 1.5 * inductor_diff + 1e-2, (paiton_diff, inductor_diff)


def test_decode_loop_dynamic_batch_on_gpu():
    """The bundled loop on a GPU (Paiton's Triton kernels, CUDA graphs): ragged batches of 1 to
    4 prompts of several lengths give eager's greedy tokens (fp32), from four compiled graphs,
    with no CUDA graph skipped. Covers the dynamic batch and prompt-length graphs."""
    from torch._dynamo.utils import counters

    from paiton.models.decode_loop import DecodeLoop

    torch._dynamo.reset()
    counters.clear()
    model = build_qwen3("tiny", device="cuda", dtype=torch.float32)
    loop = DecodeLoop(model, max_batch_size=4, max_length=96)
    reference = DecodeLoop(model, max_batch_size=4, max_length=96, backend="eager")
    generator = torch.Generator().manual_seed(0)

    def prompts(*lengths):
        return [torch.randint(1, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]

    for batch in (prompts(5, 9), prompts(3, 30, 17), prompts(1, 2, 40, 8), prompts(12), prompts(20)):
        assert loop.generate(batch, 12).tokens == reference.generate(batch, 12).tokens
    assert len(paiton.fusion_graphs(model)) == 4
    assert paiton.fusion_counts(model)["decode_attention"] == 2 * model.config.num_hidden_layers
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were skipped"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_rounds_like_eager_on_gpu(dtype):
    """On the GPU, casts round to nearest (unlike the CPU interpreter): bf16/fp16 outputs within 2 ulp
    (the normalized value may round one ulp apart before the weight multiply)."""
    x = torch.randn(64, 4096, device="cuda").to(dtype)
    weight = torch.randn(4096, device="cuda").to(dtype)
    assert_close_ulps(torch.ops.paiton.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6), ulps=2 if dtype != torch.float32 else 8)


def test_kernel_microbenchmark_against_inductor():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import fused_kernels

    result = fused_kernels.run(reps=30, tokens_list=(1, 64))
    for row in result["rows"]:
        print(f"{row['model']} t={row['tokens']} {row['op']}:{row['what']} paiton {row['paiton_us']:.2f} us "
              f"inductor {row['inductor_us']:.2f} us ratio {row['inductor_over_paiton']:.2f}")
        # A sanity bound, not the claim (the claim is the bench results file): a kernel three
        # times slower than Inductor's is a regression, whatever the noise.
        assert row["paiton_us"] < 3 * row["inductor_us"], row


@pytest.mark.parametrize("preset, layers, dtype", [("tiny", 2, torch.float32), ("qwen3-8b", 2, torch.bfloat16)])
def test_engine_continuous_batch_on_gpu(preset, layers, dtype):
    """The continuous-batching engine on a GPU (Paiton, CUDA graphs): 10 requests of mixed
    lengths through 4 slots against each request alone through the same engine. fp32: the
    same greedy tokens, logits within 1e-4. bf16 (products of other shapes round otherwise):
    fed the solo run's tokens, the logits stay within 1.5x of how far the solo run is from
    eager's (fed the same tokens). Three graphs, no CUDA graph skipped."""
    from torch._dynamo.utils import counters

    from paiton.models.engine import Engine, EngineRequest

    counters.clear()
    model = build_qwen3(preset, device="cuda", dtype=dtype, num_hidden_layers=layers)
    generator = torch.Generator().manual_seed(0)
    lengths, limits = (5, 17, 33, 9, 64, 3, 21, 40, 12, 7), (12, 5, 20, 9, 14, 30, 7, 10, 16, 11)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    engine = Engine(model, max_slots=4, max_length=128)

    def run(make, concurrency):
        engine.concurrency = concurrency
        requests = [make(i) for i in range(len(prompts))]
        for request in requests:
            engine.submit(request)
        engine.run_until_done()
        return requests

    solo = run(lambda i: EngineRequest(prompts[i], limits[i], keep_logits=True), concurrency=1)
    crowd = run(lambda i: EngineRequest(prompts[i], limits[i], forced_tokens=solo[i].tokens, keep_logits=True), 4)
    eager = Engine(model, max_slots=1, max_length=128, backend="eager")
    reference = []
    for i in range(len(prompts)):
        request = EngineRequest(prompts[i], limits[i], forced_tokens=solo[i].tokens, keep_logits=True)
        eager.submit(request)
        eager.run_until_done()
        reference.append(request)
    assert engine.compiled_graphs() == 3
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were skipped"

    def max_diff(a, b):
        return max((x - y).abs().max().item() for r, s in zip(a, b) for x, y in zip(r.logits, s.logits))

    if dtype == torch.float32:
        free = run(lambda i: EngineRequest(prompts[i], limits[i]), 4)
        assert [r.tokens for r in free] == [r.tokens for r in solo]
        assert max_diff(crowd, solo) < 1e-4 and max_diff(solo, reference) < 1e-4
    else:
        batch_vs_solo, solo_vs_eager = max_diff(crowd, solo), max_diff(solo, reference)
        print(f"\nengine bf16 max |logit diff|: batch vs alone {batch_vs_solo:.3g}, alone vs eager {solo_vs_eager:.3g}")
        assert batch_vs_solo <= 1.5 * solo_vs_eager + 1e-3

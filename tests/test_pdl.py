"""Programmatic dependent launch (fusion/pdl.py, PAITON_PDL=1): which launches get it (CPU), and
on a Hopper GPU that it changes no result: a decode step's logits bit for bit against the same
step without it, under CUDA graphs, and products launched right after a kernel that releases
them before it rewrites their weight (what a load before the wait would get wrong). The compiled
code (the wait first, the prefetches before it) is checked ahead of time in test_aot_compile.py."""

import types

import pytest
import torch
import triton
import triton.language as tl

from paiton.backends.target import target_named
from paiton.fusion import pdl
from paiton.fusion.pdl import gdc_launch_dependents, gdc_wait


def _kernel_source(x_ptr):  # a stand-in for a compiled kernel (JITFunction), never launched
    pass


@pytest.fixture
def jit_kernel():
    return triton.runtime.JITFunction(_kernel_source)


@pytest.mark.parametrize("arch, has", [("sm_80", False), ("sm_90", True), ("sm_100", True), ("gfx942", False),
                                       ("gfx950", False), ("cpu", False)])
def test_only_hopper_and_later_have_pdl(arch, has):
    assert pdl.target_has_pdl(target_named(arch)) is has


@pytest.mark.parametrize("value, requested", [(None, False), ("0", False), ("", False), ("1", True), ("true", True),
                                              ("ON", True), ("no", False)])
def test_pdl_is_requested_by_the_environment(monkeypatch, value, requested):
    if value is None:
        monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    else:
        monkeypatch.setenv(pdl.PDL_ENV, value)
    assert pdl.pdl_requested() is requested


@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "gfx942"])
def test_launch_keywords_follow_the_request_and_the_chip(monkeypatch, jit_kernel, arch):
    """A CUDA tensor on a chip with PDL, requested: the kernel's PDL constexpr and Triton's
    launch_pdl option; anything else (not requested, an older or AMD chip, a CPU tensor, the
    interpreter's kernels): no keywords, so the kernel runs as it always has."""
    monkeypatch.setattr(pdl, "detect_target", lambda device: target_named(arch))
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setenv(pdl.PDL_ENV, "1")
    expected = {"PDL": True, "launch_pdl": True} if arch == "sm_90" else {}
    assert pdl.pdl_launch(on_gpu, jit_kernel) == expected
    assert pdl.pdl_launch(torch.zeros(1), jit_kernel) == {}
    interpreted = triton.runtime.interpreter.InterpretedFunction(_kernel_source)
    assert pdl.pdl_launch(on_gpu, interpreted) == {}
    monkeypatch.setenv(pdl.PDL_ENV, "0")
    assert pdl.pdl_launch(on_gpu, jit_kernel) == {}


def test_kernels_run_unchanged_without_pdl():
    """Every kernel keeps PDL off by default: the interpreter (CPU tests) and AMD never see the
    CUDA-only instructions."""
    from paiton.fusion import decode_attention, few_rows_gemm, gemv, qk_norm_rope, quantize_rows, rms_norm, swiglu

    kernels = [gemv._gemv_kernel, few_rows_gemm._few_rows_gemm_kernel, rms_norm._rms_norm_kernel,
               qk_norm_rope._qk_norm_rope_kernel, decode_attention._decode_attention_split_kernel,
               decode_attention._decode_attention_combine_kernel, swiglu._silu_mul_kernel,
               quantize_rows._quantize_rows_kernel]
    import inspect

    for kernel in kernels:
        fn = getattr(kernel, "fn", kernel)
        assert inspect.signature(fn).parameters["PDL"].default is False, fn.__name__


def _hopper():
    return torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="programmatic dependent launch needs sm_90 or later")


@pytest.fixture
def pdl_launches(monkeypatch):
    """PAITON_PDL=1, and a record of the launch keywords every Paiton kernel got (to check that
    PDL was used, not only asked for)."""
    from paiton.fusion import decode_attention, few_rows_gemm, gemv, qk_norm_rope, rms_norm

    monkeypatch.setenv(pdl.PDL_ENV, "1")
    given = []

    def recording(tensor, kernel):
        keywords = pdl.pdl_launch(tensor, kernel)
        given.append(keywords)
        return keywords

    for module in (decode_attention, few_rows_gemm, gemv, qk_norm_rope, rms_norm):
        monkeypatch.setattr(module, "pdl_launch", recording)
    return given


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_with_pdl_matches_without_on_gpu(monkeypatch, pdl_launches, batch):
    """Qwen3-8B's widths (2 layers, bf16), prefill + 8 decode steps under CUDA graphs: every
    step's logits with PAITON_PDL=1 equal those without, bit for bit (PDL moves when a kernel
    starts, not what it computes; both compiles are the same graph, so Inductor's caches give both
    the same kernels, and the timed launches are chosen once for the process)."""
    from paiton.models.hf_loop import hf_static_cache_greedy
    from paiton.models.qwen3 import build_qwen3

    model = build_qwen3("qwen3-8b", device="cuda", dtype=torch.bfloat16, num_hidden_layers=2)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, 32), device="cuda")
    runs = {}
    for requested in ("0", "1"):
        monkeypatch.setenv(pdl.PDL_ENV, requested)
        pdl_launches.clear()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="paiton", mode="reduce-overhead")
        runs[requested] = hf_static_cache_greedy(compiled, model, input_ids, new_tokens=9,
                                                 follow=runs.get("0"))
        assert any(pdl_launches) == (requested == "1"), requested  # launched with PDL exactly when asked
    for step, (with_pdl, without) in enumerate(zip(runs["1"], runs["0"])):
        assert torch.equal(with_pdl, without), (step, (with_pdl.float() - without.float()).abs().max().item())


@triton.jit
def _nanoseconds():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _late_copy_kernel(src_ptr, dst_ptr, n, DELAY_NS: tl.constexpr, BLOCK: tl.constexpr):
    """dst[:n] = src[:n], written DELAY_NS after the kernel released the next one: a kernel
    launched after it with PDL starts while it has not written yet, and must wait for it."""
    gdc_wait()
    gdc_launch_dependents()
    began = _nanoseconds()
    now = began
    while now - began < DELAY_NS:
        now = _nanoseconds()
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        at = start + tl.arange(0, BLOCK)
        tl.store(dst_ptr + at, tl.load(src_ptr + at, mask=at < n), mask=at < n)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("rows", [1, 8])
def test_product_right_after_its_weight_is_written_on_gpu(pdl_launches, rows):
    """Each product, launched with PDL right after a kernel that releases it at once and writes
    the product's weight 20 us later, sees the new weight (the L2 prefetch before its wait cannot
    keep an old copy; its loads come after the wait): 20 rewrites, each against the product with
    the weight it was given, eagerly and captured in a CUDA graph and replayed. A product that
    read W before its wait would read the previous weight."""
    from paiton.fusion.few_rows_gemm import few_rows_config, few_rows_gemm
    from paiton.fusion.gemv import GEMV_CANDIDATES, launch_gemv

    torch.manual_seed(0)
    n, k = 4096, 4096
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(20)]
    weight = torch.zeros_like(weights[0])
    programs = torch.cuda.get_device_properties(0).multi_processor_count

    def product():
        if rows == 1:
            return launch_gemv(x, weight, GEMV_CANDIDATES[6])
        return few_rows_gemm(x, weight, None, few_rows_config(rows))

    def run_all():
        outs = []
        for w in weights:
            _late_copy_kernel[(programs,)](w, weight, w.numel(), DELAY_NS=20_000, BLOCK=1024, launch_pdl=True)
            outs.append(product())
        return outs

    expected = [torch.nn.functional.linear(x.float(), w.float()) for w in weights]
    for got, want in zip(run_all(), expected):
        torch.testing.assert_close(got.float(), want, atol=0.5, rtol=2e-2)
    assert any(pdl_launches)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = run_all()
    for _ in range(3):
        weight.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, expected):
            torch.testing.assert_close(got.float(), want, atol=0.5, rtol=2e-2)

"""Helpers shared by the tests: tolerances, graph capture, op counting."""

from __future__ import annotations

import collections
import contextlib
import importlib
import pkgutil
import types

import torch

# Tolerances for "matches eager" and why.
#  fp32: the fused kernel reduces in a different order than torch.mean; a few ulp.
#  fp16/bf16: the normalized value is rounded to the input dtype before the weight multiply;
#  if the kernel rounds it one ulp away from eager (reduction order; on CPU the interpreter
#  also rounds fp32->bf16 toward zero, see ENV_NOTES), weight * y moves by up to 2 ulp of the
#  output, and the output's own rounding adds one more: 3 ulp.
ULPS = {torch.float32: 8, torch.float16: 3, torch.bfloat16: 3}
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}



def kernel_modules() -> list[types.ModuleType]:
    """Every module of paiton.fusion, imported (conftest imports them all under the interpreter
    first; use_reference_kernels patches the ones that ask `is_interpreted`)."""
    import paiton.fusion

    return [importlib.import_module(f"paiton.fusion.{info.name}")
            for info in pkgutil.iter_modules(paiton.fusion.__path__)]


def random_weight(n: int, k: int, seed: int, outliers: bool = False) -> torch.Tensor:
    """A random [n, k] fp32 weight (std 0.05); with `outliers`, a few channels 20x and elements
    50x larger than the rest, as trained LLM weights have (the FP8 tests' weights)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if outliers:
        w[torch.randint(0, n, (max(1, n // 16),), generator=g)] *= 20
        w.view(-1)[torch.randint(0, n * k, (max(1, n * k // 500),), generator=g)] *= 50
    return w

def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int | None = None) -> None:
    """|actual - expected| <= ulps units in the last place of expected's dtype, elementwise
    (plus a floor at the dtype's smallest normal, for values near zero)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    dtype = expected.dtype
    ulps = ULPS[dtype] if ulps is None else ulps
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), "non-finite values in the result"
    exponent = torch.floor(torch.log2(e.abs().clamp_min(torch.finfo(dtype).tiny)))
    ulp = torch.pow(2.0, exponent - MANTISSA_BITS[dtype])
    err = (a - e).abs()
    bad = err > ulps * ulp + torch.finfo(dtype).tiny
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} elements differ by more than {ulps} ulp; first at {idx}: "
            f"{a[tuple(idx)].item()} vs {e[tuple(idx)].item()} (max err {err.max().item():.3g})"
        )


def op_census(graph: torch.fx.Graph) -> collections.Counter:
    """How often each op is called in `graph`, by name ("aten.rsqrt.default", "paiton.rms_norm.default")."""
    return collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


@contextlib.contextmanager
def capture_paiton_graphs():
    """Record the ops of the ATen graph before and after Paiton's passes, for every graph
    compiled inside the block (vLLM's TestBackend idea): yields a list of
    (ops_before, ops_after, reported_counts); a pass that runs by default but is switched off
    reports 0 (l2_prefetch, off by default, is listed only where it is switched on)."""
    from paiton.passes.pass_manager import DYNAMO_GRAPH_PASSES, PASS_NAMES, PaitonPassManager, switched_on_by_default

    captured = []
    # The passes on Dynamo's graph run just before the ATen passes of the same graph: their
    # counts join that graph's record.
    dynamo_counts = {}
    original_call = PaitonPassManager.__call__
    original_dynamo_calls = {cls: cls.__call__ for cls in DYNAMO_GRAPH_PASSES}

    def recording_dynamo_call(self, gm, example_inputs):
        dynamo_counts[self.name] = original_dynamo_calls[type(self)](self, gm, example_inputs)
        return dynamo_counts[self.name]

    def recording_call(self, graph):
        before = op_census(graph)
        original_call(self, graph)
        counts = {**self.last_counts, **dynamo_counts}
        dynamo_counts.clear()
        listed = [name for name in PASS_NAMES if switched_on_by_default(name) or self.enabled[name]]
        captured.append((before, op_census(graph), {name: counts.get(name, 0) for name in listed}))

    PaitonPassManager.__call__ = recording_call
    for cls in DYNAMO_GRAPH_PASSES:
        cls.__call__ = recording_dynamo_call
    try:
        yield captured
    finally:
        PaitonPassManager.__call__ = original_call
        for cls, call in original_dynamo_calls.items():
            cls.__call__ = call


EAGER_INNER = {"paiton.inner_compiler": "eager"}


def compile_and_capture(module, x, options=None, dynamic=False):
    """(module compiled with backend="paiton" and the eager inner compiler, run on x;
    capture_paiton_graphs' records). `options` add to or override EAGER_INNER."""
    with torch.no_grad(), capture_paiton_graphs() as graphs:
        actual = torch.compile(module, backend="paiton", options={**EAGER_INNER, **(options or {})}, dynamic=dynamic)(x)
    return actual, graphs
# For a pass's own tests that compare with eager bit for bit: merging projections, or a
# one-row (or few-rows) product through Paiton's kernel, changes the products' rounding in front of the pass
# under test.
UNMERGED = {**EAGER_INNER, "paiton.merged_projections": False, "paiton.one_row_linear": False,
            "paiton.few_rows_linear": False, "paiton.silu_mul_linear": False}


def fusions(**nonzero: int) -> dict[str, int]:
    """Rewrite counts of every Paiton pass that runs by default (the backend reports those it
    ran): the given ones, 0 for the rest (so the tests keep checking that no other pass fires as
    passes are added)."""
    from paiton.passes.pass_manager import PASS_NAMES, switched_on_by_default

    unknown = set(nonzero) - set(PASS_NAMES)
    assert not unknown, f"not Paiton passes: {unknown}"
    return {name: nonzero.get(name, 0) for name in PASS_NAMES if switched_on_by_default(name) or name in nonzero}


def qwen3_fusions(num_layers: int, queries: int, static_cache: bool = True, batch: int = 1,
                  last_logits_only: bool = False) -> dict[str, int]:
    """What one compiled Qwen3 graph of `batch` sequences of `queries` tokens must fuse, per
    test_qwen3_e2e.py's docstring: the decode-attention kernel takes attention over a static
    cache in graphs of up to MAX_DECODE_QUERIES tokens (decode steps, short prompts), and the
    cache write joins the QK-norm + RoPE kernel whenever there is a static cache (reading
    the layer's StaticCache counter as its start slot; one foreach advances all counters). A graph of
    one row (batch 1 decode) sends o_proj, down_proj and the lm_head through the one-row
    linear, and its SwiGLU into down_proj's GEMV; the lm_head alone when it reads the last
    position only (`last_logits_only`, logits_to_keep=1) of one sequence. A decode graph of 2-64
    sequences (`batch`; None: a dynamic batch) sends the same three linears through the
    few-rows linear, and its SwiGLU into the gate/up product's few-rows GEMM (swiglu_out), and
    the lm_head alone when it reads the last position of each sequence."""
    from paiton.fusion.few_rows_gemm import MAX_ROWS
    from paiton.passes.decode_attention import MAX_DECODE_QUERIES

    one_row = batch == 1 and queries == 1
    few_rows = batch is None or 1 < batch <= MAX_ROWS
    return fusions(
        merged_projections=2 * num_layers,  # q/k/v and gate/up
        one_row_linear=(2 * num_layers if one_row else 0) + (1 if batch == 1 and (one_row or last_logits_only) else 0),
        few_rows_linear=(2 * num_layers + 1 if few_rows and queries == 1 else 0)
        + (1 if few_rows and queries > 1 and last_logits_only else 0),
        fused_add_rms_norm=2 * num_layers,
        rms_norm=2 * num_layers + 1,
        qk_norm_rope=num_layers,
        kv_cache_write=num_layers if static_cache else 0,
        # StaticCache's per-layer counters: each write reads its own, one foreach advances them
        cache_counters=(num_layers + (num_layers if num_layers >= 2 else 0)) if static_cache else 0,
        decode_attention=num_layers if static_cache and queries <= MAX_DECODE_QUERIES else 0,
        swiglu=num_layers,
        # SwiGLU into down_proj's GEMV (one row), or into the gate/up product's few-rows GEMM (a
        # decode step's 2-64 rows)
        silu_mul_linear=num_layers if one_row else 0,
        swiglu_out=num_layers if few_rows and queries == 1 else 0,
    )


class SwiGLUMLP(torch.nn.Module):
    """Qwen3MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)); `extra_use`: the activation is
    also returned, so it must be materialized."""

    def __init__(self, hidden, inner, dtype, activation="silu", extra_use=False):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.up_proj = torch.nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.down_proj = torch.nn.Linear(inner, hidden, bias=False, dtype=dtype)
        self.act_fn = torch.nn.SiLU() if activation == "silu" else torch.nn.GELU()
        self.extra_use = extra_use

    def forward(self, x):
        act = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        out = self.down_proj(act)
        return (out, act) if self.extra_use else out


def transformers_rms_norm(x, weight, eps=1e-6):
    """RMSNorm as transformers' Qwen3RMSNorm writes it (the graph Paiton's passes match)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def repeat_kv(x, group):
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)


class CachedAttention(torch.nn.Module):
    """q/k norms, RoPE, a static-cache write, repeat_kv, a causal mask from the positions, SDPA:
    the attention of a decode step over a static cache, with the cache written the ways loops
    write it (`write`: transformers' `index_copy_`, a hand-written `cache[:, :, pos] = k`, the
    engine's per-sequence `cache[rows, :, positions] = k.transpose(1, 2)` with positions
    [B, S]) or in ways the KV-cache write pass must leave alone."""

    def __init__(self, batch, q_heads, kv_heads, head_dim, cache_len, dtype, write="index_copy"):
        super().__init__()
        self.q_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(head_dim).to(dtype))
        self.k_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(head_dim).to(dtype))
        self.register_buffer("k_cache", torch.randn(batch, kv_heads, cache_len, head_dim).to(dtype))
        self.register_buffer("v_cache", torch.randn(batch, kv_heads, cache_len, head_dim).to(dtype))
        self.group, self.write = q_heads // kv_heads, write

    def forward(self, q, k, v, cos, sin, positions):
        from paiton.fusion.qk_norm_rope import rotate_half

        q = transformers_rms_norm(q, self.q_norm).transpose(1, 2)
        k = transformers_rms_norm(k, self.k_norm).transpose(1, 2)
        v = v.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        w = self.write
        if w == "index_copy":
            self.k_cache.index_copy_(2, positions, k)
            self.v_cache.index_copy_(2, positions, v)
        elif w == "index_put":
            self.k_cache[:, :, positions] = k
            self.v_cache[:, :, positions] = v
        elif w == "v_elsewhere":  # v written at other slots than k: not one cache write
            self.k_cache.index_copy_(2, positions, k)
            self.v_cache.index_copy_(2, positions + 1, v)
        elif w == "accumulate":
            torch.ops.aten.index_put_(self.k_cache, [None, None, positions], k, True)
            self.v_cache.index_copy_(2, positions, v)
        elif w == "read_before_write":  # the old cache is read: writing it in place early is wrong
            self.k_cache.index_copy_(2, positions, k + self.k_cache[:, :, :1])
            self.v_cache.index_copy_(2, positions, v)
        elif w in ("per_sequence", "other_rows"):  # positions [B, S]: each row its own slots (engine.SlotCache)
            rows = torch.arange(self.k_cache.shape[0], device=q.device)[:, None]
            if w == "other_rows":  # sequence b into row b + 1: not a write the kernel makes
                rows = (rows + 1) % self.k_cache.shape[0]
            self.k_cache[rows, :, positions] = k.transpose(1, 2)
            self.v_cache[rows, :, positions] = v.transpose(1, 2)
        cache_len = self.k_cache.shape[2]
        if positions.dim() == 2:
            mask = torch.arange(cache_len, device=q.device)[None, None, None, :] <= positions[:, None, :, None]
        else:
            mask = torch.arange(cache_len, device=q.device)[None, None, None, :] <= positions[None, None, :, None]
        keys, values = repeat_kv(self.k_cache, self.group), repeat_kv(self.v_cache, self.group)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def attention_inputs(batch, seq, q_heads, kv_heads, head_dim, start, dtype, seed=0):
    """CachedAttention's arguments for `seq` tokens at positions start, start + 1, ...
    (`start` a list: one start per sequence, positions [B, S])."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, q_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=g).to(dtype)
    if isinstance(start, (list, tuple)):
        angles = torch.randn(batch, seq, head_dim, generator=g) * 3
        positions = torch.stack([torch.arange(s, s + seq) for s in start])
    else:
        angles = torch.randn(1, seq, head_dim, generator=g) * 3
        positions = torch.arange(start, start + seq)
    return q, k, v, angles.cos().to(dtype), angles.sin().to(dtype), positions


def use_reference_kernels(monkeypatch) -> None:
    """Run Paiton's ops on their CPU references (eager's operations) instead of the Triton
    kernels in the interpreter, for tests of what is around the ops (a loop, a server, a
    benchmark) that would otherwise spend minutes interpreting kernels tested on their own:
    every kernel module that asks `is_interpreted` is told no (conftest imported them all under
    the interpreter)."""
    for module in kernel_modules():
        if module.__name__ != "paiton.fusion.triton_utils" and hasattr(module, "is_interpreted"):
            monkeypatch.setattr(module, "is_interpreted", lambda kernel: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # and in the processes the test starts


def fp8_product_bound(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, path: str,
                      sums: float = 2**-19) -> torch.Tensor:
    """Elementwise bound on |y - x @ dequantize(W8, scales).T| (the float64 product) for an FP8
    linear computed by `path` (fusion/fp8_paths.py's, or "gemv"): fp32 summation noise (`sums`
    of the products' magnitudes) and one rounding of y to x's dtype; DEQUANTIZE's weight rounded
    to x's dtype besides (half an ulp of each weight); SCALED_MM's activations rounded to e4m3
    besides (half an e4m3 step, 2**-4 of each, or the subnormal step of its row's scale)."""
    from paiton.fusion.fp8_linear import dequantize
    from paiton.fusion.fp8_paths import DEQUANTIZE, SCALED_MM
    from paiton.fusion.quantize_rows import quantize_rows_reference

    w = dequantize(weight, scales, torch.float64).abs()
    magnitude = x.double().abs() @ w.T
    bound = magnitude * sums + (x.double() @ dequantize(weight, scales, torch.float64).T).abs() * 2.0 ** -MANTISSA_BITS[x.dtype]
    if path == DEQUANTIZE:
        bound += magnitude * 2.0 ** -(MANTISSA_BITS[x.dtype] + 1)
    if path == SCALED_MM:
        subnormal = 2.0**-9 if weight.dtype == torch.float8_e4m3fn else 2.0**-10
        x_scales = quantize_rows_reference(x, weight.dtype)[1].double()[..., None]
        bound += (x.double().abs() * 2**-4 + x_scales * subnormal) @ w.T
    return bound


class TwoLinears(torch.nn.Module):
    """Qwen3's o_proj then down_proj shape: two linears in a row, a residual between (the
    one-row and few-rows linear passes' test module)."""

    def __init__(self, hidden, inner, dtype, bias=False):
        super().__init__()
        self.up = torch.nn.Linear(hidden, inner, bias=bias, dtype=dtype)
        self.down = torch.nn.Linear(inner, hidden, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + x


# Paiton's GEMV or few-rows GEMM against the CPU GEMM: fp32 sums in another order, then one
# rounding to the output's dtype (bf16: plus a floor near zero).
LINEAR_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2e-2)}

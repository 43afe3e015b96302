"""Micro-benchmark: each of Paiton's fused kernels against what stock Inductor generates for the
same subgraph (the eager reference, torch.compile'd), at Qwen3 shapes, on one GPU.

    python bench/fused_kernels.py [--out bench/results] [--reps 200] [--tokens 1,64] [--ops rms_norm,...]

Subgraphs (bf16, as transformers writes them):
  rms_norm            hidden norm: [tokens, hidden];  q/k norm: [tokens * heads, head_dim]
  fused_add_rms_norm  residual add + norm: [tokens, hidden]
  silu_mul            SwiGLU's silu(gate) * up: [tokens, intermediate]
  qk_norm_rope        q/k per-head norms + rotary: q [tokens, 1, q_heads, 128], k [.., kv_heads, 128]
  qk_norm_rope_cache  the same, with k and v written into a StaticCache slot (Inductor's side:
                      norms, rotary, index_copy_ of k and of v)
  packed_linear       the merged q/k/v (and gate/up) projection: one GEMM against the packed
                      weights; Inductor's side: the separate linears
  decode_attention    one decode query per sequence over a StaticCache of 4096 positions with 1024
                      filled; Inductor's side is what transformers runs: repeat_kv, a causal mask
                      over the whole cache, SDPA. The floor counts the filled part of the cache.
at tokens = 1 and 64 (decode batch 1 and 64; --tokens 1024 sizes the row-wise ops as a prefill of
two 512-token prompts), Qwen3-8B (hidden 4096, intermediate 12288, 32 q
heads, head_dim 128) and Qwen3-32B (hidden 5120, intermediate 25600, 64 q heads).

Each kernel is timed as a decode step runs it under mode="reduce-overhead": N calls captured in
one CUDA graph, the graph replayed, time per call = median replay time / N (no launch
overhead in the number). Inputs stay in L2 between calls, as they do in a decode step where the
previous kernel just wrote them. The floor is bytes moved / measured copy bandwidth.
Writes fused_kernels-<card>-<date>.json, .md and .png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from bench_common import copy_rate_tbps, run_environment

SHAPES = {
    "qwen3-8b": dict(hidden=4096, intermediate=12288, q_heads=32, kv_heads=8, head_dim=128),
    "qwen3-32b": dict(hidden=5120, intermediate=25600, q_heads=64, kv_heads=8, head_dim=128),
}
EPS = 1e-6
# Decode attention: a static cache of CACHE_LEN positions, FILLED of them written so far.
CACHE_LEN, FILLED = 4096, 1024
# The cases whose tokens are decode sequences, each with a cache of its own: above this many
# tokens they stand for no step Qwen3 runs (a prefill writes many positions of few sequences)
# and their caches would take tokens x 2 x 8 MiB.
DECODE_ONLY_OPS, MAX_DECODE_TOKENS = ("qk_norm_rope_cache", "decode_attention"), 128


def hf_sdpa_decode(q, k_cache, v_cache, positions, kv_mask, scale):
    """What transformers runs for one decode step over a StaticCache (sdpa attention): repeat_kv,
    a causal mask over the whole cache from the positions, SDPA."""
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // k_cache.shape[1]
    k = k_cache[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, q_heads, *k_cache.shape[2:])
    v = v_cache[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, q_heads, *v_cache.shape[2:])
    mask = torch.arange(k_cache.shape[2], device=q.device)[None, None, None, :] <= positions.view(1, 1, q_len, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(batch, 1, -1, -1), scale=scale)


def qk_norm_rope_cache_reference(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache, slots):
    """Eager's front of attention in a StaticCache decode step: norms, rotary, the cache write."""
    from paiton.fusion.qk_norm_rope import qk_norm_rope_reference

    q_rotated, k_rotated = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
    k_cache.index_copy_(2, slots, k_rotated)
    v_cache.index_copy_(2, slots, v)
    return q_rotated


def separate_linears(x, *weights):
    return tuple(torch.nn.functional.linear(x, w) for w in weights)


def cases(tokens_list=(1, 64)):
    for model, s in SHAPES.items():
        for tokens in tokens_list:
            yield from (case for case in cases_of(model, s, tokens)
                        if tokens <= MAX_DECODE_TOKENS or case["op"] not in DECODE_ONLY_OPS)


def cases_of(model, s, tokens):
    """Every case of one model's shapes at `tokens` rows (tokens x heads for the per-head ops)."""
    yield dict(model=model, tokens=tokens, op="rms_norm", what="hidden", rows=tokens, cols=s["hidden"])
    yield dict(model=model, tokens=tokens, op="rms_norm", what="q_norm", rows=tokens * s["q_heads"], cols=s["head_dim"])
    yield dict(model=model, tokens=tokens, op="fused_add_rms_norm", what="hidden", rows=tokens, cols=s["hidden"])
    yield dict(model=model, tokens=tokens, op="silu_mul", what="mlp", rows=tokens, cols=s["intermediate"])
    yield dict(model=model, tokens=tokens, op="qk_norm_rope", what="q+k", rows=tokens * (s["q_heads"] + s["kv_heads"]),
               cols=s["head_dim"])
    yield dict(model=model, tokens=tokens, op="qk_norm_rope_cache", what="q+k, k/v to cache",
               rows=tokens * (s["q_heads"] + s["kv_heads"]), cols=s["head_dim"])
    qkv = (s["q_heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"])
    yield dict(model=model, tokens=tokens, op="packed_linear", what="q/k/v", rows=tokens, cols=s["hidden"], outs=qkv)
    yield dict(model=model, tokens=tokens, op="packed_linear", what="gate/up", rows=tokens, cols=s["hidden"],
               outs=(s["intermediate"], s["intermediate"]))
    yield dict(model=model, tokens=tokens, op="decode_attention", what=f"cache {CACHE_LEN}, filled {FILLED}",
               rows=tokens * s["q_heads"], cols=s["head_dim"])


def graph_time_us(fn, calls_per_graph=50, reps=200):
    """Median GPU time of one `fn()` call, from replays of a CUDA graph of `calls_per_graph` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    for _ in range(5):
        graph.replay()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    return statistics.median(times)


def rotary_cos_sin(tokens, head_dim, dtype):
    """cos and sin of random angles, [tokens, 1, head_dim]: at most 1 in size, as RoPE's are.
    (randn stand-ins, up to ~4, made eager's bf16 rounding of q * cos and rotate(q) * sin large
    enough to miss the 2e-2 check once in 4M elements at 1024 tokens.)"""
    angles = torch.randn(tokens, 1, head_dim, device="cuda") * 10
    return angles.cos().to(dtype), angles.sin().to(dtype)


def make_case(case, dtype):
    """(Paiton's call, the eager reference call, bytes a perfect kernel moves) for one case,
    on fresh random inputs of the case's shape."""
    from paiton.fusion.qk_norm_rope import qk_norm_rope_reference
    from paiton.fusion.rms_norm import fused_add_rms_norm_reference, rms_norm_reference
    from paiton.fusion.swiglu import silu_mul_reference

    rows, cols = case["rows"], case["cols"]
    x = torch.randn(rows, cols, device="cuda", dtype=dtype)
    other = torch.randn_like(x)  # the residual, or SwiGLU's up
    weight = torch.randn(cols, device="cuda", dtype=dtype)
    op = case["op"]
    if op == "rms_norm":
        return (lambda: torch.ops.paiton.rms_norm(x, weight, EPS)), (lambda f: f(x, weight, EPS)), rms_norm_reference, \
            2 * x.nbytes + weight.nbytes
    if op == "fused_add_rms_norm":
        return (lambda: torch.ops.paiton.fused_add_rms_norm(x, other, weight, EPS)), \
            (lambda f: f(x, other, weight, EPS)), fused_add_rms_norm_reference, 4 * x.nbytes + weight.nbytes
    if op == "silu_mul":
        return (lambda: torch.ops.paiton.silu_mul(x, other)), (lambda f: f(x, other)), silu_mul_reference, 3 * x.nbytes
    if op == "qk_norm_rope":  # q and k of `tokens` decode tokens: [tokens, 1, heads, head_dim]
        s = SHAPES[case["model"]]
        q = torch.randn(case["tokens"], 1, s["q_heads"], s["head_dim"], device="cuda", dtype=dtype)
        k = torch.randn(case["tokens"], 1, s["kv_heads"], s["head_dim"], device="cuda", dtype=dtype)
        w = torch.randn(s["head_dim"], device="cuda", dtype=dtype)
        cos, sin = rotary_cos_sin(case["tokens"], s["head_dim"], dtype)
        args = (q, k, w, w, cos, sin, EPS)
        return (lambda: torch.ops.paiton.qk_norm_rope(*args)), (lambda f: f(*args)), qk_norm_rope_reference, \
            2 * (q.nbytes + k.nbytes) + 2 * cos.nbytes + 2 * w.nbytes
    if op == "qk_norm_rope_cache":  # as qk_norm_rope, and v; the caches hold CACHE_LEN positions
        s = SHAPES[case["model"]]
        q = torch.randn(case["tokens"], 1, s["q_heads"], s["head_dim"], device="cuda", dtype=dtype)
        k = torch.randn(case["tokens"], 1, s["kv_heads"], s["head_dim"], device="cuda", dtype=dtype)
        v = torch.randn(case["tokens"], s["kv_heads"], 1, s["head_dim"], device="cuda", dtype=dtype)
        w = torch.randn(s["head_dim"], device="cuda", dtype=dtype)
        cos, sin = rotary_cos_sin(case["tokens"], s["head_dim"], dtype)
        k_cache, v_cache = torch.randn(2, case["tokens"], s["kv_heads"], CACHE_LEN, s["head_dim"], device="cuda", dtype=dtype)
        args = (q, k, v, w, w, cos, sin, EPS, k_cache, v_cache, torch.tensor([FILLED], device="cuda"))
        return (lambda: torch.ops.paiton.qk_norm_rope_cache(*args)), (lambda f: f(*args)), qk_norm_rope_cache_reference, \
            2 * (q.nbytes + k.nbytes + v.nbytes) + 2 * cos.nbytes + 2 * w.nbytes
    if op == "packed_linear":  # x [tokens, hidden] times the packed [sum outs, hidden] weights
        x = torch.randn(rows, cols, device="cuda", dtype=dtype)
        packed = torch.randn(sum(case["outs"]), cols, device="cuda", dtype=dtype) * cols**-0.5
        weights = packed.split(list(case["outs"]))
        # The same weights for both sides (Inductor's linears read them as separate tensors).
        def paiton_fn():
            out = torch.ops.paiton.packed_linear(x, list(weights))
            return tuple(out.split(list(case["outs"]), dim=-1))

        return paiton_fn, (lambda f: f(x, *weights)), separate_linears, packed.nbytes + x.nbytes + rows * packed.shape[0] * 2
    if op == "decode_attention":  # `tokens` sequences, one query each, at position FILLED - 1
        s = SHAPES[case["model"]]
        q = torch.randn(case["tokens"], s["q_heads"], 1, s["head_dim"], device="cuda", dtype=dtype)
        k_cache, v_cache = torch.randn(2, case["tokens"], s["kv_heads"], CACHE_LEN, s["head_dim"], device="cuda", dtype=dtype)
        positions = torch.tensor([FILLED - 1], device="cuda")
        args = (q, k_cache, v_cache, positions, None, s["head_dim"] ** -0.5)
        filled_bytes = 2 * k_cache.nbytes * FILLED // CACHE_LEN
        return (lambda: torch.ops.paiton.decode_attention(*args)), (lambda f: f(*args)), hf_sdpa_decode, \
            2 * q.nbytes + filled_bytes
    raise ValueError(op)


def run(reps=200, tokens_list=(1, 64), ops=None):
    import paiton.fusion.ops  # noqa: F401  (torch.ops.paiton.*)

    torch.manual_seed(0)
    # One compiled reference per op, recompiled for each shape (dynamic=False): more shapes
    # than Dynamo's default recompile limit.
    torch._dynamo.config.recompile_limit = 64
    dtype = torch.bfloat16
    bandwidth = copy_rate_tbps("cuda") * 1e3  # GB/s
    compiled = {}
    rows = []
    for case in cases(tokens_list):
        if ops and case["op"] not in ops:
            continue
        paiton_fn, call, reference, bytes_moved = make_case(case, dtype)
        inductor_op = compiled.setdefault(case["op"], torch.compile(reference, dynamic=False))
        inductor_fn = lambda: call(inductor_op)  # noqa: E731
        # Correctness first, on these very inputs: Paiton within about a bf16 ulp of eager.
        ours, eager = paiton_fn(), call(reference)
        for a, e in zip(ours if isinstance(ours, tuple) else (ours,), eager if isinstance(eager, tuple) else (eager,)):
            torch.testing.assert_close(a, e, rtol=2**-7, atol=2e-2)
        paiton_us = graph_time_us(paiton_fn, reps=reps)
        inductor_us = graph_time_us(inductor_fn, reps=reps)
        floor_us = bytes_moved / (bandwidth * 1e9) * 1e6
        rows.append(dict(case, paiton_us=paiton_us, inductor_us=inductor_us, floor_us=floor_us,
                         inductor_over_paiton=inductor_us / paiton_us, bytes=bytes_moved))
    return dict(copy_bandwidth_gbs=bandwidth, rows=rows)


def markdown(result):
    env = result["env"]
    lines = [
        f"# Fused kernels: Paiton vs stock Inductor ({env['card']})",
        "",
        f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}. bf16, eps 1e-6. "
        f"Time per call inside a CUDA graph (median of replays). Copy bandwidth measured in the same run: "
        f"{result['copy_bandwidth_gbs']:.0f} GB/s (read + write).",
        "",
        "| model | tokens | op | rows x cols | Paiton us | Inductor us | Inductor / Paiton | floor us |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['op']} ({r['what']}) | {r['rows']} x {r['cols']} | "
            f"{r['paiton_us']:.2f} | {r['inductor_us']:.2f} | {r['inductor_over_paiton']:.2f} | {r['floor_us']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    short_op = {"rms_norm": "norm", "fused_add_rms_norm": "add+norm", "silu_mul": "silu*up", "qk_norm_rope": "qk norm+rope",
                "qk_norm_rope_cache": "qk norm+rope+cache", "packed_linear": "merged GEMM", "decode_attention": "attention"}
    labels = [f"{r['model'].split('-')[1]} t={r['tokens']}\n{short_op[r['op']]} {r['what']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    ax.bar([x - 0.2 for x in xs], [r["inductor_us"] for r in rows], 0.4, label="stock Inductor")
    ax.bar([x + 0.2 for x in xs], [r["paiton_us"] for r in rows], 0.4, label="Paiton")
    ax.scatter(list(xs), [r["floor_us"] for r in rows], marker="_", s=400, color="k", label="floor (bytes / copy rate)", zorder=3)
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=35, ha="right")
    ax.set_ylabel("us per call (in a CUDA graph)")
    ax.set_title(f"Fused kernels, bf16, {result['env']['card']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(json_path):
    """Redraw the PNG of a results file (e.g. after a change to the plot's layout)."""
    with open(json_path) as f:
        plot(json.load(f), json_path[: -len(".json")] + ".png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--ops", default="", help="comma-separated ops to run (default: all)")
    parser.add_argument("--tokens", default="1,64", help="comma-separated row counts (decode batch, or prefill tokens)")
    args = parser.parse_args(argv)
    tokens_list = tuple(int(t) for t in args.tokens.split(","))
    if not torch.cuda.is_available():
        sys.exit("bench/fused_kernels.py needs a CUDA/ROCm GPU")
    result = {"env": run_environment("cuda"), **run(reps=args.reps, tokens_list=tokens_list,
                                                         ops=[op for op in args.ops.split(",") if op])}
    os.makedirs(args.out, exist_ok=True)
    card = result["env"]["card"].replace(" ", "_")
    tokens_tag = "" if tokens_list == (1, 64) else "-tokens" + "_".join(map(str, tokens_list))
    stem = os.path.join(args.out, f"fused_kernels-{card}-{result['env']['date'][:10]}{tokens_tag}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(table)
    plot(result, stem + ".png")
    print(table)


if __name__ == "__main__":
    main()

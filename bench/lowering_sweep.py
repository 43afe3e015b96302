"""Sweep: each Paiton kernel's launch configuration from the lowering table of the GPU this runs
on, timed against alternatives, at Qwen3-8B and Qwen3-32B decode shapes.

    python bench/lowering_sweep.py [--out bench/results] [--reps 100] [--tokens 1,64] [--ops decode_attention]

For each op, model and decode batch (tokens):
  1. the configuration the op's launcher picks at run time is recorded (through the lowering
     module, as the launch asks for it) and checked against the table's (`launch_config` for the
     detected target): the table in the results is the one the kernels ran with;
  2. the table's configuration and the alternatives are timed, each in a CUDA graph of 50 calls
     (bench/fused_kernels.py's `graph_time_us`: no launch overhead in the number). Alternatives
     change one knob of the table's configuration at a time (num_warps, num_stages, the block
     sizes a chip fixes, and on ROCm waves_per_eu and kpack), plus, for decode attention, the
     grid of KV tile x stages and the number of splits (`n_splits`, the launcher's argument);
     for prefill attention (a prefill of `tokens` packed prompt tokens) the grid of query tile x
     KV tile.
     Each alternative's output is checked against the table's first; a candidate that fails to
     compile or launch (e.g. more shared memory than the chip has) is listed as failed;
  3. the report gives per case the table's time, the fastest candidate's, and the table's
     slowdown against it (within 3%: noise between CUDA-graph replays of a few microseconds).

The same script tunes the ROCm tables on an MI300X / MI355X: the candidates include the ROCm
options there. Writes lowering_sweep-<arch>-<card>-<date>.json (every candidate's time) and .md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
from bench_common import run_environment, write_results

WITHIN = 1.03  # the table's configuration counts as fastest within 3% of the best candidate
MODELS = ("qwen3-8b", "qwen3-32b")
OPS = ("rms_norm", "fused_add_rms_norm", "silu_mul", "qk_norm_rope", "qk_norm_rope_cache", "decode_attention",
       "prefill_attention")
# Prefill attention's prompts, packed as the engine packs them up to the case's tokens: lengths
# cycled from these (ShareGPT V3's first turns run 4-1024 tokens, about 200 on average).
PREFILL_PROMPT_LENGTHS = (312, 95, 18, 441, 160, 27, 230, 77, 512, 150)
DECODE_SPLIT_COUNTS = (1, 2, 3, 4, 6, 8, 16, 32)  # decode attention's split counts tried beside the launcher's


# ---------------------------------------------------------------------------------------------
# Candidates (pure functions of the table's configuration and the target: tested on CPU)
# ---------------------------------------------------------------------------------------------


def _vary(base: dict, knob: str, values) -> list[dict]:
    """`base` with `knob` set to each of `values` (nothing if the launch has no such knob)."""
    return [{**base, knob: value} for value in values] if knob in base else []


def candidates(op: str, base: dict, target) -> list[dict]:
    """The table's configuration first, then alternatives; no duplicates. Only launch keywords
    the target's Triton backend takes (ROCm's options on ROCm only)."""
    hip = target.vendor == "hip"
    found = [dict(base)]
    if op in ("rms_norm", "fused_add_rms_norm"):
        found += _vary(base, "num_warps", (1, 2, 4, 8, 16))
        if base["NUM_COL_BLOCKS"] > 1:  # only the two-pass path has a loop to pipeline
            found += _vary(base, "num_stages", (1, 2, 3, 4))
    elif op == "silu_mul":
        for block, warps in itertools.product((base["BLOCK"] // 4, base["BLOCK"] // 2, base["BLOCK"], base["BLOCK"] * 2,
                                               base["BLOCK"] * 4), (2, 4, 8)):
            if block >= warps * target.warp_size:  # at least one element a thread
                found.append({**base, "BLOCK": block, "num_warps": warps})
    elif op in ("qk_norm_rope", "qk_norm_rope_cache"):
        found += _vary(base, "num_warps", (1, 2, 4, 8))
    elif op == "decode_attention":
        for block_n, stages in itertools.product((16, 32, 64, 128), (1, 2, 3, 4)):
            found.append({**base, "BLOCK_N": block_n, "num_stages": stages})
        found += _vary(base, "num_warps", (2, 4, 8))
        found += _vary(base, "combine_num_warps", (1, 2, 4, 8))
        found.append({**base, "SPLIT_FILLED": False})  # splits over the cache, not its filled part
        # The splits combined by the KV head's last split program: one launch a layer, not two
        # (the combine kernel took 2.5 us a layer at Qwen3-32B's batch 32 on the H200, 2810a50),
        # but its one program sums the splits in turn (slower at batch 1's many splits).
        found += _vary(base, "combine_in_split", (0, 2, 64))  # up to how many splits the split kernel combines
        # How many programs share a sequence's keys (the launcher's `n_splits`, not a kernel
        # keyword: make_case's call passes it on). The launcher asks for two waves of programs
        # over the chip, counting one program a multiprocessor; at Qwen3-32B's batch 32 (256
        # KV heads) that is 2 splits, and there (an H100, a 1472 cache holding about 366 keys)
        # attention read its KV at 65% of the copy rate (bench/results/NOTES.md, 2026-12-06,
        # twenty-third session): whether more or fewer splits do better is this knob's question.
        found += [{**base, "n_splits": n} for n in DECODE_SPLIT_COUNTS]
        if hip and target.arch != "gfx950":  # Triton forces kpack to 1 on gfx950
            found += [{**base, "kpack": kpack} for kpack in (1, 2)]
    elif op == "prefill_attention":
        for block_m, block_n in itertools.product((32, 64, 128), (16, 32, 64, 128)):
            found.append({**base, "BLOCK_M": block_m, "BLOCK_N": block_n})
        found += _vary(base, "num_warps", (4, 8))
        found += _vary(base, "num_stages", (1, 2, 3))
        found += _vary(base, "SCAN", (256, 4096))
        if hip and target.arch != "gfx950":
            found += [{**base, "kpack": kpack} for kpack in (1, 2)]
    else:
        raise ValueError(f"no candidates for {op!r}")
    if hip:
        found += [{**base, "waves_per_eu": waves} for waves in (0, 1, 2, 3, 4)]
    unique = []
    for config in found:
        if config not in unique:
            unique.append(config)
    return unique


# ---------------------------------------------------------------------------------------------
# Cases: inputs at Qwen3 shapes, and a call of the op's launcher with a given configuration
# ---------------------------------------------------------------------------------------------


def make_case(op: str, model: str, tokens: int, dtype, device, cache_len: int | None = None, filled: int | None = None):
    """(call(config) -> output, the shape keywords of launch_config, a description) for one case.
    `cache_len` and `filled` (decode attention's cache and the keys it holds; by default
    fused_kernels' 4096 and 1024): a server's cache, e.g. 1472 holding 300."""
    from fused_kernels import CACHE_LEN, EPS, FILLED

    cache_len, filled = cache_len or CACHE_LEN, filled or FILLED

    from paiton.fusion import decode_attention, qk_norm_rope, rms_norm, swiglu
    from paiton.models.qwen3 import QWEN3_PRESETS

    m = QWEN3_PRESETS[model]
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    if op in ("rms_norm", "fused_add_rms_norm"):
        x, residual, weight = randn(tokens, m.hidden_size), randn(tokens, m.hidden_size), randn(m.hidden_size)
        residual = residual if op == "fused_add_rms_norm" else None
        if residual is None:
            return ((lambda config: rms_norm._launch(x, None, weight, EPS, config=config)[0]),
                    dict(n_rows=tokens, n_cols=m.hidden_size), f"[{tokens}, {m.hidden_size}]")
        return ((lambda config: rms_norm._launch(x, residual, weight, EPS, config=config)),
                dict(n_rows=tokens, n_cols=m.hidden_size), f"[{tokens}, {m.hidden_size}]")
    if op == "silu_mul":
        gate, up = randn(tokens, m.intermediate_size), randn(tokens, m.intermediate_size)
        return (lambda config: swiglu._launch(gate, up, config=config)), {}, f"[{tokens}, {m.intermediate_size}]"
    heads, kv_heads, head_dim = m.num_attention_heads, m.num_key_value_heads, m.head_dim
    if op in ("qk_norm_rope", "qk_norm_rope_cache"):
        q, k, w = randn(tokens, 1, heads, head_dim), randn(tokens, 1, kv_heads, head_dim), randn(head_dim)
        cos, sin = randn(tokens, 1, head_dim), randn(tokens, 1, head_dim)
        shape = dict(n_q_heads=heads, n_k_heads=kv_heads, head_dim=head_dim)
        if op == "qk_norm_rope":
            return ((lambda config: qk_norm_rope._launch(q, k, w, w, cos, sin, EPS, config=config)), shape,
                    f"[{tokens}, {heads}+{kv_heads} heads, {head_dim}]")
        v = randn(tokens, kv_heads, 1, head_dim)
        k_cache, v_cache = randn(tokens, kv_heads, cache_len, head_dim), randn(tokens, kv_heads, cache_len, head_dim)
        slots = torch.tensor([filled], device=device)

        def with_cache(config):
            q_out = qk_norm_rope._launch(q, k, w, w, cos, sin, EPS, cache=(v, k_cache, v_cache, slots), config=config)
            return q_out, k_cache[:, :, filled], v_cache[:, :, filled]

        return with_cache, shape, f"[{tokens}, {heads}+{kv_heads} heads, {head_dim}] + cache {cache_len}"
    if op == "decode_attention":
        from paiton.backends.lowering import launch_config
        from paiton.backends.target import detect_target

        q = randn(tokens, heads, 1, head_dim)
        k_cache, v_cache = randn(tokens, kv_heads, cache_len, head_dim), randn(tokens, kv_heads, cache_len, head_dim)
        positions = torch.tensor([filled - 1], device=device)

        def attention(config):
            config = None if config is None else dict(config)
            n_splits = None if config is None else config.pop("n_splits", None)  # the launcher's, not the kernel's
            return decode_attention._launch(q, k_cache, v_cache, positions, None, head_dim**-0.5, n_splits=n_splits,
                                            config=config)

        shape = dict(group=heads // kv_heads, q_len=1, head_dim=head_dim)
        target = detect_target(q.device)
        block_n = launch_config("decode_attention", target, **shape)["BLOCK_N"]
        splits = decode_attention.default_split_layout(tokens * kv_heads, cache_len, target.multiprocessors, block_n)[1]
        return (attention, shape,
                f"[{tokens}, {heads} heads, GQA {heads // kv_heads}], cache {cache_len} filled {filled}, "
                f"{splits} splits by default")
    if op == "prefill_attention":  # a prefill of `tokens` packed prompt tokens
        from paiton.fusion import prefill_attention

        rows, positions, slot = [], [], 0
        while len(rows) < tokens:
            n = min(PREFILL_PROMPT_LENGTHS[slot % len(PREFILL_PROMPT_LENGTHS)], tokens - len(rows))
            rows += [slot] * n
            positions += range(n)
            slot += 1
        rows, positions = torch.tensor([rows], device=device), torch.tensor([positions], device=device)
        q = randn(1, tokens, heads, head_dim).transpose(1, 2)  # the projections' layout
        k, v = randn(1, tokens, kv_heads, head_dim).transpose(1, 2), randn(1, tokens, kv_heads, head_dim).transpose(1, 2)
        shape = dict(head_dim=head_dim, element_size=q.element_size())
        return ((lambda config: prefill_attention._launch(q, k, v, rows, positions, head_dim**-0.5, config=config)), shape,
                f"prefill of {tokens} tokens ({slot} prompts), {heads} heads, GQA {heads // kv_heads}")
    raise ValueError(op)


def picked_at_run_time(call) -> list[dict]:
    """The configurations the launcher asked the lowering table for during `call(None)` (the
    launch's default path), as the lowering module returned them."""
    from paiton.backends import lowering

    real, seen = lowering.launch_config, []

    def recording(op, target, **shape):
        config = real(op, target, **shape)
        seen.append(dict(config))
        return config

    lowering.launch_config = recording
    try:
        call(None)
    finally:
        lowering.launch_config = real
    return seen


def outputs_match(a, b) -> bool:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    # bf16: a few ulp apart (another reduction order changes the rounding of sums).
    return all(torch.allclose(x.float(), y.float(), rtol=2**-6, atol=2e-2) for x, y in pairs)


def sweep(ops, tokens_list, reps, cache_len=None, filled=None):
    from fused_kernels import graph_time_us

    from paiton.backends.lowering import TABLES, launch_config
    from paiton.backends.target import detect_target

    device = torch.device("cuda", torch.cuda.current_device())
    target = detect_target(device)
    dtype = torch.bfloat16
    rows = []
    for model, tokens, op in itertools.product(MODELS, tokens_list, ops):
        torch.manual_seed(0)
        call, shape, description = make_case(op, model, tokens, dtype, device, cache_len, filled)
        table_config = launch_config(op, target, **shape)
        picked = picked_at_run_time(call)
        reference = tuple(t.clone() for t in call(table_config)) if op == "qk_norm_rope_cache" else call(table_config)
        results = []
        for config in candidates(op, table_config, target):
            entry = {"config": config, "is_table": config == table_config}
            try:
                if not outputs_match(call(config), reference):
                    entry["error"] = "output differs from the table configuration's"
                else:
                    entry["us"] = graph_time_us(lambda: call(config), reps=reps)
            except Exception as error:  # out of resources, a compile error: listed, not fatal
                entry["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            results.append(entry)
            print(f"{model} t={tokens} {op} {config}: {entry.get('us', entry.get('error'))}", file=sys.stderr)
        timed = [r for r in results if "us" in r]
        table_us = next((r["us"] for r in timed if r["is_table"]), None)
        best = min(timed, key=lambda r: r["us"]) if timed else None
        rows.append(dict(
            model=model, tokens=tokens, op=op, shape=description, table_config=table_config,
            picked_at_run_time=picked, picked_is_table=picked == [table_config],
            table_us=table_us, best_us=best and best["us"], best_config=best and best["config"],
            table_over_best=(table_us / best["us"]) if table_us and best else None, candidates=results,
        ))
    known = target.arch in TABLES
    return dict(target=dict(target.__dict__, has_table=known), rows=rows)


def markdown(result) -> str:
    env, target = result["env"], result["target"]
    table_name = target["arch"] if target["has_table"] else f"the {target['vendor']} defaults (no table for {target['arch']})"
    lines = [
        f"# Lowering sweep: {table_name} on {env['card']}",
        "",
        f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}. bf16. Time per call inside a "
        "CUDA graph (median of replays). Per case, the table's configuration against alternatives that change one knob "
        "at a time (decode attention: KV tile x stages as well); 'fastest': within "
        f"{round((WITHIN - 1) * 100)}% of the best candidate, else the table's time over the best one's.",
        "",
        "| model | tokens | op | shape | picked at run time = table | table us | best us | table / best | best alternative |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = r["table_over_best"]
        verdict = "-" if ratio is None else ("fastest" if ratio <= WITHIN else f"{ratio:.2f}")
        best = "-" if r["best_config"] is None or ratio is None or ratio <= WITHIN else " ".join(
            f"{k}={v}" for k, v in r["best_config"].items() if r["table_config"].get(k) != v)
        table_us = "failed" if r["table_us"] is None else f"{r['table_us']:.2f}"
        best_us = "-" if r["best_us"] is None else f"{r['best_us']:.2f}"
        lines.append(f"| {r['model']} | {r['tokens']} | {r['op']} | {r['shape']} | {'yes' if r['picked_is_table'] else 'NO'} | "
                     f"{table_us} | {best_us} | {verdict} | {best} |")
    failed = sorted({(r["op"], " ".join(f"{k}={v}" for k, v in c["config"].items()), c["error"])
                     for r in result["rows"] for c in r["candidates"] if "error" in c})
    if failed:
        lines += ["", "Candidates that failed (not timed):", ""]
        lines += [f"- {op} {config}: {error}" for op, config, error in failed]
    return "\n".join(lines) + "\n"


def main(argv=None):
    from fused_kernels import CACHE_LEN, FILLED

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--tokens", default="1,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default: all with Triton kernels)")
    parser.add_argument("--cache-len", type=int, default=CACHE_LEN, help="the KV cache's length (default %(default)s; a server's: 1472)")
    parser.add_argument("--filled", type=int, default=FILLED, help="the keys the cache holds (default %(default)s)")
    args = parser.parse_args(argv)
    if args.filled >= args.cache_len:
        parser.error("--filled is under the cache's length (the rotary case writes the next slot)")
    ops = [op for op in args.ops.split(",") if op]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; ops are {', '.join(OPS)}")
    if not torch.cuda.is_available():
        sys.exit("bench/lowering_sweep.py needs a CUDA or ROCm GPU: it times kernels on the GPU it runs on. Without one, "
                 "`python -m paiton.backends.lowering --target <arch>` prints a chip's table, compiled ahead of time.")
    import paiton.fusion.ops  # noqa: F401  (torch.ops.paiton.*)

    result = {"env": run_environment("cuda"), **sweep(ops, [int(t) for t in args.tokens.split(",")], args.reps, args.cache_len, args.filled)}
    card = result["env"]["card"].replace(" ", "_")
    write_results(args.out, f"lowering_sweep-{result['target']['arch']}-{card}-{result['env']['date'][:10]}", result,
                  markdown(result))
    mismatched = [r for r in result["rows"] if not r["picked_is_table"]]
    if mismatched:
        sys.exit(f"the launcher did not pick the table's configuration in {len(mismatched)} case(s): see the results")


if __name__ == "__main__":
    main()

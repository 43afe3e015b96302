"""Every few-rows launch at Qwen3's decode shapes, against cuBLAS and the weight's floor: which
launches the lowering table is missing (GPU only).

    python bench/few_rows_sweep.py --model qwen3-32b --rows 8,32 [--fp8] [--out bench/results]

Issue 20's batch-32 step is about 3 ms over its weight floor on an H200, 1.4 ms of it in the
products of 32 rows (bench/results/NOTES.md: at 2 rows the few-rows kernel streams gate/up at the
copy rate, at 32 rows the best launch is 9% over it, cuBLAS 13%). Per (weight, rows) this has
`few_rows_gemm.choose` itself time (fusion/timing.py: back to back, host launches hidden, each
product over a cold copy of the weight, each launch's best of TIMING_ROUNDS rounds):

* cuBLAS (bf16 weights; torch's linear),
* the chip's lowering table's candidates (few_rows_linear's, or fp8_linear's several-rows ones
  with --fp8; on sm_90 the W_TMA launches among them),
* PROPOSED launches of the same kernel that the table does not have (wider W tiles with split-K,
  more stages of narrower K tiles, two warpgroups, W by tensor descriptor at other tiles).

The first run (H100, b065e57) also timed a prototype kernel whose W tiles came by tensor
descriptor; it won at 32 rows on FP8 weights, and became the kernel's W_TMA launch key.

A launch whose product differs from torch's by more than `few_rows_gemm.AGREEMENT` is reported
and not timed. Writes few_rows_sweep-<card>-<date>[-tag].json/.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from bench_common import copy_rate_tbps, launch_name, run_environment, write_results

from paiton.fusion.few_rows_gemm import candidate

# Launches of fusion/few_rows_gemm.py's kernel that its tables lack, for 8-64 rows on sm_90.
PROPOSED: tuple[dict, ...] = (
    candidate(128, 128, 4, 4, splits=2, swap_ab=True),
    candidate(64, 64, 4, 8, swap_ab=True),
    candidate(64, 128, 4, 4, splits=2, swap_ab=True),
    candidate(128, 64, 4, 4, swap_ab=True, tma=True),
    candidate(64, 64, 4, 6, swap_ab=True, tma=True),
    candidate(32, 128, 4, 5, tma=True),
    candidate(64, 256, 4, 3, swap_ab=True, tma=True),
)
PROPOSED_FP8: tuple[dict, ...] = (
    candidate(128, 128, 4, 4, splits=2, via_fp16=True, swap_ab=True),
    candidate(128, 128, 4, 4, splits=2, via_fp16=True, swap_ab=True, tma=True),
    candidate(64, 128, 4, 4, splits=2, via_fp16=True, swap_ab=True, tma=True),
    candidate(32, 128, 4, 5, splits=4, via_fp16=True, tma=True),
    candidate(32, 256, 4, 4, via_fp16=True, tma=True),
)


def sweep(n, k, rows, fp8_dtype, copy_tbps, table, device="cuda", time_ms_fn=None):
    """One weight at one row count, timed by `few_rows_gemm.choose` itself over the table's
    launches and the proposed ones (its agreement check, cold weights, rounds; `time_ms_fn`: its
    timer, GPU time by default): {launch name: us}, which group each is in, and why any was not
    timed, with the floor."""
    from paiton.fusion import few_rows_gemm
    from paiton.fusion.fp8_linear import quantize_weight

    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
    scales = None
    if fp8_dtype is not None:
        weight, scales = quantize_weight(weight, fp8_dtype)
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    proposed = [config for config in (PROPOSED_FP8 if scales is not None else PROPOSED) if config not in table]
    few_rows_gemm.choose(x, weight, [*table, *proposed], time_ms_fn=time_ms_fn, scales=scales)
    (record,) = [r for r in few_rows_gemm.chosen_launches() if (r["rows"], r["n"], r["k"], r.get("weight_dtype", "bfloat16"))
                 == (few_rows_gemm.rows_bucket(rows), n, k, str(weight.dtype).removeprefix("torch."))]
    times = {launch_name(config): us for config, us in record.get("candidate_times", ())}
    group = {launch_name(config): "vendor" if config == few_rows_gemm.VENDOR else "table" if config in table else "proposed"
             for config, _ in record.get("candidate_times", ())}
    notes = {launch_name(config): "disagrees with torch's product" for config in record.get("disagreeing", ())}
    notes.update({launch_name(config): "not launched: more shared memory than the chip has, or a launch error"
                  for config in [*table, *proposed] if launch_name(config) not in times and launch_name(config) not in notes})
    floor_us = n * k * weight.element_size() / (copy_tbps * 1e12) * 1e6
    return dict(n=n, k=k, rows=rows, weight_dtype=str(weight.dtype).removeprefix("torch."), floor_us=round(floor_us, 2),
                times_us=times, kinds=group, notes=notes)


def best_of(result, kind):
    named = [(us, name) for name, us in result["times_us"].items() if result["kinds"].get(name) == kind]
    return min(named) if named else None


def markdown(env, results) -> str:
    lines = [f"# Few-rows launches at Qwen3's decode shapes on {env['card']}", "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}; copy rate "
             f"{env['copy_TBps']:.2f} TB/s; floor = the weight's bytes over it; us per product, timed as "
             "few_rows_gemm.choose times (back to back, cold weights, best of its rounds).", "",
             "| model | weight | N x K | dtype | rows | floor | cuBLAS | best table launch | best proposed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = []
        for kind in ("vendor", "table", "proposed"):
            best = best_of(r, kind)
            cells.append("-" if best is None else (f"{best[0]:.1f} ({best[0] / r['floor_us']:.2f}x)"
                                                   + ("" if kind == "vendor" else f" {best[1]}")))
        lines.append(f"| {r['model']} | {r['weight']} | {r['n']} x {r['k']} | {r['weight_dtype']} | {r['rows']} | "
                     f"{r['floor_us']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Every launch, us (fastest first), and those not timed:", ""]
    for r in results:
        ordered = sorted(r["times_us"].items(), key=lambda item: item[1])
        lines.append(f"- {r['model']} {r['weight']} {r['weight_dtype']} {r['rows']} rows: "
                     + ", ".join(f"{name} {us:.1f}" for name, us in ordered)
                     + ("; not timed: " + "; ".join(f"{name}: {why}" for name, why in r["notes"].items()) if r["notes"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-32b")
    parser.add_argument("--rows", default="8,32", help="row counts (decode batch sizes, 2-64)")
    parser.add_argument("--weights", default="", help="comma-separated weights to time (default: all of the model's)")
    parser.add_argument("--fp8", action="store_true", help="also the FP8 weights (per-channel scales)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("few_rows_sweep times GPU kernels: it needs a GPU; on a CPU there is nothing to time.", file=sys.stderr)
        return 2
    from paiton.backends.lowering import launch_config
    from paiton.backends.target import detect_target
    from paiton.models.fp8 import fp8_format
    from paiton.models.qwen3 import projection_shapes

    target = detect_target(torch.device("cuda"))
    tables = {False: launch_config("few_rows_linear", target).get("candidates", ()),
              True: launch_config("fp8_linear", target).get("several_rows_candidates", ())}
    env = run_environment("cuda")
    env["copy_TBps"] = copy_rate_tbps("cuda")
    wanted = [w for w in args.weights.split(",") if w]
    results = []
    for fp8 in ([None, fp8_format("cuda")] if args.fp8 else [None]):
        for name, (n, k) in projection_shapes(args.model).items():
            if wanted and name not in wanted:
                continue
            for rows in (int(r) for r in args.rows.split(",")):
                result = dict(model=args.model, weight=name, **sweep(n, k, rows, fp8, env["copy_TBps"], tables[fp8 is not None]))
                results.append(result)
                line = ", ".join(f"{kind} {best[0]:.1f} ({best[1]})" for kind in ("vendor", "table", "proposed")
                                 if (best := best_of(result, kind)))
                print(f"{name} [{n} x {k}] {result['weight_dtype']} {rows} rows, floor {result['floor_us']:.1f} us: {line}",
                      flush=True)
                torch.cuda.empty_cache()
    stem = f"few_rows_sweep-{args.model}-{env['card'].replace(' ', '_')}-{env['date'][:10]}" + (f"-{args.tag}" if args.tag else "")
    write_results(args.out, stem, dict(env=env, results=results), markdown(env, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

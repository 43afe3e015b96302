"""FP8 linears of 1 to 128 rows at Qwen3's projection shapes, every path Paiton has against the
bf16 GEMM, on the GPU (GPU only: on a CPU it says so and exits).

    python bench/fp8_gemm_sweep.py --models qwen3-8b,qwen3-32b --rows 1,2,4,8,16,32,64,128

Per (model, weight, rows), each timed with triton.testing.do_bench (median; L2 flushed before
each run): "bf16", torch's linear on the bf16 weight (the model without FP8); one row, Paiton's
FP8 GEMV with the lowering table's launch; several rows, each path of fusion/fp8_paths.py the
chip has for the shape: the FP8 GEMM (up to 64 rows), _scaled_mm with its per-token activation
quantization ("scaled_mm"; and the _scaled_mm call alone on quantized activations,
"scaled_mm_only": the quantization's share), and the weight dequantized then torch's linear.
Each path's relative error against the float32 product of x and the dequantized weight; the
path `choose_path` takes (timed as the op times it: back to back, host launches hidden, the
weight from memory), with its own times. The FP8 floor: the FP8 weight's bytes over the
measured copy rate. Also, for the bf16 model itself at 2-64 rows: cuBLAS against the bf16 floor,
and the few-rows GEMM on the bf16 weight (fusion/few_rows_gemm.py: W read once) with the launch
`few_rows_gemm.choose` picks among the lowering table's candidates, timed by choose's own timer
(vendor and choice) and by do_bench (issue 20: a Qwen3-32B decode step is about 2 ms slower at 2
rows than at 1, where the timed GEMV runs; this says how much of that cuBLAS costs at few rows).
Writes fp8_gemm_sweep-<card>-<date>.json/.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from bench_common import copy_rate_tbps, launch_name, run_environment, write_results

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


def time_us(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def sweep_shape(preset, name, n, k, rows, params, fp8, copy_tbps, few_rows_params=()):
    """One weight at every row count: a row of results each."""
    from paiton.fusion import fp8_paths, gemv
    from paiton.fusion import few_rows_gemm
    from paiton.fusion.few_rows_gemm import MAX_ROWS
    from paiton.fusion.fp8_linear import dequantize, quantize_weight
    from paiton.fusion.quantize_rows import quantize_rows

    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    w8, scales = quantize_weight(weight, fp8)
    reference_weight = dequantize(w8, scales, torch.float32)
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        reference = x.float() @ reference_weight.T
        row = dict(model=preset, weight=name, n=n, k=k, rows=m, floor_us=n * k / (copy_tbps * 1e12) * 1e6,
                   bf16_us=time_us(lambda: torch.nn.functional.linear(x, weight)), paths={})
        row["bf16_floor_us"] = 2 * row["floor_us"]
        if 1 < m <= MAX_ROWS:  # the bf16 weight through the few-rows GEMM, its launch as the op chooses it
            choice = few_rows_gemm.choose(x, weight, few_rows_params)
            record = next(c for c in few_rows_gemm.chosen_launches() if (c["rows"], c["n"], c["k"]) == (
                few_rows_gemm.rows_bucket(m), n, k) and c["dtype"] == "bfloat16")
            row["bf16_few_rows_choice"] = choice
            row["bf16_few_rows_timed_us"] = dict(vendor=record.get("vendor_us"), chosen=record.get("chosen_us"))
            if choice != gemv.VENDOR:
                few_rows = few_rows_gemm.launch_candidate(x, weight, choice)
                bf16_reference = x.float() @ weight.float().T
                row["bf16_few_rows_us"] = time_us(lambda: few_rows_gemm.launch_candidate(x, weight, choice))
                row["bf16_few_rows_error"] = ((few_rows.float() - bf16_reference).norm() / bf16_reference.norm()).item()
        runs = {}
        if m == 1:  # the GEMV as the op runs it (the launch gemv.choose timed fastest), and every launch it had
            candidates = params.get("one_row_candidates") or (params["one_row"],)
            launch = gemv.choose(x, w8, candidates, scales=scales)  # (an FP8 weight's choice is a launch)
            runs["gemv"] = lambda: gemv.launch_gemv(x, w8, launch, scales=scales)
            row["gemv_launch"] = launch
            row["gemv_launches_us"] = {}
            for config in candidates:
                try:
                    row["gemv_launches_us"][launch_name(config)] = time_us(lambda c=config: gemv.launch_gemv(x, w8, c, scales=scales))
                except Exception as error:  # a launch this chip cannot make
                    row["gemv_launches_us"][launch_name(config)] = f"failed: {type(error).__name__}"
        for path in fp8_paths.eligible_paths(m, x, w8, scales, params["several_rows"]) if m > 1 else ():
            runs[path] = lambda run=fp8_paths.RUNS[path]: run(x, w8, scales)
            if path == fp8_paths.SCALED_MM:
                x8, x_scales = quantize_rows(x, fp8)
                runs["scaled_mm_only"] = lambda x8=x8, x_scales=x_scales: torch._scaled_mm(
                    x8, w8.t(), scale_a=x_scales.reshape(-1, 1), scale_b=scales.reshape(1, -1), out_dtype=torch.bfloat16)
        for path, run in runs.items():
            error = ((run().float() - reference).norm() / reference.norm()).item()
            row["paths"][path] = dict(us=time_us(run), relative_error=error)
        if m > 1:
            row["choice"] = fp8_paths.choose_path(x, w8, scales, params["several_rows"])
        fastest = min((p for p in row["paths"] if p != "scaled_mm_only"), key=lambda p: row["paths"][p]["us"])
        row["fastest"] = fastest
        print(f"{preset} {name} [{n} x {k}] {m} rows: bf16 {row['bf16_us']:.1f} us (floor {row['bf16_floor_us']:.1f}"
              + (f", few-rows kernel {row['bf16_few_rows_us']:.1f}" if "bf16_few_rows_us" in row else "") + "); "
              + ", ".join(f"{p} {r['us']:.1f} us (err {r['relative_error']:.1e})" for p, r in row["paths"].items())
              + f"; fastest {fastest}" + (f", chosen {row['choice']}" if m > 1 else ""), flush=True)
        results.append(row)
    return results


def markdown(env, rows, choices) -> str:
    from paiton.fusion import fp8_paths

    columns = ("gemv", "fp8_gemm", "scaled_mm", "scaled_mm_only", "dequantize")
    lines = [f"# FP8 linears against the bf16 GEMM on {env['card']}", "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}; bf16 activations, "
             f"FP8 weights ({env['fp8']}) with per-channel scales; times: do_bench median (L2 flushed), us; copy rate "
             f"{env['copy_TBps']:.2f} TB/s; floor = FP8 weight bytes / copy rate. scaled_mm includes the per-token "
             "quantization, scaled_mm_only is the _scaled_mm call alone. x = speedup of the fastest FP8 path over bf16.", "",
             "bf16 few rows: the few-rows GEMM on the bf16 weight (2-64 rows), with the launch `few_rows_gemm.choose` "
             "picked (- where it kept cuBLAS); bf16 / floor: cuBLAS against the bf16 weight's bytes over the copy rate.", "",
             "| model | weight | N x K | rows | floor | bf16 | bf16 / floor | bf16 few rows | " + " | ".join(columns)
             + " | fastest | chosen (timed) |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(columns) + "---|---|"]
    for r in rows:
        cells = [f"{r['paths'][c]['us']:.1f}" if c in r["paths"] else "-" for c in columns]
        fastest_us = r["paths"][r["fastest"]]["us"]
        few_rows = f"{r['bf16_few_rows_us']:.1f}" if "bf16_few_rows_us" in r else "-"
        lines.append(f"| {r['model']} | {r['weight']} | {r['n']} x {r['k']} | {r['rows']} | {r['floor_us']:.1f} | "
                     f"{r['bf16_us']:.1f} | {r['bf16_us'] / r['bf16_floor_us']:.2f}x | {few_rows} | " + " | ".join(cells) + f" | {r['fastest']} ({r['bf16_us'] / fastest_us:.2f}x) | "
                     f"{r.get('choice', '-')} |")
    lines += ["", "One row: each GEMV launch (BLOCK_N x BLOCK_K, warps, stages), do_bench us; * the one `gemv.choose` "
              "took (its own timer, as below):", ""]
    for r in rows:
        if r.get("gemv_launches_us"):
            chosen = launch_name(r["gemv_launch"])
            lines.append(f"- {r['model']} {r['weight']} [{r['n']} x {r['k']}]: " + ", ".join(
                f"{name}{'*' if name == chosen else ''} {us:.1f}" if isinstance(us, float) else f"{name} {us}"
                for name, us in r["gemv_launches_us"].items()))
    lines += ["", "The choices as `fusion.fp8_paths.chosen_paths()` lists them (its own timer: back to back, host "
              "launches hidden, over cold copies of the weight):", ""]
    lines += [f"- {fp8_paths.describe_choice(c)}" for c in choices]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3-8b,qwen3-32b")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts (decode batch sizes)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_gemm_sweep times GPU kernels (do_bench, FP8 tensor cores): it needs a CUDA or ROCm GPU; "
              "on a CPU there is nothing to time.", file=sys.stderr)
        return 2
    from paiton.backends.lowering import INDUCTOR, lowering_for
    from paiton.backends.target import detect_target
    from paiton.fusion import fp8_paths
    from paiton.models.fp8 import fp8_format
    from paiton.models.qwen3 import projection_shapes

    target = detect_target(torch.device("cuda"))
    lowering = lowering_for("fp8_linear", target)
    few_rows_params = lowering_for("few_rows_linear", target).params.get("candidates", ())
    if lowering.implementation == INDUCTOR:
        print(f"fp8_gemm_sweep: {lowering.why}", file=sys.stderr)
        return 2
    fp8 = fp8_format("cuda")
    env = run_environment("cuda")
    env.update(copy_TBps=copy_rate_tbps("cuda"), fp8=str(fp8).removeprefix("torch."), several_rows=list(lowering.params["several_rows"]))
    rows = []
    for preset in args.models.split(","):
        for name, (n, k) in projection_shapes(preset).items():
            rows += sweep_shape(preset, name, n, k, [int(r) for r in args.rows.split(",")], lowering.params, fp8,
                                env["copy_TBps"], few_rows_params)
            torch.cuda.empty_cache()
    from paiton.fusion import few_rows_gemm

    choices = fp8_paths.chosen_paths()
    write_results(args.out, f"fp8_gemm_sweep-{env['card'].replace(' ', '_')}-{env['date'][:10]}",
                  dict(env=env, rows=rows, choices=choices, bf16_few_rows_choices=few_rows_gemm.chosen_launches()),
                  markdown(env, rows, choices))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

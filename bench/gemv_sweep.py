"""The one-row linear (fusion/gemv.py) against the vendor's GEMM at Qwen3's decode shapes:
every candidate launch of the lowering table and torch's linear, timed with the weights coming
from memory, as in a decode step, each checked against a float32 product. The row "down+silu"
is down_proj with SwiGLU applied as the GEMV loads (silu_mul_linear) against paiton.silu_mul
followed by the vendor's GEMM.

    python bench/gemv_sweep.py --models qwen3-8b,qwen3-32b

Every launch is timed as gemv.choose times it (gemv.time_candidates: launched back to back,
behind a GPU spin that hides the host's launch time, over copies of the weight that span four
times L2), in --rounds rounds, each keeping its best round (more rounds than choose, in a
process that does nothing else); do_bench's time (L2 flushed by zeroing 256 MB before each
run, how choose timed until 2026-11-29) is listed beside it. Prints, per
weight: the vendor's time, the best candidate's, both as a share of the copy rate (weight
bytes over bench_common.copy_rate_tbps), the pick, and the card's entry in backends/
measured_gemv.py if it has one. The .md ends with the picks in that table's format. Writes
gemv_sweep-<card>-<date>.json/.md/.png.
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_common import copy_rate_tbps, grouped_bar_plot, run_environment, write_results


def shapes(preset: str) -> dict[str, tuple[int, int, bool]]:
    """weight name -> (N, K, gated)."""
    from paiton.models.qwen3 import QWEN3_PRESETS, projection_shapes

    m = QWEN3_PRESETS[preset]
    shapes = {name: (n, k, False) for name, (n, k) in projection_shapes(preset).items()}
    return {**shapes, "down+silu": (*shapes["down"][:2], True), "lm_head": (m.vocab_size, m.hidden_size, False)}


def main(argv=None):
    from triton.testing import do_bench

    from paiton.backends.lowering import launch_config
    from paiton.backends.measured_gemv import measured_launch
    from paiton.backends.target import detect_target
    from paiton.fusion import gemv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3-8b,qwen3-32b")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds; every launch once per round, in turn")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    device = "cuda"
    env = run_environment(device)
    env["copy_TBps"] = copy = copy_rate_tbps(device)
    target = detect_target(torch.device(device))
    rows = []
    for preset in args.models.split(","):
        for name, (n, k, gated) in shapes(preset).items():
            candidates = launch_config("silu_mul_linear" if gated else "one_row_linear", target).get("candidates", ())
            weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
            x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
            up = torch.randn(1, k, device=device, dtype=torch.bfloat16) if gated else None
            reference = gemv.gemv_reference(x.float(), weight.float(), None if up is None else up.float())
            floor_us = n * k * 2 / (copy * 1e12) * 1e6
            row = dict(model=preset, weight=name, n=n, k=k, gated=gated, floor_us=floor_us, candidates=[])
            timed = dict((str(config), ms) for config, ms in gemv.time_candidates(x, weight, candidates, up, args.rounds))
            row["vendor_us"] = timed[gemv.VENDOR] * 1e3
            # What do_bench (a 256 MB zero_ before each run) says, for comparison: choose timed so until 2026-11-29.
            row["do_bench_vendor_us"] = do_bench(lambda: gemv.vendor_linear(x, weight, up), warmup=10, rep=50,
                                                 return_mode="median") * 1e3
            for config in candidates:
                y = gemv.launch_gemv(x, weight, config, up)
                error = ((y.float() - reference).norm() / reference.norm()).item()
                do_bench_us = do_bench(lambda config=config: gemv.launch_gemv(x, weight, config, up), warmup=10, rep=50,
                                       return_mode="median") * 1e3
                row["candidates"].append(dict(config=config, us=timed[str(config)] * 1e3, do_bench_us=do_bench_us,
                                              relative_error=error))
            best = min(row["candidates"], key=lambda c: c["us"])
            row["best"] = best
            row["pick"] = best["config"] if best["us"] < row["vendor_us"] else gemv.VENDOR
            row["table"] = measured_launch(x.device, n, k, k, x.dtype, gated, candidates)
            rows.append(row)
            print(f"{preset} {name} [{n} x {k}]: vendor {row['vendor_us']:.1f} us ({floor_us / row['vendor_us']:.0%}), "
                  f"best {best['us']:.1f} us ({floor_us / best['us']:.0%}) {best['config']}, err {best['relative_error']:.1e}, "
                  f"pick {row['pick']}, in the table {row['table']}", flush=True)
    lines = [f"# One-row linear vs the vendor's GEMM on {env['card']}", "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, bf16, one row; "
             f"times as gemv.choose takes them (back to back, host launch time hidden, over copies of the weight spanning 4x L2), each launch's "
             f"best of {args.rounds} rounds taken in turn; in brackets do_bench's (L2 flushed by a 256 MB zero_) for "
             f"comparison; copy rate {copy:.2f} TB/s (read+write); % = floor / time.", "",
             "| model | weight | N x K | floor us | vendor us [do_bench] | best GEMV us [do_bench] | best launch | pick | in the table |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pick, table = (c if c in (gemv.VENDOR, None) else "gemv" for c in (r["pick"], r["table"]))
        lines.append(f"| {r['model']} | {r['weight']} | {r['n']} x {r['k']} | {r['floor_us']:.1f} | {r['vendor_us']:.1f} "
                     f"({r['floor_us'] / r['vendor_us']:.0%}) [{r['do_bench_vendor_us']:.1f}] | {r['best']['us']:.1f} "
                     f"({r['floor_us'] / r['best']['us']:.0%}) [{r['best']['do_bench_us']:.1f}] | "
                     f"{r['best']['config']} | {pick} | {table if r['table'] == r['pick'] else f'{table} (differs)'} |")
    # The picks in backends/measured_gemv.py's format, to paste under the card's name.
    lines += ["", f"Entries for backends/measured_gemv.py, MEASURED[{env['card']!r}]:", "", "```python"]
    for r in rows:
        pick = r["pick"] if r["pick"] == gemv.VENDOR else tuple(r["pick"][key] for key in ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
        lines.append(f"    ({r['n']}, {r['k']}, \"bfloat16\", {r['gated']}): {pick!r},  # {r['model']} {r['weight']}")
    lines.append("```")
    stem = write_results(args.out, f"gemv_sweep-{env['card'].replace(' ', '_')}-{env['date'][:10]}", dict(env=env, rows=rows),
                         "\n".join(lines) + "\n")
    plot(env, rows, stem + ".png")


def plot(env, rows, path):
    groups = {f"{r['model'][6:]} {r['weight']}": {"vendor GEMM": 100 * r["floor_us"] / r["vendor_us"],
                                                   "best Paiton GEMV": 100 * r["floor_us"] / r["best"]["us"]} for r in rows}
    grouped_bar_plot(path, f"One-row linears on {env['card']}, bf16, L2 flushed ({env['date'][:10]}, {env['commit']})",
                     groups, "% of the copy rate (higher is better)")


if __name__ == "__main__":
    main()

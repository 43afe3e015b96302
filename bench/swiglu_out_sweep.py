"""A batch-1 MLP two ways: where SwiGLU goes between gate/up and down_proj (issue 21).

    python bench/swiglu_out_sweep.py                      # on a GPU: Qwen3-8B and -32B, FP8 and bf16
    python bench/swiglu_out_sweep.py --models tiny        # on a CPU: the outputs' check only

Today (the `swiglu` and `silu_mul_linear` passes) a decode step at batch 1 runs the MLP as

    gate_up = GEMV(x, [W_gate; W_up])            plain: X_PER_ROW launches, 96% of an H200's copy rate
    y = GEMV(silu(gate) * up, W_down)            gated: silu in the loop, 75% there (32B, FP8)

or, where the timing says so, silu_mul's kernel and then down_proj plain (`silu_first`). The
other way (fusion/gemv.py SWIGLU_OUT) puts SwiGLU in the first product's last step: each of its
programs takes gate rows and the matching up rows, so the pair meets in registers and it writes
h = silu(gate) * up [I] directly; down_proj is then plain:

    h = GEMV_swiglu_out(x, [W_gate; W_up])       y = GEMV(h, W_down)

Same bytes, one launch each, and silu once per output instead of once per element of W_down's
rows a program reads. This script times both per model and weight dtype the way the one-row
choice times launches (fusion/gemv.time_candidates: each candidate over copies of the weight that
do not fit L2 together, its best round), each product's fastest launch, and checks that both
ways give the same y bit for bit. What it prints decides whether a pass should route a decode
step's MLP through SWIGLU_OUT (the forms' sums are the per-layer difference: 64 layers on
Qwen3-32B). Writes swiglu_out_sweep-<card>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import copy_rate_tbps, run_environment, versions_line, write_results  # noqa: E402


def mlp_weights(model: str, fp8: bool, device: str, dtype: torch.dtype, seed: int = 0):
    """(W_gate_up packed [2I, H], its scales or None, W_down [H, I], its scales or None) at
    `model`'s shapes, random (FP8: quantized per row)."""
    from paiton.fusion.fp8_linear import quantize_weight
    from paiton.models.qwen3 import projection_shapes

    shapes = projection_shapes(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    made = []
    for name in ("gate_up", "down"):
        n, k = shapes[name]
        weight = torch.randn(n, k, generator=generator, device=device, dtype=dtype) * k ** -0.5
        made += list(quantize_weight(weight)) if fp8 else [weight, None]
    return made


def both_ways(x, gate_up, gate_up_scales, down, down_scales, launches):
    """(y today, y through SWIGLU_OUT) with the given launches {"gate_up", "down_gated",
    "gate_up_swiglu_out", "down"}. Bit for bit equal when both down_proj launches sum K in the
    same order (the same BLOCK_K and CHUNK): SwiGLU's h is the same bits either way."""
    from paiton.fusion.gemv import launch_gemv

    half = gate_up.shape[0] // 2
    both = launch_gemv(x, gate_up, launches["gate_up"], scales=gate_up_scales)
    gate, up = both[..., :half].contiguous(), both[..., half:].contiguous()
    today = launch_gemv(gate, down, launches["down_gated"], up, down_scales)
    h = launch_gemv(x, gate_up, launches["gate_up_swiglu_out"], scales=gate_up_scales, swiglu_out=True)
    return today, launch_gemv(h, down, launches["down"], scales=down_scales)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |a|."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-30)).item()


def fastest(x, weight, candidates, scales, up=None, swiglu_out=False):
    """(launch, us) of the fastest of `candidates` for one product, timed by the one-row choice's
    own timing (gemv.time_candidates); Paiton's launches only, so both forms compare GEMVs."""
    from paiton.fusion.gemv import VENDOR, time_candidates
    from paiton.fusion.timing import TIMING_ROUNDS

    timed = time_candidates(x, weight, candidates, up, TIMING_ROUNDS, scales=scales, swiglu_out=swiglu_out)
    config, ms = min((timing for timing in timed if timing[0] != VENDOR), key=lambda timing: timing[1])
    return config, ms * 1e3


def run_case(model: str, fp8: bool, device: str, rate_tbps: float | None) -> dict:
    from paiton.backends.lowering import launch_config
    from paiton.backends.target import detect_target
    from paiton.fusion.gemv import INTERPRETER_CONFIG, gated_forms

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    gate_up, gate_up_scales, down, down_scales = mlp_weights(model, fp8, device, dtype)
    x = torch.randn(1, gate_up.shape[1], device=device, dtype=dtype)
    row = dict(model=model, weights="e4m3fn (row scales)" if fp8 else str(dtype).removeprefix("torch."))
    if not cuda:  # the interpreter's launch: the outputs' check only
        launches = dict.fromkeys(("gate_up", "down_gated", "gate_up_swiglu_out", "down"), INTERPRETER_CONFIG)
    else:
        params = launch_config("fp8_linear" if fp8 else "one_row_linear", detect_target(x.device))
        candidates = list(params["one_row_candidates"] if fp8 else params["candidates"])
        gated = gated_forms(candidates)
        half = gate_up.shape[0] // 2
        both = torch.empty(1, 2 * half, device=device, dtype=dtype)
        gate, up = both[..., :half].contiguous(), both[..., half:].contiguous()
        h = torch.empty(1, half, device=device, dtype=dtype)
        timed = {"gate_up": fastest(x, gate_up, candidates, gate_up_scales),
                 "down_gated": fastest(gate, down, gated, down_scales, up=up),
                 "gate_up_swiglu_out": fastest(x, gate_up, candidates, gate_up_scales, swiglu_out=True),
                 "down": fastest(h, down, candidates, down_scales)}
        launches = {name: config for name, (config, _) in timed.items()}
        row.update({f"{name}_us": us for name, (_, us) in timed.items()}, launches=launches)
        row["today_us"] = row["gate_up_us"] + row["down_gated_us"]
        row["swiglu_out_us"] = row["gate_up_swiglu_out_us"] + row["down_us"]
        nbytes = sum(t.numel() * t.element_size() for t in (gate_up, down, gate_up_scales, down_scales) if t is not None)
        row["floor_us"] = nbytes / (rate_tbps * 1e12) * 1e6 if rate_tbps else None
    # The check: both forms with one down_proj launch (the plain one's, gated for today's form),
    # so only where SwiGLU happens differs. The timed launches may sum K in other orders (at
    # 2810a50 on an H200, 32B bf16's fastest gated and plain down_proj had BLOCK_K 1024 and 512):
    # their outputs are compared by relative difference only.
    plain_down = {key: value for key, value in launches["down"].items() if key != "SILU_FIRST"}
    today, through_swiglu_out = both_ways(x, gate_up, gate_up_scales, down, down_scales, dict(launches, down_gated=plain_down))
    row["outputs_equal"] = torch.equal(today, through_swiglu_out)
    today, through_swiglu_out = both_ways(x, gate_up, gate_up_scales, down, down_scales, launches)
    row["timed_launches_relative_difference"] = relative_difference(today, through_swiglu_out)
    return row


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# A batch-1 MLP two ways: SwiGLU in down_proj's loop, or in gate/up's last step ({env['card']})", "",
             versions_line(env) + ". Per layer: each product's fastest launch, timed over cold copies of its weight "
             "as the one-row choice times them (bench/swiglu_out_sweep.py's docstring).", ""]
    if "today_us" not in rows[0]:
        lines.append("Not timed (no GPU): the outputs' check only.")
    else:
        lines += ["| model | weights | today: gate/up + gated down us | SWIGLU_OUT gate/up + plain down us | today / SWIGLU_OUT "
                  "| floor us |", "|---|---|---|---|---|---|"]
        for r in rows:
            floor = f"{r['floor_us']:.1f}" if r["floor_us"] else "-"
            lines.append(f"| {r['model']} | {r['weights']} | {r['gate_up_us']:.1f} + {r['down_gated_us']:.1f} = "
                         f"{r['today_us']:.1f} | {r['gate_up_swiglu_out_us']:.1f} + {r['down_us']:.1f} = "
                         f"{r['swiglu_out_us']:.1f} | {r['today_us'] / r['swiglu_out_us']:.3f} | {floor} |")
        lines += ["", "Launches: " + "; ".join(f"{r['model']} {r['weights']}: {r['launches']}" for r in rows)]
    lines += ["", "Outputs equal bit for bit (one down_proj launch for both forms): "
              + ", ".join(f"{r['model']} {r['weights']} {r['outputs_equal']}" for r in rows),
              "", "At the timed launches, max |today - SWIGLU_OUT| / max |today|: "
              + ", ".join(f"{r['model']} {r['weights']} {r['timed_launches_relative_difference']:.1e}" for r in rows), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3-8b,qwen3-32b")
    parser.add_argument("--weights", default="fp8,bf16", help="fp8 and/or bf16 (a CPU runs its own dtype, fp32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    rate = copy_rate_tbps(args.device)
    rows = [run_case(model, kind == "fp8", args.device, rate)
            for model in args.models.split(",") for kind in args.weights.split(",")]
    env = dict(run_environment(args.device), copy_TBps=rate,
               dtype="activations " + ("bfloat16" if args.device.startswith("cuda") else "float32"))
    write_results(args.out, f"swiglu_out_sweep-{env['card'].replace(' ', '_')}-{env['date'][:10]}", dict(env=env, rows=rows),
                  markdown(env, rows))
    return 0 if all(r["outputs_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A batch-1 decode step's products and norms as one chain of Paiton kernels in a CUDA graph,
without and with programmatic dependent launch (PAITON_PDL=1, fusion/pdl.py): what PDL takes
off each layer, with no Dynamo or Inductor in the way.

    python bench/pdl_chain.py --model qwen3-32b --layers 16            # bf16 weights
    python bench/pdl_chain.py --model qwen3-8b --layers 16 --fp8       # FP8 weights (per-row scales)

Each layer, as Paiton's passes leave a decode step at batch 1 (attention left out: its input
here is the first columns of the q/k/v product):

    x, residual = fused_add_rms_norm(h, residual)       q/k/v = packed_linear(x, [W_qkv])
    o = packed_linear(q, [W_o])                          x, residual = fused_add_rms_norm(o, residual)
    gate_up = packed_linear(x, [W_gate_up])              h = silu_mul_packed_linear(gate, up, [W_down])

(fp8_linear / silu_mul_fp8_linear with --fp8). Every layer has weights of its own, so they come
from memory as in a model. The products' launches are chosen first, as a model's first step
chooses them (timed on the GPU), then each mode's chain is captured once and replayed; the
two modes' outputs must be equal bit for bit (PDL moves when a kernel starts, not what it
computes). The floor is the layers' weight bytes over the measured copy rate.

On a CPU the chain runs eagerly, without CUDA graphs or timing meaning anything (the smoke
test: the same ops, both modes equal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (config_environment, copy_rate_tbps, grouped_bar_plot, run_environment,  # noqa: E402
                          time_replays, versions_line, write_results)


def make_layers(model: str, layers: int, fp8: bool, device: str, dtype: torch.dtype) -> list[dict]:
    """Random weights of `layers` decoder layers at `model`'s shapes (FP8: quantized per row)."""
    from paiton.fusion.fp8_linear import quantize_weight
    from paiton.models.qwen3 import projection_shapes

    shapes = projection_shapes(model)
    generator = torch.Generator(device=device).manual_seed(0)
    built = []
    for _ in range(layers):
        layer = {"norms": [1 + 0.1 * torch.randn(shapes["qkv"][1], generator=generator, device=device, dtype=dtype)
                           for _ in range(2)]}
        for name, (n, k) in shapes.items():
            weight = torch.randn(n, k, generator=generator, device=device, dtype=dtype) * k ** -0.5
            layer[name] = quantize_weight(weight) if fp8 else (weight, None)
        built.append(layer)
    return built


def layer_weight_bytes(layers: list[dict]) -> int:
    return sum(w.numel() * w.element_size() + (s.numel() * 4 if s is not None else 0)
               for layer in layers for name in ("qkv", "o", "gate_up", "down") for w, s in [layer[name]])


def product(x: torch.Tensor, weight_and_scales) -> torch.Tensor:
    weight, scales = weight_and_scales
    if scales is None:
        return torch.ops.paiton.packed_linear(x, [weight])
    return torch.ops.paiton.fp8_linear(x, [weight], [scales])


def gated_product(gate: torch.Tensor, up: torch.Tensor, weight_and_scales) -> torch.Tensor:
    weight, scales = weight_and_scales
    if scales is None:
        return torch.ops.paiton.silu_mul_packed_linear(gate, up, [weight])
    return torch.ops.paiton.silu_mul_fp8_linear(gate, up, [weight], [scales])


def chain(h: torch.Tensor, residual: torch.Tensor, layers: list[dict], eps: float = 1e-6) -> torch.Tensor:
    """The layers' kernels in order (module docstring); returns the last hidden state."""
    for layer in layers:
        x, residual = torch.ops.paiton.fused_add_rms_norm(h, residual, layer["norms"][0], eps)
        qkv = product(x, layer["qkv"])
        o = product(qkv[..., :layer["o"][0].shape[1]], layer["o"])
        x, residual = torch.ops.paiton.fused_add_rms_norm(o, residual, layer["norms"][1], eps)
        gate_up = product(x, layer["gate_up"])
        half = gate_up.shape[-1] // 2
        h = gated_product(gate_up[..., :half], gate_up[..., half:], layer["down"])
    return h + residual


def run_mode(pdl: bool, h, residual, layers, replays: int, cuda: bool) -> tuple[torch.Tensor, float | None]:
    """(the chain's output, median ms a replay), launched as the paiton (or, `pdl`, paiton-pdl)
    configuration launches (bench_common.config_environment)."""
    with config_environment("paiton-pdl" if pdl else "paiton"):
        if not cuda:
            return chain(h, residual, layers), None
        chain(h, residual, layers)  # each kernel compiled for this mode before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(h, residual, layers)
        return out, statistics.median(time_replays(graph, replays))


def main(argv=None):
    import paiton.fusion.fp8_linear  # noqa: F401  (registers the ops)
    import paiton.fusion.packed_linear  # noqa: F401
    import paiton.fusion.rms_norm  # noqa: F401
    from paiton.fusion import gemv
    from paiton.fusion.gemv import chosen_launches
    from paiton.fusion.pdl import pdl_launch
    from paiton.models.qwen3 import QWEN3_PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b", help=f"preset: {', '.join(QWEN3_PRESETS)}")
    parser.add_argument("--layers", type=int, default=16, help="layers in the chain (weights of their own each)")
    parser.add_argument("--fp8", action="store_true", help="FP8 (e4m3fn) weights, one scale a row")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.model not in QWEN3_PRESETS:
        parser.error(f"unknown preset {args.model!r}; presets: {', '.join(QWEN3_PRESETS)}")
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = make_layers(args.model, args.layers, args.fp8, args.device, dtype)
    hidden = layers[0]["qkv"][0].shape[1]
    generator = torch.Generator(device=args.device).manual_seed(1)
    h = torch.randn(1, 1, hidden, generator=generator, device=args.device, dtype=dtype)
    residual = torch.randn(1, 1, hidden, generator=generator, device=args.device, dtype=dtype)
    plain, plain_ms = run_mode(False, h, residual, layers, args.replays, cuda)
    with_pdl, pdl_ms = run_mode(True, h, residual, layers, args.replays, cuda)
    with config_environment("paiton-pdl"):
        pdl_used = bool(pdl_launch(h, gemv._gemv_kernel))  # what the PDL mode's launches got
    equal = torch.equal(plain, with_pdl)
    env = dict(run_environment(args.device), model=args.model, layers=args.layers, dtype=str(dtype),
               weights="e4m3fn (row scales)" if args.fp8 else str(dtype).removeprefix("torch."))
    rate = copy_rate_tbps(args.device)
    floor_us = layer_weight_bytes(layers) / (rate * 1e12) * 1e6 / args.layers if rate else None
    row = dict(plain_us_per_layer=plain_ms * 1e3 / args.layers if plain_ms else None,
               pdl_us_per_layer=pdl_ms * 1e3 / args.layers if pdl_ms else None,
               floor_us_per_layer=floor_us, copy_TBps=rate, pdl_launched=pdl_used, outputs_equal=equal)
    table = markdown(env, row)
    stem = write_results(args.out, f"pdl_chain-{args.model}{'-fp8' if args.fp8 else ''}-{env['card'].replace(' ', '_')}-"
                         f"{env['date'][:10]}", dict(env=env, result=row, one_row_choices=chosen_launches()), table)
    if plain_ms and pdl_ms:
        grouped_bar_plot(stem + ".png", f"{args.model} {env['weights']}: one layer's products and norms, {env['card']}",
                         {"us a layer": {"without PDL": row["plain_us_per_layer"], "with PDL": row["pdl_us_per_layer"],
                                         **({"weight floor": floor_us} if floor_us else {})}}, "microseconds")
    if not equal:
        print("the chain's outputs differ with PDL", file=sys.stderr)
        return 1
    return 0


def markdown(env: dict, row: dict) -> str:
    lines = [f"# A decode layer's products and norms, without and with PDL: {env['model']} ({env['weights']}) on {env['card']}",
             "", versions_line(env) + f"; {env['layers']} layers in one CUDA graph, median of the replays.", ""]
    if row["plain_us_per_layer"] is None:
        lines.append("Not timed (no GPU): the chain ran eagerly in both modes.")
    else:
        floor = row["floor_us_per_layer"]
        lines += ["| mode | us a layer | x the weights' floor |", "|---|---|---|"]
        for mode, key in (("without PDL", "plain_us_per_layer"), ("with PDL", "pdl_us_per_layer")):
            ratio = f"{row[key] / floor:.2f}x" if floor else "-"
            lines.append(f"| {mode} | {row[key]:.1f} | {ratio} |")
        if floor:
            lines.append(f"| floor ({row['copy_TBps']:.2f} TB/s copy rate) | {floor:.1f} | 1.00x |")
    lines += ["", f"Launched with PDL: {row['pdl_launched']}. Outputs equal bit for bit: {row['outputs_equal']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

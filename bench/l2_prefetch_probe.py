"""Does a weight prefetched into L2 during a small kernel make the next one-row product faster?
The mechanism fusion/l2_prefetch.py offers, timed alone before any pass uses it (sm_90 only).

    python bench/l2_prefetch_probe.py                 # Qwen3-32B's o_proj, q/k/v, gate/up, FP8
    python bench/l2_prefetch_probe.py --weight bf16

Each layer of a CUDA graph is a window kernel (one program spinning for about WINDOW
microseconds: the stand-in for a decode layer's norm or attention kernels, during which memory
is idle) then the one-row product of that layer's own weight (layers x weights larger than L2
together, so only the prefetch can put a weight there). The window kernel first asks L2 for
the product's first PREFETCH megabytes (programs of its own issue cp.async.bulk.prefetch.L2
and end); then it spins. Reported: microseconds a layer, per window and prefetch size, and what
the prefetch saved against the same window without one. If L2 keeps what was asked for, a
window of w microseconds saves up to min(w, prefetch / copy rate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import copy_rate_tbps, run_environment, time_replays, versions_line, write_results  # noqa: E402

from paiton.fusion.l2_prefetch import prefetch_programs, prefetch_span_to_l2  # noqa: E402

@triton.jit
def _window_kernel(w_ptr, nbytes, spin_cycles, CHUNKS: tl.constexpr, CHUNK_BYTES: tl.constexpr):
    """Programs 1..: prefetch their share of w's first nbytes; program 0 spins spin_cycles."""
    program = tl.program_id(0)
    if program > 0:
        prefetch_span_to_l2(w_ptr, nbytes, program - 1, CHUNKS, CHUNK_BYTES)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .u64 t0, t1; .reg .pred p; mov.u64 t0, %clock64; spin_loop: mov.u64 t1, %clock64; "
            "sub.u64 t1, t1, t0; setp.lt.u64 p, t1, $1; @p bra spin_loop; mov.u32 $0, 0; }",
            "=r,l", [tl.full((1,), spin_cycles, tl.int64)], dtype=tl.int32, is_pure=False, pack=1)


def window(weight: torch.Tensor, prefetch_bytes: int, spin_cycles: int, chunk_bytes: int, chunks: int) -> None:
    """The window kernel: one spinning program, and programs of `chunks` prefetches each (at most
    32: one a thread of its warp) covering prefetch_bytes."""
    programs = prefetch_programs(prefetch_bytes, chunks, chunk_bytes) if prefetch_bytes else 0
    _window_kernel[(1 + programs,)](weight, prefetch_bytes, spin_cycles, CHUNKS=chunks, CHUNK_BYTES=chunk_bytes,
                                    num_warps=1)


SHAPES = {"o_proj": (5120, 8192), "qkv": (10240, 5120), "gate_up": (51200, 5120), "down": (5120, 25600)}


def main(argv=None):
    import paiton.fusion.fp8_linear  # noqa: F401  (registers the ops)
    import paiton.fusion.packed_linear  # noqa: F401
    from paiton.fusion.fp8_linear import quantize_weight

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="o_proj,qkv,gate_up", help=f"of {', '.join(SHAPES)} (Qwen3-32B's)")
    parser.add_argument("--weight", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--windows-us", default="0,2,8", help="window kernels' spin, microseconds (0: none)")
    parser.add_argument("--prefetch-mb", default="0,4,8,16,24,32")
    parser.add_argument("--chunk-kb", default="64", help="each bulk prefetch's span, KB (comma-separated: each timed)")
    parser.add_argument("--chunks", default="1,32",
                        help="bulk prefetches a program issues (one SM issues them at about a line a clock: "
                             "fewer a program is more programs, more SMs; comma-separated, each timed)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("needs a CUDA GPU of compute capability 9.0 or later (bulk L2 prefetch)", file=sys.stderr)
        return 2
    try:  # the SM clock the spin counts in (NVML); an H100/H200 SXM's boost clock without it
        clock_hz = torch.cuda.clock_rate() * 1e6
    except Exception:  # noqa: BLE001 (no pynvml, or NVML unreadable: only the window's length is approximate)
        clock_hz = 1.98e9
    env = dict(run_environment("cuda"), dtype=f"{args.weight} weights, bf16 activations", weight=args.weight,
               layers=args.layers, clock_hz=clock_hz)
    rate = copy_rate_tbps("cuda")
    x = torch.randn(1, 1, 25600, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name in args.weights.split(","):
        n, k = SHAPES[name]
        layers = []
        for _ in range(args.layers):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
            layers.append(quantize_weight(w) if args.weight == "fp8" else (w, None))

        def product(weight_and_scales, xs=x[..., :k]):
            w, s = weight_and_scales
            return torch.ops.paiton.fp8_linear(xs, [w], [s]) if s is not None else torch.ops.paiton.packed_linear(xs, [w])

        product(layers[0])  # the launch is chosen (timed) here, outside the capture
        nbytes = layers[0][0].numel() * layers[0][0].element_size()
        cases = [(w, mb, kb, chunks) for w in (float(v) for v in args.windows_us.split(","))
                 for kb in (int(v) for v in args.chunk_kb.split(","))
                 for chunks in (int(v) for v in args.chunks.split(","))
                 for mb in (float(v) for v in args.prefetch_mb.split(","))]
        baselines = {}
        for window_us, mb, chunk_kb, chunks in cases:
            if (window_us == 0 and mb > 0) or (mb == 0 and window_us in baselines):
                continue
            prefetch = min(int(mb * 2**20) // 16 * 16, nbytes // 16 * 16)
            spin = int(window_us * 1e-6 * clock_hz)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for layer in layers:
                    if window_us > 0:
                        window(layer[0], prefetch, spin, chunk_kb * 1024, chunks)
                    product(layer)
            us = statistics.median(t * 1e3 / args.layers for t in time_replays(graph, args.replays))
            baselines.setdefault(window_us, us)  # mb == 0 comes first
            rows.append(dict(weight=name, mb=nbytes / 2**20, window_us=window_us, prefetch_mb=prefetch / 2**20,
                             chunk_kb=chunk_kb if prefetch else None,
                             chunks=chunks if prefetch else None, us_per_layer=us, saved_us=baselines[window_us] - us,
                             floor_us=nbytes / (rate * 1e12) * 1e6 if rate else None))
            print(rows[-1], flush=True)
    table = ["# Weight prefetch into L2 during a window kernel, then a one-row product: " + env["card"], "",
             versions_line(env) + f"; {args.layers} layers in one CUDA graph, median of the replays; "
             f"copy rate {rate:.2f} TB/s.", "",
             "| weight | MB | window us | prefetch MB | chunk KB | chunks a program | us a layer | saved us | product floor us |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        saved = f"{r['saved_us']:.1f}" if r["prefetch_mb"] else "-"
        table.append(f"| {r['weight']} | {r['mb']:.0f} | {r['window_us']:g} | {r['prefetch_mb']:.0f} | {r['chunk_kb'] or '-'} | "
                     f"{r['chunks'] or '-'} | {r['us_per_layer']:.1f} | "
                     f"{saved} | {r['floor_us']:.1f} |")
    write_results(args.out, f"l2_prefetch_probe-{args.weight}-{env['card'].replace(' ', '_')}-{env['date'][:10]}",
                  dict(env=env, rows=rows), "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

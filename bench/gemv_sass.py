"""What the one-row GEMV's launches (and the few-rows GEMM's) compile to on sm_90, without a GPU:
per launch, registers a thread, shared memory, and the instructions of the K loop by opcode (the
SASS of the cubin that Triton builds ahead of time, read with the nvdisasm inside the triton
wheel), per W element a thread streams.

    python bench/gemv_sass.py                      # the FP8 candidates (bf16 x, e4m3fn W, row scales)
    python bench/gemv_sass.py --weight bf16 --gated
    python bench/gemv_sass.py --few-rows 32        # the few-rows GEMM's FP8 candidates at 32 rows

Why: a one-row product streams its weight once, so the loop must keep enough loads in flight
(registers decide how many programs share a multiprocessor) and spend few instructions per
element (an H200 streams about 16 bytes per multiprocessor per clock: 16 FP8 elements, against
128 thread-instructions issued). The FP8 launches at 18612d0 ran at 1.4-4.6x their floor; this
is how their 126 registers and the 8 barriers per iteration (x moved into W's layout through
shared memory) were found, and how the X_PER_ROW + CHUNK form was checked before timing it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
LABEL = re.compile(r"(\.L_x_\d+):")
BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcode counts of the longest backward-branching block (the kernel's K loop)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line.strip()))}
    body: list[str] = []
    for i, line in enumerate(lines):
        m = BRANCH.search(line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > len(body):
            body = lines[labels[m.group(1)]:i + 1]
    return collections.Counter(m.group(1) for line in body if (m := OPCODE.match(line)))


def disassemble(cubin: bytes) -> str:
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def main(argv=None):
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's notice; 1 is its default
    from paiton.backends import aot
    from paiton.backends.target import target_named
    from paiton.fusion.few_rows_gemm import FEW_ROWS_CANDIDATES, FP8_FEW_ROWS_CANDIDATES, block_m
    from paiton.fusion.gemv import FP8_GEMV_CANDIDATES, GEMV_CANDIDATES, NO_SCALES, ROW_SCALES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", default="fp8", choices=["fp8", "bf16"], help="W's dtype (x is bf16)")
    parser.add_argument("--gated", action="store_true", help="SwiGLU applied to x as it loads (down_proj)")
    parser.add_argument("--few-rows", type=int, metavar="ROWS",
                        help="the few-rows GEMM's candidates at ROWS rows (2-64) instead of the GEMV's")
    parser.add_argument("--top", type=int, default=8, help="opcodes listed per launch")
    args = parser.parse_args(argv)
    fp8 = args.weight == "fp8"
    target = target_named("sm_90")
    what = f"the few-rows GEMM at {args.few_rows} rows" if args.few_rows else "the GEMV"
    print(f"sm_90, {what}, x bf16, W {'e4m3fn (row scales)' if fp8 else 'bf16'}{', gated' if args.gated else ''}: "
          "per launch, registers, shared bytes, K-loop instructions a thread per W element it streams, and the "
          "loop's opcodes")
    if args.few_rows:
        configs = [{"BLOCK_M": block_m(args.few_rows), **c} for c in (FP8_FEW_ROWS_CANDIDATES if fp8 else FEW_ROWS_CANDIDATES)]
    else:
        configs = FP8_GEMV_CANDIDATES if fp8 else GEMV_CANDIDATES
    weight_type, scales = ("fp8e4nv", ROW_SCALES) if fp8 else (None, NO_SCALES)
    for config in configs:
        if args.few_rows:
            build = aot.few_rows_gemm_build(config, "bf16", weight_type or "bf16", scales)
        else:
            build = aot.gemv_build(config, "bf16", args.gated, weight_type, scales)
        compiled = build.compile(target)
        usage = aot.resources(compiled, target)
        ops = loop_opcodes(disassemble(compiled.asm["cubin"]))
        elements = config["BLOCK_N"] * config["BLOCK_K"] / (32 * config["num_warps"])  # W elements a thread per iteration
        top = ", ".join(f"{op} {count}" for op, count in ops.most_common(args.top))
        print(f"{config}: {usage['registers']} registers, {usage['shared_bytes']} B shared, "
              f"{sum(ops.values()) / elements:.2f} instructions/element; {top}")


if __name__ == "__main__":
    main()

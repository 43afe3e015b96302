"""Tensor parallelism on one host (issue 22): the bundled decode loop at TP N, batch 1 and 32,
TTFT, TPOT and tokens/s, and greedy parity with TP 1.

    python bench/tensor_parallel.py --model qwen3-32b --batch-sizes 1,32                            # TP 1 first
    torchrun --nproc-per-node 4 bench/tensor_parallel.py --model qwen3-32b --batch-sizes 1,32       # then TP 4
    torchrun --nproc-per-node 2 bench/tensor_parallel.py --model tiny --device cpu --inner eager \\
        --batch-sizes 1,2 --prompt-len 8 --new-tokens 6                                            # CPU smoke run

Every rank builds the same random weights (seed 0, bf16 on a GPU), keeps its shard
(models/tensor_parallel.py) and compiles the same DecodeLoop (Paiton, CUDA graphs; `--config`
takes bench_common's configurations); rank 0 runs `generate` and broadcasts each step to the
others (models/tp_runtime.py). Per batch size: a first generate (it compiles; its wall time
minus the measured run's is the compile time), a short one (CUDA graph trees record a shape at
its second call) and the measured one, on the same prompts (random ids, `--prompt-len` each).
TPOT is the mean over sequences of (E2E - TTFT) / (tokens - 1); output tok/s counts generated
tokens, total tok/s prompt + generated tokens, over the measured run's wall time.

Parity: TP 1 writes its tokens and TPOT to `--reference` (default under --out, per model and
settings); a TP N run reads them and reports, per batch, how many sequences equal TP 1's all
the way and where the others first differ, and TPOT as a fraction of TP 1's (the issue's
target: TP 4 batch 1 at most 0.3x). In bf16 the all-reduce sums the partial products in
another order than one GPU's GEMM, so with random weights (many near-ties) a sequence may
leave TP 1's after some tokens; in fp32 (the CPU smoke run) they are equal.

NVLink multicast (NVLS) is never used: NCCL_NVLS_ENABLE=0 is set before NCCL starts. Writes
tensor_parallel-<model>-tp<N>-<card>-<date>.json and .md (rank 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before torch.distributed starts NCCL: multicast can take a shared host's GPUs down

import torch  # noqa: E402
from bench_common import (floor_fields, floor_lines, first_divergence, make_loop, parse_configs,  # noqa: E402
                          run_environment, versions_line, write_results)


def main(argv=None):
    from paiton.models.qwen3 import build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-32b")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--config", default="paiton", help="one of bench_common.CONFIGS (compiled)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (each rank: cuda:LOCAL_RANK) or cpu")
    parser.add_argument("--inner", default="inductor", choices=["inductor", "eager"], help="paiton's inner compiler")
    parser.add_argument("--tp-timeout", type=float, default=600.0, help="seconds a collective waits for a rank")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--reference", help="TP 1's tokens: written at TP 1, compared against at TP N "
                                            "(default: <out>/tensor_parallel-<model>-tp1-tokens.json)")
    args = parser.parse_args(argv)
    (config,) = parse_configs(parser, args.config)
    if config == "eager":
        parser.error("--config takes a compiled configuration")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    reference_path = args.reference or os.path.join(args.out, f"tensor_parallel-{args.model}-tp1-tokens.json")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, rank, channel = args.device, 0, None
    if world > 1:
        from paiton.models.tensor_parallel import init_tensor_parallel
        from paiton.models.tp_runtime import StepChannel

        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        rank, _ = init_tensor_parallel("nccl" if device.startswith("cuda") else "gloo", timeout_s=args.tp_timeout)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_qwen3(args.model, device=device, dtype=dtype, seed=0)
    if world > 1:
        from paiton.models.tensor_parallel import shard_qwen3

        shard_qwen3(model)
        channel = StepChannel(device, timeout_s=args.tp_timeout)
    max_length = args.prompt_len + args.new_tokens + 16
    loop = make_loop(model, config, max(batches), max_length, device, args.inner)
    if rank != 0:
        channel.follow(loop)  # rank 0's steps until it stops; raises if rank 0 fails
        return

    env = dict(run_environment(device), dtype=str(dtype), model=args.model, config=config, tp=world,
               prompt_len=args.prompt_len, new_tokens=args.new_tokens, **floor_fields(model, device))
    settings = dict(model=args.model, dtype=str(dtype), prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    reference = None
    if world > 1 and os.path.isfile(reference_path):
        with open(reference_path) as f:
            reference = json.load(f)
        if reference["settings"] != settings:
            print(f"{reference_path} holds a TP 1 run of other settings ({reference['settings']}); no parity", flush=True)
            reference = None
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (max(batches), args.prompt_len), generator=generator).tolist()
    rows = []
    with channel.leading(loop) if channel is not None else contextlib.nullcontext():
        for batch in batches:
            rows.append(measure(loop, prompts[:batch], args, device, reference))
            print({k: v for k, v in rows[-1].items() if k not in ("tokens", "first_divergence")}, flush=True)
            write_table(args, env, rows)
    if device.startswith("cuda"):
        env["peak_memory_GB_rank0"] = torch.cuda.max_memory_allocated(device) / 1e9
    write_table(args, env, rows)
    if world == 1:
        os.makedirs(os.path.dirname(os.path.abspath(reference_path)), exist_ok=True)
        with open(reference_path, "w") as f:
            json.dump(dict(settings=settings, batches={str(r["batch"]): dict(tokens=r["tokens"], tpot_ms=r["tpot_ms"])
                                                      for r in rows}), f)
        print(f"TP 1 tokens written to {reference_path}", flush=True)


def measure(loop, prompts, args, device, reference) -> dict:
    batch = len(prompts)
    start = time.perf_counter()
    loop.generate(prompts, args.new_tokens)
    first_run = time.perf_counter() - start
    loop.generate(prompts, 2)  # CUDA graph trees record at a shape's second call
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = loop.generate(prompts, args.new_tokens)
    run = time.perf_counter() - start
    generated = sum(map(len, result.tokens))
    row = dict(batch=batch, ttft_ms=1e3 * statistics.mean(result.ttft_s), tpot_ms=1e3 * statistics.mean(result.tpot_s),
               output_tokens_per_s=generated / run, total_tokens_per_s=(generated + batch * args.prompt_len) / run,
               compile_s=max(first_run - run, 0.0), tokens=result.tokens)
    if reference is not None and str(batch) in reference["batches"]:
        expected = reference["batches"][str(batch)]
        divergence = [first_divergence(a, b) for a, b in zip(result.tokens, expected["tokens"])]
        row.update(sequences_equal_to_tp1=sum(d is None for d in divergence), first_divergence=divergence,
                   tpot_vs_tp1=row["tpot_ms"] / expected["tpot_ms"])
    return row


def write_table(args, env, rows):
    card, date = env["card"], env["date"]
    lines = [f"# Tensor parallel decode: {env['model']} at TP {env['tp']} ({card})", "",
             f"{versions_line(env)}, {env['config']}, prompt {env['prompt_len']}, {env['new_tokens']} new tokens, greedy, "
             "random weights; bundled decode loop, rank 0 scheduling.", ""]
    lines += floor_lines(env)
    lines += ["| TP | batch | TTFT ms | TPOT ms | TPOT / TP 1 | output tok/s | total tok/s | compile s | sequences = TP 1 "
              "| first divergence (median of those that differ) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tpot_vs_tp1']:.3f}" if "tpot_vs_tp1" in r else "-"
        equal = f"{r['sequences_equal_to_tp1']}/{r['batch']}" if "sequences_equal_to_tp1" in r else "-"
        differs = [d for d in r.get("first_divergence", []) if d is not None]
        where = f"{statistics.median(differs):.0f}" if differs else "-"
        lines.append(f"| {env['tp']} | {r['batch']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | {ratio} | "
                     f"{r['output_tokens_per_s']:.0f} | {r['total_tokens_per_s']:.0f} | {r['compile_s']:.1f} | {equal} | {where} |")
    if "peak_memory_GB_rank0" in env:
        lines += ["", f"Peak memory on rank 0: {env['peak_memory_GB_rank0']:.1f} GB."]
    table = "\n".join(lines) + "\n"
    stem = f"tensor_parallel-{env['model']}-tp{env['tp']}-{card.replace(' ', '_')}-{date[:10]}"
    write_results(args.out, stem, dict(env=env, rows=rows), table, echo=False)


if __name__ == "__main__":
    main()

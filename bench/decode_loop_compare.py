"""The bundled decode loop with eager, stock Inductor and Paiton side by side: TTFT, TPOT and
compile time per model and batch size, in one process, on the same prompts.

    python bench/decode_loop_compare.py --models qwen3-8b,qwen3-32b --batches 1,32     # on a GPU
    python bench/decode_loop_compare.py --models tiny --batches 1,2 --device cpu --inner eager   # smoke

Per model (random weights, bf16 on GPU) and configuration (bench_common.CONFIGS; compiled
ones use CUDA graphs on a GPU): one DecodeLoop, then per batch size a first `generate`
(compiles the prefill and decode graphs: its wall time minus a measured run's is reported as
compile time), a short one (CUDA graph trees record a graph on its second call at a shape,
so this records the prefill) and a measured `generate` of the same prompts. Configurations
run in the order given, each after torch._dynamo.reset(). The files are rewritten after
every row, so a run cut short by a time limit keeps what it measured. Greedy; every compiled
run's tokens are compared with eager's (first position where a sequence differs). Writes
decode_loop-<card>-<date>.json, .md and .png (TPOT per configuration).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_common import CONFIGS, first_divergence, grouped_bar_plot, make_loop, parse_configs, run_environment, write_results


def main(argv=None):
    from paiton.models.qwen3 import build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3-8b")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--configs", default="eager,inductor,paiton", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inner", default="inductor", choices=["inductor", "eager"], help="paiton's inner compiler")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    configs = parse_configs(parser, args.configs)
    env = dict(run_environment(args.device), prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    rows = []
    for model_name in args.models.split(","):
        model = build_qwen3(model_name, device=args.device, dtype=dtype)
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (max(batches), args.prompt_len), generator=generator).tolist()
        eager_tokens = {}
        for backend in configs:
            torch._dynamo.reset()
            loop = make_loop(model, backend, max(batches), args.prompt_len + args.new_tokens + 16, args.device, args.inner)
            for batch in batches:
                requests = prompts[:batch]
                start = time.perf_counter()
                loop.generate(requests, args.new_tokens)
                first_run = time.perf_counter() - start
                # CUDA graph trees record a graph on its second call at a shape: a short second
                # generation records the prefill, so the measured one only replays.
                loop.generate(requests, 2)
                start = time.perf_counter()
                result = loop.generate(requests, args.new_tokens)
                run = time.perf_counter() - start
                if backend == "eager":
                    eager_tokens[batch] = result.tokens
                divergence = [first_divergence(a, b) for a, b in zip(result.tokens, eager_tokens.get(batch, result.tokens))]
                row = dict(model=model_name, backend=backend, batch=batch, ttft_ms=1e3 * statistics.mean(result.ttft_s),
                           tpot_ms=1e3 * statistics.mean(result.tpot_s), compile_s=max(first_run - run, 0.0),
                           tokens_per_s=sum(map(len, result.tokens)) / run,
                           sequences_equal_to_eager=sum(d is None for d in divergence), first_divergence=divergence)
                rows.append(row)
                print({k: v for k, v in row.items() if k != "first_divergence"}, flush=True)
                write_table(args, env, dtype, rows)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def write_table(args, env, dtype, rows):
    card, date = env["card"], env["date"]
    env = dict(env, dtype=str(dtype))
    lines = [f"# Bundled decode loop: eager vs stock Inductor vs Paiton ({card})", "",
             f"{date}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, {dtype}, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens, greedy, random weights.", "",
             "| model | config | batch | TTFT ms | TPOT ms | output tok/s | compile s | sequences = eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['compile_s']:.1f} | {r['sequences_equal_to_eager']}/{r['batch']} |")
    table = "\n".join(lines) + "\n"
    stem = write_results(args.out, f"decode_loop-{card.replace(' ', '_')}-{date[:10]}", dict(env=env, rows=rows), table)
    plot(env, rows, stem + ".png")


def plot(env, rows, path):
    groups = {}
    for r in rows:
        groups.setdefault(f"{r['model']} batch {r['batch']}", {})[r["backend"]] = r["tpot_ms"]
    grouped_bar_plot(path, f"Decode loop TPOT on {env['card']} ({env['date'][:10]}, {env['commit']}); lower is better",
                     groups, "TPOT ms")


if __name__ == "__main__":
    main()

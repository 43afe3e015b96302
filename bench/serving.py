"""Serving benchmark in the style of vLLM's benchmark_serving.py (issue 5): for each batch size,
eager, stock Inductor, the strongest stock Inductor setting and Paiton on the same model
instance and the same requests, in one process; throughput and latency with vLLM's
definitions, parity with eager, cost and memory-bandwidth views.

    python bench/serving.py --model qwen3-8b --num-prompts 256 --batch-sizes 1,2,4,8,16,32,64,128
    python bench/serving.py --model qwen3-8b --output-len 256            # fixed output length
    python bench/serving.py --checkpoint DIR --dataset sharegpt.json       # real prompts
    python bench/serving.py --model tiny --num-prompts 4 --batch-sizes 1,2 --configs eager,paiton \\
        --paiton-inner eager --device cpu --max-prompt-len 12 --output-len 6   # CPU smoke run

Scheduling: batch size B means at most B requests in flight (vLLM's --max-concurrency B with
every request sent at once): the bundled decode loop takes the requests in order, B at a
time, and a request starts when its batch starts. Each sequence keeps its own output length
(greedy, stop tokens ignored, as vLLM's --ignore-eos); a batch runs until its longest
sequence is done, its finished sequences leaving it as the loop allows (half the rows done:
the live ones move to a smaller batch). Unlike vLLM, a new request does not take a finished
one's place before its whole batch is done. Per batch size the configurations run in a rotated order (none always
first). Before measuring, each configuration compiles every shape the run needs (its batch
size, each prompt bucket) and records its CUDA graphs: that time is reported as compile time
and left out of the run.

Compile time: on an H100, each pair of Qwen3-8B graphs (prefill and decode; batch 1, then
batch 2 and up) took 2.5-4 minutes to compile, so a run of four configurations spends about
25 minutes compiling. Where one command
may not run that long, `--save-compile-cache FILE` keeps the compiled artifacts (Inductor's
and AOTAutograd's caches, as `torch.compiler.save_cache_artifacts`, xz-compressed) and a later run's
`--load-compile-cache FILE` starts from them: warm up in one command, measure in the next.
The compile times reported are then those of a warm cache.

Parity: each configuration's tokens against eager's (the first position where a sequence
differs, and how many sequences match all the way). Outputs: serving-<model>-<card>-<date>
.json (every number and the environment), .md (the table, with Paiton's ratio to each
baseline) and .png (total tokens/s and TPOT against batch size).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm
from bench_common import (CONFIGS, compile_breakdown, compile_breakdown_markdown, compile_clock, copy_rate_tbps,
                          first_divergence, make_loop, one_row_choices_markdown, parse_configs, run_environment,
                          versions_line, write_results)
from serving_metrics import RequestTiming, bandwidth_fraction, cost_per_million_tokens, decode_step_bytes, summarize
from serving_workload import sharegpt_requests, synthetic_requests


def run_requests(loop, requests, batch):
    """(per-request timings, tokens, wall seconds, the first batch's logits of its prefill and
    first decode step, or None): requests B at a time."""
    timings, tokens, first_logits, start = [], [], None, time.perf_counter()
    for first in range(0, len(requests), batch):
        chunk = requests[first:first + batch]
        # The logits cost a copy to the host; only the first batch's first two steps are kept.
        result = loop.generate([r.prompt for r in chunk], [r.output_len for r in chunk], keep_logits=2 if first == 0 else 0)
        if first == 0 and len(result.logits) == 2:
            first_logits = result.logits
        for request, seq_tokens, times in zip(chunk, result.tokens, result.token_times):
            tokens.append(seq_tokens[:request.output_len])
            timings.append(RequestTiming(len(request.prompt), times[:request.output_len]))
    return timings, tokens, time.perf_counter() - start, first_logits


def warm_up(loop, requests, batch):
    """Compile, and record the CUDA graphs of, every shape the measured run uses: this batch
    size with each chunk's prompt bucket, and the smaller batches the loop moves to as
    sequences finish (powers of two). CUDA graph trees run a graph's first call at a shape
    uncaptured (warm-up) and record it on the second, so every shape is called at least three
    times here: two generations whose sequences stop in stages, three steps at each batch size."""
    from paiton.models.decode_loop import prompt_bucket

    start = time.perf_counter()
    chunks = [requests[first:first + batch] for first in range(0, len(requests), batch)]
    # Rows 0-1 last longest, then each next power of two of rows stops three steps earlier.
    levels = max(1, (batch - 1).bit_length())
    limits = [3 * (levels - (max(row, 1).bit_length() - 1)) for row in range(batch)]
    for bucket in sorted({prompt_bucket(max(len(r.prompt) for r in chunk), loop.max_length) for chunk in chunks}):
        for _ in range(2):
            loop.generate([[1] * bucket] * batch, limits)
    return time.perf_counter() - start


def main(argv=None):
    from paiton.fusion.gemv import chosen_launches
    from paiton.models.decode_loop import prompt_bucket
    from paiton.models.qwen3 import QWEN3_PRESETS, build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b", help=f"preset: {', '.join(QWEN3_PRESETS)}")
    parser.add_argument("--checkpoint", help="a local Qwen3 directory instead of a preset")
    parser.add_argument("--dataset", help="ShareGPT JSON (needs --checkpoint with a tokenizer); default: synthetic")
    parser.add_argument("--num-prompts", type=int, default=256, help="requests in the workload; each batch size runs all")
    parser.add_argument("--rounds", type=int, help="instead: batch size B runs the first rounds x B requests (B at a time)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--output-len", type=int, help="fixed output length (the second scenario)")
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="clip synthetic prompts (smoke runs)")
    parser.add_argument("--configs", default="eager,inductor,inductor-cdt,paiton", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--paiton-inner", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--gpu-hourly-cost", type=float, default=0.0, help="dollars an hour, for the cost view")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-compile-cache", action="append", default=[], metavar="FILE",
                        help="compile artifacts a run saved (repeatable): their graphs compile from cache")
    parser.add_argument("--save-compile-cache", metavar="FILE",
                        help="save this run's compile artifacts (Inductor and AOTAutograd caches) to FILE")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    batches = [int(b) for b in args.batch_sizes.split(",")]
    configs = parse_configs(parser, args.configs)
    if max(batches) > args.num_prompts or min(batches) < 1:
        parser.error(f"batch sizes must be in 1..--num-prompts ({args.num_prompts}); got {batches}")
    if args.rounds is not None and not 1 <= args.rounds * max(batches) <= args.num_prompts:
        parser.error(f"--rounds {args.rounds} x batch {max(batches)} needs 1..--num-prompts ({args.num_prompts}) requests")
    if not args.checkpoint and args.model not in QWEN3_PRESETS:
        parser.error(f"unknown preset {args.model!r}; presets: {', '.join(QWEN3_PRESETS)}")
    if args.dataset and not args.checkpoint:
        parser.error("--dataset needs --checkpoint (its tokenizer turns the conversations into tokens)")
    if missing := [path for path in args.load_compile_cache if not os.path.isfile(path)]:
        parser.error(f"--load-compile-cache: no such file {', '.join(missing)}")
    for path in args.load_compile_cache:
        load_compile_cache(path)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tokenizer = None
    if args.checkpoint:
        from paiton.models.checkpoint import load_qwen3_checkpoint

        model, tokenizer = load_qwen3_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
    else:
        model = build_qwen3(args.model, device=args.device, dtype=dtype, seed=args.seed)
    if args.dataset:
        if tokenizer is None:
            parser.error("the checkpoint has no tokenizer; --dataset needs one")
        requests = sharegpt_requests(args.dataset, lambda text: tokenizer(text).input_ids, args.num_prompts,
                                     args.seed, args.output_len)
    else:
        requests = synthetic_requests(args.num_prompts, model.config.vocab_size, args.seed, args.output_len,
                                      args.max_prompt_len)
    max_length = max(prompt_bucket(len(r.prompt), 1 << 30) for r in requests) + max(r.output_len for r in requests) + 1

    copy_rate = copy_rate_tbps(args.device)  # None off the GPU
    copy_rate = copy_rate * 1e12 if copy_rate else None
    loops = {c: make_loop(model, c, max(batches), max_length, args.device, args.paiton_inner) for c in configs}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(configs) * len(batches))
    env = environment(args, dtype, copy_rate)
    card = env["card"]
    rows, saved_artifacts = [], []
    progress = tqdm(total=len(batches) * len(configs), desc="serving benchmark", unit="run", file=sys.stderr)
    for index, batch in enumerate(batches):
        order = configs[index % len(configs):] + configs[:index % len(configs)]
        batch_requests = requests[:args.rounds * batch] if args.rounds else requests
        tokens_of, logits_of, batch_rows = {}, {}, []
        for config in order:
            progress.set_postfix_str(f"batch {batch}, {config}: compiling / recording")
            before = compile_clock()
            compile_s = warm_up(loops[config], batch_requests, batch)
            compile_spent = compile_breakdown(before, compile_clock(), compile_s)
            progress.set_postfix_str(f"batch {batch}, {config}: {len(batch_requests)} requests")
            timings, tokens, duration, logits_of[config] = run_requests(loops[config], batch_requests, batch)
            tokens_of[config] = tokens
            metrics = summarize(timings, duration)
            mean_context = sum(len(r.prompt) + r.output_len / 2 for r in batch_requests) / len(batch_requests)
            row = dict(config=config, batch=batch, compile_s=compile_s, compile_breakdown=compile_spent, **metrics)
            if args.gpu_hourly_cost:
                row["usd_per_million_output_tokens"] = cost_per_million_tokens(metrics["output_throughput"], args.gpu_hourly_cost)
                row["usd_per_million_total_tokens"] = cost_per_million_tokens(metrics["total_token_throughput"], args.gpu_hourly_cost)
            if copy_rate:
                step_bytes = decode_step_bytes(model.config, batch, int(mean_context), model.dtype.itemsize)
                row["decode_bandwidth_fraction"] = bandwidth_fraction(step_bytes, metrics["median_tpot_ms"] / 1e3, copy_rate)
            rows.append(row)
            batch_rows.append(row)
            progress.update()
            progress.write(f"batch {batch} {config}: {metrics['total_token_throughput']:.1f} tok/s, "
                           f"TPOT {metrics['median_tpot_ms']:.2f} ms, compile {compile_s:.1f} s")
            if "eager" in tokens_of:
                for done in batch_rows:
                    done.update(parity_with_eager(tokens_of[done["config"]], tokens_of["eager"],
                                                  logits_of[done["config"]], logits_of["eager"]))
            # Rewritten after every configuration: a run cut short (one device command may run
            # 10 minutes) keeps what it measured.
            choices = chosen_launches()
            table = markdown(env, rows, configs) + one_row_choices_markdown(choices) + compile_breakdown_markdown(rows)
            stem = write_results(args.out, f"serving-{os.path.basename(str(env['model']))}-{card.replace(' ', '_')}-{env['date'][:10]}",
                                 dict(env=env, rows=rows, one_row_choices=choices), table, echo=False)
            plot(rows, configs, env, stem + ".png")
        if args.save_compile_cache:
            save_compile_cache(args.save_compile_cache, saved_artifacts)
    progress.close()
    print(table)


def parity_with_eager(tokens, eager_tokens, logits, eager_logits):
    """A configuration's outputs against eager's on the same requests: how many sequences equal
    eager's all the way, where each first differs (None: nowhere), and the logit differences."""
    divergence = [first_divergence(a, b) for a, b in zip(tokens, eager_tokens)]
    parity = dict(sequences_equal_to_eager=sum(d is None for d in divergence), first_divergence=divergence)
    if logits is not None and eager_logits is not None:
        parity.update(logit_differences(logits, eager_logits))
    return parity


def logit_differences(mine, eager):
    """Largest |logit - eager's| of the prefill (the same prompts for both) and of the first
    decode step over the rows whose first token matched eager's: where it did not (a near tie
    drawn the other way), the step's input differs and its logits are not comparable."""
    prefill = (mine[0] - eager[0]).abs().max().item()
    same_first = mine[0].argmax(-1) == eager[0].argmax(-1)
    step = (mine[1] - eager[1])[same_first].abs().max().item() if same_first.any() else None
    return dict(prefill_max_logit_diff=prefill, first_decode_step_max_logit_diff=step,
                first_token_equal_rows=int(same_first.sum()))


# The cache file is xz-compressed (Inductor's cubins and sources shrink several times): one for
# Qwen3-8B's batch-1 graphs of three configurations was 41 MB raw, more than the device machine
# hands back per file (16 MiB).
XZ_MAGIC = b"\xfd7zXZ\x00"


def save_compile_cache(path, saved_artifacts):
    """Write every artifact this run compiled so far (xz-compressed). `save_cache_artifacts`
    returns only those recorded since its last call, so the file holds the list of its results."""
    import lzma
    import pickle

    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        saved_artifacts.append(artifacts[0])
        with lzma.open(path, "wb", preset=1) as f:
            pickle.dump(saved_artifacts, f)


def load_compile_cache(path):
    """Load a file save_compile_cache wrote (xz-compressed, or a plain pickle of earlier runs)."""
    import lzma
    import pickle

    with open(path, "rb") as f:
        compressed = f.read(len(XZ_MAGIC)) == XZ_MAGIC
    with (lzma.open if compressed else open)(path, "rb") as f:
        artifacts = pickle.load(f)
    if not isinstance(artifacts, list) or not all(isinstance(a, bytes) for a in artifacts):
        raise ValueError(f"{path}: not a file --save-compile-cache wrote")
    for blob in artifacts:
        torch.compiler.load_cache_artifacts(blob)


def environment(args, dtype, copy_rate):
    return dict(run_environment(args.device),
                model=args.checkpoint or args.model, dtype=str(dtype), num_prompts=args.num_prompts, rounds=args.rounds,
                workload=f"sharegpt {args.dataset}" if args.dataset else "synthetic", output_len=args.output_len,
                copy_rate_gbs=copy_rate / 1e9 if copy_rate else None,
                compile_caches_loaded=list(args.load_compile_cache))


def markdown(env, rows, configs):
    lines = [f"# Serving benchmark: {env['model']} on {env['card']}", "",
             f"{versions_line(env)}, {requests_line(env)}, "
             + (f"compile times from a warm cache ({', '.join(map(os.path.basename, env['compile_caches_loaded']))}), "
                if env.get("compile_caches_loaded") else "")
             + f"{env['workload']} workload, output length {env['output_len'] or 'from the workload'}.", "",
             "| batch | config | req/s | output tok/s | total tok/s | TTFT ms mean/median/p99 | TPOT ms mean/median/p99 | "
             "ITL ms median | E2E ms median | compile s | = eager | max logit diff: prefill / 1st decode step (rows, same 1st token) | Paiton total tok/s ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["batch"], r["config"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (r["batch"], configs.index(r["config"]))):
        paiton = by_key.get((r["batch"], "paiton"))
        ratio = f"{paiton['total_token_throughput'] / r['total_token_throughput']:.2f}x" if paiton and r["config"] != "paiton" else ""
        equal = f"{r['sequences_equal_to_eager']}/{r['completed']}" if "sequences_equal_to_eager" in r else ""
        logit_diff = ""
        if "prefill_max_logit_diff" in r:
            step = r["first_decode_step_max_logit_diff"]
            logit_diff = (f"{r['prefill_max_logit_diff']:.3g} / " + (f"{step:.3g}" if step is not None else "-")
                          + f" ({r['first_token_equal_rows']})")
        lines.append(
            f"| {r['batch']} | {r['config']} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
            f"{r['total_token_throughput']:.1f} | {r['mean_ttft_ms']:.1f} / {r['median_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f} | "
            f"{r['mean_tpot_ms']:.2f} / {r['median_tpot_ms']:.2f} / {r['p99_tpot_ms']:.2f} | {r['median_itl_ms']:.2f} | "
            f"{r['median_e2el_ms']:.0f} | {r['compile_s']:.1f} | {equal} | {logit_diff} | {ratio} |")
    return "\n".join(lines) + "\n"


def requests_line(env):
    if env.get("rounds"):
        return f"{env['rounds']} batches of B requests per batch size B (from a pool of {env['num_prompts']})"
    return f"{env['num_prompts']} requests per batch size"


def plot(rows, configs, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in configs:
        mine = sorted((r for r in rows if r["config"] == config), key=lambda r: r["batch"])
        batches = [r["batch"] for r in mine]
        throughput.plot(batches, [r["total_token_throughput"] for r in mine], marker="o", label=config)
        tpot.plot(batches, [r["median_tpot_ms"] for r in mine], marker="o", label=config)
    for ax, label in ((throughput, "total tokens/s"), (tpot, "median TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{env['model']}, {env['card']}, {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Where a decode step's time goes (issue 7): per-kernel device time of one Qwen3 decode step,
for stock Inductor and Paiton, at chosen batch sizes, in one process.

    python bench/profile_decode_step.py --model qwen3-8b --batches 1,64 --configs inductor-cdt,paiton
    python bench/profile_decode_step.py --model tiny --device cpu --batches 1 --configs paiton \\
        --paiton-inner eager --steps 4                                    # smoke run (CPU ops)
    python bench/profile_decode_step.py --model qwen3-32b \\
        --runs paiton-fp8@1,paiton@1,inductor-cdt@1,paiton-fp8@8,paiton@8,inductor-cdt@8

--runs lists (configuration, batch) pairs in the order they run, in place of every batch of
--batches for every configuration of --configs: on a device whose time is short, each compile
costs minutes, and a run cut off keeps the rows that came first.

Per configuration (bench_common.CONFIGS) and batch size: the model compiled as the
configuration says (CUDA graphs on a GPU), a prompt of --prompt-len random tokens prefilled
uncompiled into a StaticCache, three warm-up decode steps, --steps timed steps (a sync around
each, as ../shared/baseline times them; the median is the step time), then --profile-steps
more under torch.profiler. CUPTI reports the kernels inside a CUDA graph one by one, so the
profile shows the graph's own kernels. Per step: the time of each kernel name (summed over its
launches) and of each category (cuBLAS matmuls, Paiton's kernels, Inductor's reductions and
pointwise kernels, library attention, copies), and the gap: step time minus kernel time, which
is launch latency between kernels and host work the step waits for. On CPU the "kernels" are
the top-level ATen/Paiton ops, for a smoke run only.

Writes profile_decode_step-<model>-<card>-<date>[-<tag>].json (every kernel), .md (categories and
the top kernels per configuration) and .png (each step stacked: kernels by category, bubbles,
host time; the floor).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import time

import torch
from bench_common import (CONFIGS, compile_settings, config_environment, floor_fields, floor_key, fp8_floor_fields, fp8_lm_head, model_for, floor_lines, one_row_choices_markdown, parse_configs,
                          run_environment, versions_line, write_results)

# Kernel name -> category, first match wins.
CATEGORIES = (
    ("paiton GEMV (one-row products)", re.compile(r"^_gemv_kernel")),
    ("paiton kernels", re.compile(r"^_(rms_norm|qk_norm_rope|silu_mul|decode_attention)|^paiton::")),
    ("matmul (cuBLAS/CUTLASS)", re.compile(r"nvjet|gemm|cublas|splitKreduce|xmma|cutlass|aten::(mm|addmm|bmm|linear)", re.I)),
    ("attention (library)", re.compile(r"flash|fmha|sdpa|attention", re.I)),
    ("inductor reductions (GEMV, norms)", re.compile(r"^triton_(red|per)_")),
    ("inductor pointwise", re.compile(r"^triton_poi_")),
    ("copies and fills", re.compile(r"memcpy|memset|copy|fill|index_put|index_copy", re.I)),
)


OP_NAME = re.compile(r"^(aten|paiton)::")  # on CPU: an op not called by another op is a "kernel"


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def inductor_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["inductor"])


def synchronizing_calls(run) -> list[str]:
    """The warnings torch's CUDA sync debug mode gives for `run` (each names a call that waits
    for the GPU), with the stack that made each, innermost frames last."""
    import traceback
    import warnings

    found = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "debug mode is a prototype" in str(message):  # the mode's own notice when it is set (H100, 52e4217)
            return
        found.append(f"{message}\n" + "".join(traceback.format_stack(limit=12)[:-1]))

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()
    return found[:8]


@torch.no_grad()
def profile_config(model, config, batch, args):
    with config_environment(config):  # "-pdl", "-l2pf": the kernels launched so, as its CUDA graphs record them
        return _profile_config(model, config, batch, args)


def _profile_config(model, config, batch, args):
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    torch._dynamo.reset()
    counters_before = inductor_counters()  # CUDA graphs skipped or recorded again, per row
    device, cuda = args.device, args.device.startswith("cuda")
    model = model_for(model, config)  # an FP8 configuration's FP8 copy
    if config == "eager":
        forward = model
    else:
        backend, settings = compile_settings(config, device, args.paiton_inner)
        forward = torch.compile(model, backend=backend, fullgraph=True, **settings)
    steps_total = 3 + 2 * args.steps + args.profile_steps
    # What the run fills (+ a diagnostic step), or a server's length (--cache-len): split counts
    # follow the cache's length, so a serving step's attention is profiled at the server's.
    cache_len = max(args.cache_len or 0, args.prompt_len + steps_total + 8)
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    cache.early_initialization(batch, model.config.num_key_value_heads, model.config.head_dim, model.dtype, device)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=generator).to(device)
    # The prompt's last logits only: all of them (Qwen3-32B at batch 32 x 330 tokens: 3 GB) left a
    # second 32B configuration of one process on an 80 GB H100 out of memory (a789a0a).
    out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(args.prompt_len, device=device),
                use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    slots = torch.arange(args.prompt_len + steps_total + 1, device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(i):
        nonlocal token
        position = slots[args.prompt_len + i:args.prompt_len + i + 1]
        out = forward(input_ids=token, past_key_values=cache, cache_position=position,
                      position_ids=position[None].expand(batch, 1), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)

    compile_start = time.perf_counter()
    for i in range(3):
        step(i)
        sync()
    compile_s = time.perf_counter() - compile_start
    times = []
    for i in range(3, 3 + args.steps):
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - start)
    # The same steps with no sync between them: the host enqueues step i+1 while the GPU runs
    # step i, so host work hides behind device work. host_us is what one call costs the host
    # (dynamo guards, CUDA graph tree bookkeeping, the replay's launch); pipelined_us is the
    # device's step time with its in-graph bubbles. sync step - pipelined = host work that a
    # loop which waits for each token cannot hide.
    first = 3 + args.steps
    host_times = []
    sync()
    start = time.perf_counter()
    for i in range(first, first + args.steps):
        call = time.perf_counter()
        step(i)
        host_times.append(time.perf_counter() - call)
    sync()
    pipelined_us = (time.perf_counter() - start) / args.steps * 1e6
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if args.trace_dir:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(first + args.steps, steps_total):
            step(i)
        sync()
    if args.trace_dir:  # a timeline to read in Perfetto / chrome://tracing
        os.makedirs(args.trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.trace_dir, f"trace-{config}-batch{batch}.json.gz"))  # gzipped by torch
    per_kernel = collections.defaultdict(lambda: [0, 0.0])  # name -> [launches, microseconds]
    for event in prof.events():
        is_kernel = (event.device_type == torch.autograd.DeviceType.CUDA) if cuda else (
            OP_NAME.match(event.name) and not (event.cpu_parent and OP_NAME.match(event.cpu_parent.name)))
        if is_kernel:
            per_kernel[event.name][0] += 1
            per_kernel[event.name][1] += event.time_range.end - event.time_range.start
    n = args.profile_steps
    kernels = sorted(({"name": name, "launches_per_step": launches / n, "us_per_step": us / n, "category": category(name)}
                      for name, (launches, us) in per_kernel.items()), key=lambda k: -k["us_per_step"])
    categories = collections.defaultdict(float)
    for kernel in kernels:
        categories[kernel["category"]] += kernel["us_per_step"]
    step_us = statistics.median(times) * 1e6
    kernel_us = sum(k["us_per_step"] for k in kernels)
    host_us = statistics.median(host_times) * 1e6
    # A step whose host call lasts as long as the GPU's work does not run ahead (32B FP8 at 32
    # rows on the H100, a88eea9: host 18708 us, kernels 18707): one more step under torch's
    # sync debug mode names any synchronizing call it makes, with its stack.
    synchronizing = []
    if cuda and host_us > 0.5 * pipelined_us:
        synchronizing = synchronizing_calls(lambda: step(steps_total))
    return dict(config=config, batch=batch, step_us=step_us, kernel_us=kernel_us, gap_us=step_us - kernel_us,
                pipelined_us=pipelined_us, host_us=host_us, synchronizing_calls=synchronizing,
                cudagraph_counters={k: v - counters_before.get(k, 0) for k, v in inductor_counters().items()
                                    if "cudagraph" in k and v != counters_before.get(k, 0)},
                launches_per_step=sum(k["launches_per_step"] for k in kernels), compile_and_warmup_s=compile_s,
                categories=dict(sorted(categories.items(), key=lambda c: -c[1])), kernels=kernels)


def several_rows_choices_markdown() -> str:
    """Which product ran each linear of several rows (batch 2-64): the FP8 paths fusion/fp8_paths.py
    chose, and the few-rows GEMM's launches (bf16 against cuBLAS; FP8 among its own launches)."""
    from paiton.fusion import few_rows_gemm, fp8_paths

    lines = [f"- FP8 {line}" for line in fp8_paths.describe_choices()] + [f"- GEMM {line}" for line in few_rows_gemm.describe_choices()]
    return "\n".join(["", "Products of several rows, as chosen at first use:", "", *lines, ""]) if lines else ""


def markdown(env, rows, top):
    lines = [f"# One decode step, kernel by kernel: {env['model']} on {env['card']}", "",
             f"{versions_line(env)}, prompt {env['prompt_len']}{', cache ' + str(env['cache_len']) if env.get('cache_len') else ''}, step time = median of {env['steps']} synced steps, "
             f"kernels averaged over {env['profile_steps']} profiled steps.", "", *floor_lines(env)]
    for prefix, which in (("fp8", "FP8 weights (the -fp8 configurations)"),
                          ("fp8_head", "FP8 weights with the lm_head in FP8 too (the -fp8-head configurations)")):
        if env.get(f"{prefix}_weight_bytes"):
            floor = f" = {env[f'{prefix}_floor_us']:.0f} us per step" if env.get(f"{prefix}_floor_us") else ""
            lines += [f"{which}: {env[f'{prefix}_weight_bytes'] / 1e9:.2f} GB{floor}.", ""]
    lines += ["The decode step as a loop that runs a step ahead sees it (pipelined: its TPOT), against the",
              "floor of the weights it reads (FP8's for an -fp8 configuration); decode tok/s = batch / step.", "",
              "| config | batch | pipelined step ms | x its floor | decode tok/s | compile + 3 steps s |", "|---|---|---|---|---|---|"]
    for r in rows:
        floor_us = env.get(floor_key(r["config"]))
        ratio = f"{r['pipelined_us'] / floor_us:.2f}x" if floor_us else "-"
        lines.append(f"| {r['config']} | {r['batch']} | {r['pipelined_us'] / 1e3:.2f} | {ratio} | "
                     f"{r['batch'] / (r['pipelined_us'] / 1e6):.0f} | {r['compile_and_warmup_s']:.0f} |")
    lines += ["",
              "| config | batch | step us | pipelined us | host us | kernel us | gap us | launches | " + " | ".join(label for label, _ in CATEGORIES)
              + " | other |", "|---|---|---|---|---|---|---|---|" + "---|" * (len(CATEGORIES) + 1)]
    for r in rows:
        cats = [f"{r['categories'].get(label, 0.0):.0f}" for label, _ in CATEGORIES] + [f"{r['categories'].get('other', 0.0):.0f}"]
        lines.append(f"| {r['config']} | {r['batch']} | {r['step_us']:.0f} | {r.get('pipelined_us', 0):.0f} | "
                     f"{r.get('host_us', 0):.0f} | {r['kernel_us']:.0f} | {r['gap_us']:.0f} | "
                     f"{r['launches_per_step']:.0f} | " + " | ".join(cats) + " |")
    odd = [r for r in rows if r.get("synchronizing_calls") or r.get("cudagraph_counters")]
    if odd:  # what made a step wait for the GPU, or CUDA graphs be skipped or recorded again
        lines += ["", "Rows whose step synchronized with the host or whose CUDA graphs were skipped or recorded again:", ""]
        for r in odd:
            lines.append(f"- {r['config']} batch {r['batch']}: counters {r.get('cudagraph_counters', {})}, "
                         f"{len(r.get('synchronizing_calls', []))} synchronizing call(s) in one step")
            for call in r.get("synchronizing_calls", [])[:2]:
                lines += ["  ```", *(f"    {line}" for line in call.strip().splitlines()), "  ```"]
    for r in rows:
        lines += ["", f"## {r['config']}, batch {r['batch']}: top {top} kernels", "",
                  "| kernel | category | launches/step | us/step | share of kernel time |", "|---|---|---|---|---|"]
        for k in r["kernels"][:top]:
            lines.append(f"| `{k['name'][:90]}` | {k['category']} | {k['launches_per_step']:.0f} | {k['us_per_step']:.1f} | "
                         f"{k['us_per_step'] / max(r['kernel_us'], 1e-9):.1%} |")
    return "\n".join(lines) + "\n"


def plot(env, rows, path):
    """One stacked bar per (config, batch): kernel time by category, in-graph bubbles
    (pipelined step - kernels) and host time the synced step waits for (synced - pipelined);
    the floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in CATEGORIES] + ["other"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 5))
    names = [f"{r['config'].replace('-no-', chr(10) + 'no ')}\nbatch {r['batch']}" for r in rows]
    bottom = [0.0] * len(rows)
    for label in labels:
        values = [r["categories"].get(label, 0.0) / 1e3 for r in rows]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    for label, part in (("bubbles in the graph", lambda r: r.get("pipelined_us", r["kernel_us"]) - r["kernel_us"]),
                        ("host (synced step only)", lambda r: r["step_us"] - r.get("pipelined_us", r["kernel_us"]))):
        values = [max(part(r), 0.0) / 1e3 for r in rows]
        ax.bar(names, values, bottom=bottom, label=label, hatch="//", alpha=0.5)
        bottom = [b + v for b, v in zip(bottom, values)]
    if env.get("floor_us"):
        ax.axhline(env["floor_us"] / 1e3, color="black", linestyle="--", label="floor (weights / copy rate)")
    if env.get("fp8_floor_us"):  # the -fp8 rows' own floor
        ax.axhline(env["fp8_floor_us"] / 1e3, color="black", linestyle=":", label="FP8 floor (FP8 weights / copy rate)")
    ax.set_ylabel("ms per decode step")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"{env['model']} decode step on {env['card']} ({env['date'][:10]}, {env['commit']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_runs(parser, text: str) -> list[tuple[str, int]]:
    """--runs' CONFIG@BATCH pairs, in order; a malformed pair or an unknown configuration is a
    usage error."""
    runs = []
    for item in text.split(","):
        config, at, batch = item.partition("@")
        if not at or not batch.isdigit() or int(batch) < 1:
            parser.error(f"--runs wants CONFIG@BATCH pairs (e.g. paiton@8), got {item!r}")
        parse_configs(parser, config)
        runs.append((config, int(batch)))
    return runs


def main(argv=None):
    from paiton.fusion import few_rows_gemm, fp8_paths
    from paiton.fusion.gemv import chosen_launches
    from paiton.models.fp8 import is_fp8, quantize_fp8
    from paiton.models.qwen3 import QWEN3_PRESETS, build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b", help=f"preset: {', '.join(QWEN3_PRESETS)}")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--configs", default="inductor-cdt,paiton", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--runs", help="CONFIG@BATCH,... in the order to run (overrides --configs and --batches)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache-len", type=int, default=0,
                        help="the KV cache's length (e.g. a server's --max-model-len, 1472); default what the run fills")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--stack-dumps", type=float, default=0.0, metavar="SECONDS",
                        help="write every thread's Python stack this often to stacks-profile_decode_step-<model>[-<tag>].log "
                             "in --out (where a cold compile spends its minutes)")
    parser.add_argument("--tag", help="appended to the results files' names (two runs of one model on one day)")
    parser.add_argument("--fp8-in-place", action="store_true",
                        help="quantize the model itself for the -fp8 configurations, after every other one has run "
                             "(the bf16 weights are freed): a card that cannot hold a bf16 model and its FP8 copy "
                             "(Qwen3-32B on an 80 GB H100) measures both in one run")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paiton-inner", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--trace-dir", help="also write each profiled run's CPU+GPU timeline here (.json.gz)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.runs:
        runs = parse_runs(parser, args.runs)
    else:
        configs = parse_configs(parser, args.configs)
        runs = [(config, int(batch)) for batch in args.batches.split(",") for config in configs]
    if args.model not in QWEN3_PRESETS:
        parser.error(f"unknown preset {args.model!r}; presets: {', '.join(QWEN3_PRESETS)}")
    if min(args.steps, args.profile_steps) < 1:
        parser.error("--steps and --profile-steps must be at least 1")
    suffix = f"-{args.tag}" if args.tag else ""  # of every file this run writes
    if args.stack_dumps > 0:
        from paiton.models.server import StackDumps

        os.makedirs(args.out, exist_ok=True)
        name = f"stacks-profile_decode_step-{args.model}{suffix}.log"
        StackDumps(args.stack_dumps, open(os.path.join(args.out, name), "w"), "the run").start()  # a daemon thread: ends with the run
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_qwen3(args.model, device=args.device, dtype=dtype)
    env = dict(run_environment(args.device), model=args.model, dtype=str(dtype), prompt_len=args.prompt_len, cache_len=args.cache_len or None,
               steps=args.steps, profile_steps=args.profile_steps, **floor_fields(model, args.device))
    if any("-fp8" in config for config, _ in runs):  # the FP8 copy's floor beside bf16's, at the copy rate measured above
        env.update(fp8_floor_fields(model, env.get("copy_TBps") and env["copy_TBps"] * 1e12,
                                    lm_head=any(fp8_lm_head(config) for config, _ in runs)))
    if args.fp8_in_place:  # every bf16 row before the weights go (a stable sort: each group keeps its order)
        runs.sort(key=lambda run: "-fp8" in run[0])
    rows = []
    for config, batch in runs:
        if args.fp8_in_place and "-fp8" in config and not is_fp8(model):
            quantize_fp8(model)  # layer by layer, the bf16 weight freed as its FP8 copy is made
        row = profile_config(model, config, batch, args)
        rows.append(row)
        print(f"{config} batch {batch}: step {row['step_us']:.0f} us, pipelined {row['pipelined_us']:.0f} us, "
              f"host {row['host_us']:.0f} us, kernels {row['kernel_us']:.0f} us, "
              f"gap {row['gap_us']:.0f} us, {row['launches_per_step']:.0f} launches, "
              f"compile and warm-up {row['compile_and_warmup_s']:.0f} s"
              + (f", CUDA graph counters {row['cudagraph_counters']}" if row["cudagraph_counters"] else "")
              + (f", {len(row['synchronizing_calls'])} synchronizing call(s) in a step" if row["synchronizing_calls"] else ""),
              flush=True)
        # After every row: a run cut short keeps what it measured.
        choices = chosen_launches()
        table = markdown(env, rows, args.top) + one_row_choices_markdown(choices) + several_rows_choices_markdown()
        stem = write_results(args.out, f"profile_decode_step-{args.model}-{env['card'].replace(' ', '_')}-{env['date'][:10]}{suffix}",
                             dict(env=env, rows=rows, one_row_choices=choices, few_rows_choices=few_rows_gemm.chosen_launches(),
                                  fp8_paths=fp8_paths.chosen_paths()), table, echo=False)
        plot(env, rows, stem + ".png")
    print(table)


if __name__ == "__main__":
    main()

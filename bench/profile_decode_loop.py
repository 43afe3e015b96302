"""Where the bundled decode loop's time per token goes (issue 7): the loop's token period
split into the GPU's busy and idle time, the idle time into what the GPU waited for.

    python bench/profile_decode_loop.py --model qwen3-8b --configs paiton,inductor-cdt --batch 1
    python bench/profile_decode_loop.py --model qwen3-8b --configs paiton --loops bundled,engine --batch 32 \\
        --prompt-len 330 --cache-len 1472                     # the server's engine beside the bundled loop
    python bench/profile_decode_loop.py --model tiny --device cpu --configs paiton --paiton-inner eager \\
        --prompt-len 8 --new-tokens 4 --profile-tokens 4                  # smoke run (no GPU timeline)

Why: profile_decode_step.py times the compiled forward alone, enqueued back to back; the
serving benchmark's TPOT comes from the bundled loop (models/decode_loop.py), which adds the
attention mask, sampling, the token's copy to the host and Python bookkeeping, and keeps only
one step queued ahead. When the two disagree, this says where the difference is.

--loops engine runs the same prompts through the continuous-batching Engine that `paiton serve`
drives (models/engine.py: a decode graph compiled for a dynamic batch, prompts packed into
prefill steps of up to 2048 tokens, one step in flight), over a cache of --cache-len tokens as
the server's --max-model-len makes it. Why: issue 20's server decodes Qwen3-32B at batch 32 about
1 ms a token slower (ITL 20.1 ms) than its decode step alone predicts (18.7 ms, plus 0.4 ms for
the longer contexts' attention); the two loops side by side say whether the engine's step or
its host work holds the difference. (On an H100 at ef62042, Qwen3-8B at batch 32: neither; the
engine's steady step was the bundled loop's, 7.19 against 7.23 ms, the GPU busy 97% of both.)

Per configuration (bench_common.CONFIGS): a DecodeLoop as the serving benchmark makes one,
warmed up (a generation compiles, a second records the CUDA graphs), a measured generation
(TPOT), then --profile-tokens tokens under torch.profiler (CPU and CUDA), whose timeline is
written as a Chrome trace (trace-<config>.json.gz, for Perfetto) and read back:
* the loop's period per token (between consecutive waits for a token on the host) and how much
  of it the host spent waiting for the device (cudaEventSynchronize): a loop whose host waits
  most of each period is bound by the device, one that hardly waits by the host;
* the GPU's busy time per token (kernels and copies, overlaps counted once), by category
  (profile_decode_step's), with the kernels launched outside CUDA graphs (the loop's eager
  work) listed on their own;
* its idle time per token, gap by gap (gaps over --gap-us): "host late" when the launch of the
  work after the gap ended after the work before it did (the GPU waited for the host), grouped
  by the CPU op that launched it; "device" otherwise (the launch was queued in time).
On a CPU there is no GPU timeline: the smoke run reports the token period only.

Writes profile_decode_loop-<model>-<card>-<date>.json, .md and the traces.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import statistics

import torch
from bench_common import (CONFIGS, add_run_arguments, floor_fields, floor_lines, make_engine, make_loop,
                          one_row_choices_markdown, parse_model_and_configs, run_environment, versions_line, write_results)
from profile_decode_step import category

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_OP_CATEGORIES = ("cpu_op", "user_annotation")
# The engine's profiled requests ask for this many tokens past the window, so that no request
# ends inside it (a step ahead is queued, and the first token comes from the prefill).
ENGINE_WINDOW_MARGIN = 8
TOKEN_WAIT = "cudaEventSynchronize"  # the loop's wait for a token (models/decode_loop.py, to_host)
GRAPH_LAUNCH = "cudaGraphLaunch"


def _union_us(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of (start, end) intervals clipped to [lo, hi]."""
    total, reach = 0.0, lo
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            total += end - start
            reach = end
    return total


def _innermost_op(host_ops: list[dict], tid, at: float) -> str | None:
    """Name of the shortest host op on thread `tid` running at time `at`."""
    around = [e for e in host_ops if e["tid"] == tid and e["ts"] <= at <= e["ts"] + e["dur"]]
    return min(around, key=lambda e: e["dur"])["name"] if around else None


def kernel_tallies(gpu: list[dict], per: float = 1.0) -> tuple[dict, dict]:
    """Launches and microseconds of each kernel name ({name: [launches, us]}) over GPU events,
    and microseconds of each category (profile_decode_step's), divided by `per`."""
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for e in gpu:
        per_kernel[e["name"]][0] += 1
        per_kernel[e["name"]][1] += e["dur"]
    categories = collections.defaultdict(float)
    for name, (_, us) in per_kernel.items():
        categories[category(name)] += us / per
    return per_kernel, categories


def analyze_trace(events: list[dict], gap_us: float = 5.0) -> dict:
    """The decode tokens of one profiled generation, from its Chrome trace events (kineto's
    format: complete events "X" with ts/dur in microseconds; GPU work and the runtime call that
    launched it share args["correlation"]). The window runs from the end of the first wait for
    a token (the prefill's) to the end of the last: one period per decode token."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    waits = sorted((e for e in complete if e.get("cat") in LAUNCH_CATEGORIES and e["name"] == TOKEN_WAIT), key=lambda e: e["ts"])
    if len(waits) < 2:
        return dict(tokens=0)
    ends = [w["ts"] + w["dur"] for w in waits]
    lo, hi, tokens = ends[0], ends[-1], len(ends) - 1
    periods = [b - a for a, b in zip(ends, ends[1:])]
    launches = {e["args"]["correlation"]: e for e in complete
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    gpu = sorted((e for e in complete if e.get("cat") in GPU_CATEGORIES and lo <= e["ts"] < hi), key=lambda e: e["ts"])
    host_ops = [e for e in complete if e.get("cat") in HOST_OP_CATEGORIES]

    def launch_of(event):
        return launches.get(event.get("args", {}).get("correlation"))

    busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in gpu], lo, hi)
    per_kernel, categories = kernel_tallies(gpu, tokens)
    eager = collections.defaultdict(lambda: [0, 0.0])  # work not launched by a CUDA graph replay
    for e in gpu:
        launch = launch_of(e)
        if launch is None or launch["name"] != GRAPH_LAUNCH:
            eager[e["name"]][0] += 1
            eager[e["name"]][1] += e["dur"]
    # Gaps: walk the GPU work in start order, tracking how far the busy time reaches.
    gaps = collections.defaultdict(lambda: [0, 0.0])  # (cause, launching op, next work) -> [count, us]
    reach = lo
    for e in gpu:
        gap = e["ts"] - reach
        if gap > gap_us:
            launch = launch_of(e)
            if launch is None:
                cause, op = "unknown launch", None
            else:
                cause = "host late" if launch["ts"] + launch["dur"] >= reach else "device"
                op = _innermost_op(host_ops, launch["tid"], launch["ts"]) or launch["name"]
            gaps[(cause, op, e["name"][:80])][0] += 1
            gaps[(cause, op, e["name"][:80])][1] += gap
        reach = max(reach, e["ts"] + e["dur"])
    idle_by_cause = collections.defaultdict(float)
    for (cause, _, _), (_, us) in gaps.items():
        idle_by_cause[cause] += us / tokens

    def per_token(table):
        return sorted(({"name": name, "launches_per_token": n / tokens, "us_per_token": us / tokens}
                       for name, (n, us) in table.items()), key=lambda k: -k["us_per_token"])

    return dict(
        tokens=tokens, period_us=(hi - lo) / tokens, median_period_us=statistics.median(periods),
        host_wait_us=sum(w["dur"] for w in waits[1:]) / tokens,
        gpu_busy_us=busy / tokens, gpu_idle_us=(hi - lo - busy) / tokens,
        idle_in_gaps_us=dict(idle_by_cause), gap_threshold_us=gap_us,
        launches_per_token=len(gpu) / tokens, categories=dict(sorted(categories.items(), key=lambda c: -c[1])),
        eager_work=per_token(eager), kernels=per_token(per_kernel),
        gaps=sorted(({"cause": cause, "launched_by": op, "next": name, "count_per_token": n / tokens, "us_per_token": us / tokens}
                     for (cause, op, name), (n, us) in gaps.items()), key=lambda g: -g["us_per_token"]),
    )


def read_trace(path: str) -> list[dict]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        return json.load(f)["traceEvents"]


def engine_decode_window(engine, prompts, tokens: int, profiler) -> float:
    """Submit `prompts`, step the engine until every one has its first token (its prefill done),
    then step `tokens` more times inside `profiler` (a context manager) and finish. The window
    holds decode steps only, as a server's steady state does; a generation's first tokens would
    put its prefill steps (tens of ms each) into the period. Returns the mean gap between the
    tokens that reached the host inside the window, in seconds."""
    import time

    from paiton.models.engine import EngineRequest

    requests = [EngineRequest(list(prompt), tokens + ENGINE_WINDOW_MARGIN) for prompt in prompts]
    for request in requests:
        engine.submit(request)
    while any(not request.tokens and not request.finished for request in requests):  # (a failed step ends them)
        engine.step()
    begin = time.perf_counter()
    with profiler:
        for _ in range(tokens):
            engine.step()
    end = time.perf_counter()
    engine.run_until_done()
    gaps = []
    for request in requests:
        arrived = [request.submitted_at + t for t in request.token_times]
        gaps += [b - a for a, b in zip(arrived, arrived[1:]) if begin <= a and b <= end]
    return statistics.mean(gaps) if gaps else float("nan")


@torch.no_grad()
def profile_config(model, config, prompts, args, loop_kind="bundled"):
    """One row: `config`'s loop (the bundled DecodeLoop, or the serving Engine) warmed up, timed
    over --new-tokens (TPOT as the serving benchmark counts it, and the median gap between
    tokens: the steady decode step), then profiled over --profile-tokens."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    cuda = args.device.startswith("cuda")
    max_length = args.cache_len or args.prompt_len + args.new_tokens + 16
    make = make_engine if loop_kind == "engine" else make_loop
    loop = make(model, config, len(prompts), max_length, args.device, args.paiton_inner)
    loop.generate(prompts, args.new_tokens)  # compiles
    loop.generate(prompts, args.new_tokens)  # CUDA graph trees record on a shape's second call
    measured = loop.generate(prompts, args.new_tokens)
    row = dict(config=config, loop=loop_kind, batch=len(prompts), cache_len=max_length,
               tpot_ms=1e3 * statistics.mean(measured.tpot_s), ttft_ms=1e3 * statistics.mean(measured.ttft_s),
               median_itl_ms=1e3 * statistics.median(gap for gaps in measured.itl_s for gap in gaps))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    if loop_kind == "engine":
        row["profiled_tpot_ms"] = 1e3 * engine_decode_window(loop, prompts, args.profile_tokens, prof)
    else:
        with prof:
            profiled = loop.generate(prompts, args.profile_tokens)
        row["profiled_tpot_ms"] = 1e3 * statistics.mean(profiled.tpot_s)
    trace = os.path.join(args.out, f"trace-{args.model}-{config}-{loop_kind}-batch{len(prompts)}.json.gz")
    prof.export_chrome_trace(trace)  # gzipped by torch (the name's .gz)
    row["trace"] = os.path.basename(trace)
    row.update(analyze_trace(read_trace(trace), args.gap_us))
    return row


def markdown(env, rows, top):
    lines = [f"# The decode loops' token period, busy and idle: {env['model']} on {env['card']}", "",
             f"{versions_line(env)}, prompt {env['prompt_len']}, {env['new_tokens']} new tokens (measured), "
             f"{env['profile_tokens']} profiled; per decode token, from the profiled generation's timeline. "
             "Loop: `bundled` (models/decode_loop.py) or `engine` (models/engine.py, what `paiton serve` runs); "
             "cache: the KV cache's length.", "",
             *floor_lines(env)]
    lines += ["| config | loop | batch | cache | TPOT ms (measured / profiled) | median ITL ms | period us (mean / median) | "
              "host waits us | GPU busy us | GPU idle us | idle in gaps: host late / device us | launches | eager work us |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['config']} | {r.get('loop', 'bundled')} | {r['batch']} | {r.get('cache_len', '-')} "
                f"| {r['tpot_ms']:.2f} / {r['profiled_tpot_ms']:.2f} | {r.get('median_itl_ms', float('nan')):.2f} ")
        if not r.get("tokens"):
            lines.append(head + "| - | - | - | - | - | - | - |")
            continue
        gaps = r["idle_in_gaps_us"]
        lines.append(head + "| "
                     f"{r['period_us']:.0f} / {r['median_period_us']:.0f} | {r['host_wait_us']:.0f} | {r['gpu_busy_us']:.0f} | "
                     f"{r['gpu_idle_us']:.0f} | {gaps.get('host late', 0):.0f} / {gaps.get('device', 0):.0f} | "
                     f"{r['launches_per_token']:.0f} | {sum(k['us_per_token'] for k in r['eager_work']):.0f} |")
    for r in rows:
        if not r.get("tokens"):
            continue
        lines += ["", f"## {r['config']}, {r.get('loop', 'bundled')} loop, batch {r['batch']}", "", "GPU time per token by category: "
                  + ", ".join(f"{name} {us:.0f} us" for name, us in r["categories"].items()) + ".", "",
                  f"Idle gaps over {r['gap_threshold_us']:g} us, per token:", "",
                  "| cause | launched by | work after the gap | gaps | us |", "|---|---|---|---|---|"]
        for g in r["gaps"][:top]:
            lines.append(f"| {g['cause']} | `{g['launched_by']}` | `{g['next']}` | {g['count_per_token']:.1f} | {g['us_per_token']:.1f} |")
        lines += ["", "Work launched outside CUDA graphs, per token:", "", "| kernel or copy | launches | us |", "|---|---|---|"]
        for k in r["eager_work"][:top]:
            lines.append(f"| `{k['name'][:90]}` | {k['launches_per_token']:.1f} | {k['us_per_token']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from paiton.fusion.gemv import chosen_launches
    from paiton.models.qwen3 import QWEN3_PRESETS, build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b", help=f"preset: {', '.join(QWEN3_PRESETS)}")
    parser.add_argument("--configs", default="paiton,inductor-cdt", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=166, help="the serving benchmark's batch-1 prompt is 166 tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--loops", default="bundled", help="bundled (models/decode_loop.py), engine (models/engine.py, "
                        "what `paiton serve` runs), or both: bundled,engine")
    parser.add_argument("--cache-len", type=int, help="the KV cache's length (a server's --max-model-len, e.g. 1472); "
                        "default prompt + new tokens + 16")
    parser.add_argument("--profile-tokens", type=int, default=16)
    parser.add_argument("--gap-us", type=float, default=5.0, help="idle gaps shorter than this are not listed")
    parser.add_argument("--top", type=int, default=12)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    configs = parse_model_and_configs(parser, args)
    if args.profile_tokens < 3 or args.new_tokens < 2:
        parser.error("--profile-tokens must be at least 3 and --new-tokens at least 2")
    loops = args.loops.split(",")
    if not loops or any(kind not in ("bundled", "engine") for kind in loops):
        parser.error(f"--loops takes bundled, engine or both; got {args.loops!r}")
    longest = args.prompt_len + max(args.new_tokens, args.profile_tokens + ENGINE_WINDOW_MARGIN)
    if args.cache_len is not None and args.cache_len < longest:
        parser.error(f"--cache-len {args.cache_len} holds less than the prompt ({args.prompt_len}) and the new tokens")
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_qwen3(args.model, device=args.device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=generator).tolist()
    env = dict(run_environment(args.device), model=args.model, dtype=str(dtype), prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, profile_tokens=args.profile_tokens, **floor_fields(model, args.device))
    rows = []
    for config, loop_kind in ((c, k) for c in configs for k in loops):
        row = profile_config(model, config, prompts, args, loop_kind)
        rows.append(row)
        print(f"{config} ({loop_kind} loop): TPOT {row['tpot_ms']:.2f} ms; " + (
            f"period {row['period_us']:.0f} us, host waits {row['host_wait_us']:.0f}, GPU busy {row['gpu_busy_us']:.0f}, "
            f"idle {row['gpu_idle_us']:.0f} ({row['idle_in_gaps_us']})" if row.get("tokens") else "no GPU timeline"), flush=True)
        choices = chosen_launches()
        table = markdown(env, rows, args.top) + one_row_choices_markdown(choices)
        write_results(args.out, f"profile_decode_loop-{args.model}-{env['card'].replace(' ', '_')}-{env['date'][:10]}",
                      dict(env=env, rows=rows, one_row_choices=choices), table, echo=False)
    print(table)


if __name__ == "__main__":
    main()

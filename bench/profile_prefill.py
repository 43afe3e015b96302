"""Where a burst's prefill time goes (issue 20's TTFT): a batch of prompts that all arrive at
once, prefilled by the serving engine (models/engine.py, what `paiton serve` runs), timed and
profiled kernel by kernel.

    python bench/profile_prefill.py --model qwen3-32b --requests .device/sharegpt-qwen3-32b.json \\
        --num-prompts 32 --cache-len 1472 --configs paiton,inductor-cdt
    python bench/profile_prefill.py --model tiny --device cpu --configs paiton --paiton-inner eager \\
        --batch 4 --prompt-len 24 --max-prefill-tokens 64                 # smoke run (no GPU timeline)

Why: at batch 32 with output 256 a run lasts its last request's first token plus 255 decode
steps, and the first tokens of a burst of 32 ShareGPT prompts (4676 tokens, packed into
prefills of up to 2048) came at 0.82 s (p99 TTFT, H200, 4613cae): about 15% of the run. By
arithmetic over the padded tokens that is at most about 470 TFLOP/s, half of an H200's dense
bf16 rate; profile_decode_step.py and profile_decode_loop.py see decode steps only.

Per configuration (bench_common.CONFIGS): an Engine as make_engine makes the server's, its
slots the prompts' count, over a cache of --cache-len tokens. Every request asks for one token,
so the burst is prefill steps only (the engine packs prompts first fit in arrival order, each
prefill padded to a power of two). Two bursts warm it up (the first compiles each token bucket,
the second records its CUDA graphs), or with --warm-up engine the server's warm-up does (then
the first timed burst shows whether a server's first burst records any graph). --repeats
bursts are timed (wall time from submission to the last first token, and the device time of
each prefill between CUDA events at the engine's step hook), and one more runs under
torch.profiler: kernel time by category (profile_decode_step's) and the top kernels, per burst.

Work: a prompt of n tokens costs 2 x (the decoder's linear weights) FLOPs a token, plus causal
attention (QK^T and PV: 2 x 2 x heads x head_dim x (n + 1) / 2 a token per layer), plus one
row of lm_head (the engine takes the last row's logits). TFLOP/s is that work over the burst's
device time; the padded tokens' share is the pads' linear work (counted apart: it is spent, not
useful).

Writes profile_prefill-<model>-<card>-<date>[-<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_common import (CONFIGS, add_run_arguments, make_engine, parse_model_and_configs, run_environment, versions_line,
                          write_results)
from profile_decode_loop import GPU_CATEGORIES, _union_us, kernel_tallies, read_trace


WARM_UPS = {
    "bursts": "two bursts of the same prompts (the first compiles each token bucket, the second records its CUDA graphs)",
    "engine": "the engine's own (Engine.warm_up, as `paiton serve --warmup`): the first timed burst is a server's first",
}


def linear_flops_per_token(preset: str) -> int:
    """2 x the decoder's linear weights (q/k/v, o, gate/up, down over every layer)."""
    from paiton.models.qwen3 import QWEN3_PRESETS, projection_shapes

    return 2 * QWEN3_PRESETS[preset].num_hidden_layers * sum(n * k for n, k in projection_shapes(preset).values())


def burst_work(preset: str, prompt_lens: list[int], padded_tokens: int) -> dict[str, float]:
    """FLOPs of prefilling prompts of `prompt_lens` tokens in prefills of `padded_tokens` tokens
    in all: the useful work (linear, causal attention, one lm_head row a prompt) and the pads'."""
    from paiton.models.qwen3 import QWEN3_PRESETS

    config = QWEN3_PRESETS[preset]
    real = sum(prompt_lens)
    attention = config.num_hidden_layers * 2 * config.num_attention_heads * config.head_dim * sum(n * (n + 1) for n in prompt_lens)
    lm_head = 2 * config.hidden_size * config.vocab_size * len(prompt_lens)
    linear = linear_flops_per_token(preset)
    return dict(useful_flop=float(linear * real + attention + lm_head), pad_flop=float(linear * (padded_tokens - real)))


class PrefillRecorder:
    """The engine's step hook: for each prefill step, its padded token count and (on a GPU) a
    CUDA event recorded before its work is queued; `end()` records the last one."""

    def __init__(self, cuda: bool):
        self.cuda, self.tokens, self.events = cuda, [], []

    def __call__(self, kind, *inputs):
        if kind == "prefill":
            self.tokens.append(int(inputs[0].shape[-1]))
            self._mark()

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def end(self) -> list[float]:
        """Milliseconds of device time of each prefill (between consecutive events)."""
        self._mark()
        if not self.cuda:
            return []
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]


def run_burst(engine, prompts, cuda: bool) -> dict:
    """Submit `prompts` at once, one token each, and step until all have it: the burst's wall
    time, its prefills' padded sizes and device times."""
    from paiton.models.engine import EngineRequest

    recorder = PrefillRecorder(cuda)
    engine.step_hook = recorder
    try:
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        requests = [engine.submit(EngineRequest(list(prompt), 1)) for prompt in prompts]
        engine.run_until_done()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - begin
        device_ms = recorder.end()
    finally:
        engine.step_hook = None
    failed = [r.error for r in requests if r.error]
    if failed:
        raise RuntimeError(f"the burst's prefill failed: {failed[0]}")
    return dict(wall_ms=1e3 * wall, prefill_tokens=recorder.tokens, prefill_device_ms=device_ms,
                last_first_token_ms=1e3 * max(r.submitted_at + r.token_times[0] for r in requests) - 1e3 * begin)


def kernel_table(events: list[dict]) -> dict:
    """GPU time of a profiled burst by category and kernel (every GPU event of the trace)."""
    gpu = [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        return dict(gpu_busy_us=None, categories={}, kernels=[])
    lo, hi = min(e["ts"] for e in gpu), max(e["ts"] + e["dur"] for e in gpu)
    per_kernel, categories = kernel_tallies(gpu)
    return dict(gpu_span_us=hi - lo, gpu_busy_us=_union_us([(e["ts"], e["ts"] + e["dur"]) for e in gpu], lo, hi),
                categories=dict(sorted(categories.items(), key=lambda c: -c[1])),
                kernels=sorted(({"name": n, "launches": c, "us": us} for n, (c, us) in per_kernel.items()), key=lambda k: -k["us"]))


@torch.no_grad()
def profile_config(model, config, prompts, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    cuda = args.device.startswith("cuda")
    engine = make_engine(model, config, len(prompts), args.cache_len, args.device, args.paiton_inner,
                         max_prefill_tokens=args.max_prefill_tokens)
    compile_begin = time.perf_counter()
    if args.warm_up == "engine":  # the server's warm-up (paiton serve --warmup), then the bursts as a server meets them
        engine.warm_up(batch_sizes=[1], logit_rows=args.warm_logit_rows)  # decode at batch 1 only: bursts are prefills
    else:
        for _ in range(2):  # compiles each token bucket, then records its CUDA graphs
            run_burst(engine, prompts, cuda)
    warm_up_s = time.perf_counter() - compile_begin
    bursts = [run_burst(engine, prompts, cuda) for _ in range(args.repeats)]
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    with prof:
        profiled = run_burst(engine, prompts, cuda)
    trace = os.path.join(args.out, f"trace-prefill-{args.model}-{config}-{len(prompts)}prompts.json.gz")
    prof.export_chrome_trace(trace)
    padded = sum(bursts[0]["prefill_tokens"])
    work = burst_work(args.model, [len(p) for p in prompts], padded)
    row = dict(config=config, prompts=len(prompts), prompt_tokens=sum(len(p) for p in prompts), padded_tokens=padded,
               prefill_tokens=bursts[0]["prefill_tokens"], warm_up_s=warm_up_s, bursts=bursts, profiled=profiled,
               wall_ms=statistics.median(b["wall_ms"] for b in bursts), first_wall_ms=bursts[0]["wall_ms"],
               warm_up=args.warm_up, warm_logit_rows=args.warm_logit_rows, trace=os.path.basename(trace), **work)
    if cuda:
        device_ms = [sum(b["prefill_device_ms"]) for b in bursts]
        row["device_ms"] = statistics.median(device_ms)
        row["per_prefill_device_ms"] = [statistics.median(ms) for ms in zip(*(b["prefill_device_ms"] for b in bursts))]
        row["useful_tflops"] = work["useful_flop"] / (row["device_ms"] * 1e-3) / 1e12
        row["padded_tflops"] = (work["useful_flop"] + work["pad_flop"]) / (row["device_ms"] * 1e-3) / 1e12
    row.update(kernel_table(read_trace(trace)))
    return row


def markdown(env, rows, top) -> str:
    lines = [f"# A burst's prefill: {env['model']} on {env['card']}", "",
             f"{versions_line(env)}. {rows[0]['prompts']} prompts of "
             f"{rows[0]['prompt_tokens']} tokens at once ({env['prompts_from']}), one token each; the engine's "
             f"prefills of up to {env['max_prefill_tokens']} tokens, a cache of {env['cache_len']}."
             + (" Paiton's rewritten graphs run eagerly (--paiton-inner eager: no Inductor, ops launched one by one "
                "from the host), a check of the tool, not the server's speed." if env["paiton_inner"] == "eager" else ""), "",
             f"Warm-up: {WARM_UPS[rows[0]['warm_up']]}"
             + (f", logit rows {rows[0]['warm_logit_rows']} only" if rows[0]["warm_logit_rows"] else "")
             + f". Wall ms: the median of {len(rows[0]['bursts'])} bursts; the first burst's beside it.", "",
             "| config | prefills (padded tokens) | wall ms | first burst ms | device ms | per prefill ms | useful TFLOP/s | incl. pads | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        device = f"{r['device_ms']:.1f}" if "device_ms" in r else "-"
        each = ", ".join(f"{ms:.1f}" for ms in r.get("per_prefill_device_ms", [])) or "-"
        rates = (f"{r['useful_tflops']:.0f} | {r['padded_tflops']:.0f}" if "useful_tflops" in r else "- | -")
        lines.append(f"| {r['config']} | {len(r['prefill_tokens'])} ({', '.join(map(str, r['prefill_tokens']))}) | "
                     f"{r['wall_ms']:.1f} | {r['first_wall_ms']:.1f} | {device} | {each} | {rates} | {r['warm_up_s']:.0f} |")
    for r in rows:
        if not r["categories"]:
            continue
        busy = r["gpu_busy_us"]
        lines += ["", f"**{r['config']}**, the profiled burst: GPU busy {busy / 1e3:.1f} ms of a {r['gpu_span_us'] / 1e3:.1f} ms span",
                  "", "| category | ms | share |", "|---|---|---|"]
        lines += [f"| {name} | {us / 1e3:.2f} | {us / busy:.0%} |" for name, us in r["categories"].items()]
        lines += ["", "| kernel | launches | ms |", "|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['launches']} | {k['us'] / 1e3:.2f} |" for k in r["kernels"][:top]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    from paiton.models.qwen3 import QWEN3_PRESETS, build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-32b", help=f"preset: {', '.join(QWEN3_PRESETS)}")
    parser.add_argument("--configs", default="paiton,inductor-cdt", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--requests", help="a workload file of bench/serving.py --save-requests: its first --num-prompts prompts")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="without --requests: this many random prompts ...")
    parser.add_argument("--prompt-len", type=int, default=146, help="... of this many tokens (ShareGPT's mean at batch 32)")
    parser.add_argument("--cache-len", type=int, default=1472, help="the server's --max-model-len")
    parser.add_argument("--max-prefill-tokens", type=int, default=2048, help="the engine's prefill budget")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm-up", choices=sorted(WARM_UPS), default="bursts", help="how the engine warms up before the timed bursts")
    parser.add_argument("--warm-logit-rows", type=lambda v: [int(x) for x in v.split(",")],
                        help="with --warm-up engine: record packed prefills with only these logit-row counts (e.g. 2: "
                             "the warm-up before 2026-12-07's packed shapes)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--tag", default="", help="a suffix for the results files' names")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    configs = parse_model_and_configs(parser, args)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_qwen3(args.model, device=args.device, dtype=dtype)
    if args.requests:
        from serving_workload import load_requests

        requests, _ = load_requests(args.requests)
        prompts = [r.prompt for r in requests[:args.num_prompts]]
        source = f"the first {len(prompts)} of {os.path.basename(args.requests)}"
    else:
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=generator).tolist()
        source = "random tokens"
    too_long = [len(p) for p in prompts if len(p) + 1 > args.cache_len]
    if too_long:
        parser.error(f"--cache-len {args.cache_len} cannot hold a prompt of {too_long[0]} tokens and its first token")
    os.makedirs(args.out, exist_ok=True)
    env = dict(run_environment(args.device), model=args.model, dtype=str(dtype), prompts_from=source,
               cache_len=args.cache_len, max_prefill_tokens=args.max_prefill_tokens, paiton_inner=args.paiton_inner)
    rows = []
    stem = f"profile_prefill-{args.model}-{env['card'].replace(' ', '_')}-{env['date'][:10]}" + (f"-{args.tag}" if args.tag else "")
    for config in configs:
        row = profile_config(model, config, prompts, args)
        rows.append(row)
        rate = f", {row['useful_tflops']:.0f} TFLOP/s useful" if "useful_tflops" in row else ""
        print(f"{config}: {len(row['prefill_tokens'])} prefills {row['prefill_tokens']}, wall {row['wall_ms']:.1f} ms{rate}", flush=True)
        table = markdown(env, rows, args.top)
        write_results(args.out, stem, dict(env=env, rows=rows), table, echo=False)
    print(table)


if __name__ == "__main__":
    main()

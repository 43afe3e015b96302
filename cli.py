"""The `paiton` command.

    paiton demo                      # tiny random Qwen3 on CPU, or qwen3-8b in bf16 on a GPU
    paiton demo --model qwen3-0.6b --device cuda --mode reduce-overhead
    paiton generate --model tiny --prompt-ids 1,2,3 --prompt-ids 7,8 --max-new-tokens 16
    paiton generate --checkpoint /models/Qwen3-8B --prompt "Hello" --max-new-tokens 64 --temperature 0.7
    paiton serve --model tiny --port 8000    # OpenAI-compatible server, continuous batching
    torchrun --nproc-per-node 4 -m paiton serve --model qwen3-32b --tensor-parallel 4   # one process per GPU

`demo` compiles a random-weight Qwen3 with `backend="paiton"`, runs a prefill and greedy
decode steps through transformers' StaticCache beside eager, and prints which fusions fired
in each graph and how the compiled model's logits and tokens compare with eager's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def _progress(message: str) -> None:
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    print(f"[paiton{'' if rank == '0' else f' rank {rank}'}] {message}", file=sys.stderr, flush=True)


def _start_tensor_parallel(args: argparse.Namespace, device: str):
    """(device, rank, StepChannel or None) for a run of --tensor-parallel N processes under
    torchrun (N: WORLD_SIZE when not given): the degree checked against the process count and
    the model's head counts first, then the process group joined (NCCL on GPUs, gloo on CPU;
    collectives fail after --tp-timeout seconds). (device, 0, None) in one process; None after
    saying what is wrong."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tensor_parallel or world
    if tp != world:
        _progress(f"--tensor-parallel {tp} runs one process per GPU: start it with "
                  f"torchrun --nproc-per-node {tp} -m paiton {args.command} ... (this run has {world} process(es))")
        return None
    if tp == 1:
        return device, 0, None
    if getattr(args, "fp8", False) or getattr(args, "fp8_lm_head", False):
        _progress("--fp8 does not yet combine with --tensor-parallel")
        return None
    if device.startswith("cuda"):
        if device != "cuda":  # refused on every rank alike (a rank left alone would wait to join)
            _progress(f"under tensor parallelism each rank takes its own GPU (cuda:LOCAL_RANK); give --device cuda, not {device}")
            return None
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    from paiton.models.checkpoint import CheckpointError, read_qwen3_config
    from paiton.models.qwen3 import QWEN3_PRESETS, qwen3_config
    from paiton.models.tensor_parallel import check_divisible, init_tensor_parallel
    from paiton.models.tp_runtime import StepChannel

    try:  # before joining: a degree the model cannot take is a usage error on every rank alike
        if args.checkpoint:
            check_divisible(read_qwen3_config(args.checkpoint), tp)
        elif args.model in QWEN3_PRESETS:
            check_divisible(qwen3_config(args.model), tp)
    except (CheckpointError, ValueError) as error:
        _progress(str(error))
        return None
    rank, _ = init_tensor_parallel("nccl" if device.startswith("cuda") else "gloo", timeout_s=args.tp_timeout)
    return device, rank, StepChannel(device, timeout_s=args.tp_timeout)


def _model_on_this_rank(args: argparse.Namespace, device: str):
    """Join the tensor-parallel group if there is one, then build or load the model and keep
    this rank's shard: (device, rank, channel, model, tokenizer), or None after an error said why."""
    parallel = _start_tensor_parallel(args, device)
    if parallel is None:
        return None
    device, rank, channel = parallel
    loaded = _load_model(args, device)
    if loaded is None:
        return None
    model, tokenizer = loaded
    if channel is not None:
        from paiton.models.tensor_parallel import shard_qwen3

        shard_qwen3(model)
        _progress(f"sharded over {channel.ranks} ranks: {model.config.num_attention_heads} query and "
                  f"{model.config.num_key_value_heads} KV heads here")
    return device, rank, channel, model, tokenizer


def _follow(target, channel) -> int:
    """A follower rank's whole run: rank 0's steps on `target` until it stops (0) or fails (1)."""
    from paiton.models.tp_runtime import TensorParallelError

    _progress("running rank 0's steps")
    try:
        channel.follow(target)
    except TensorParallelError as error:
        _progress(str(error))
        return 1
    return 0


def _fused_ops_ran_as(device: str) -> str:
    from paiton.fusion.rms_norm import _rms_norm_kernel
    from paiton.fusion.triton_utils import is_interpreted

    if device != "cpu":
        return "Triton kernels"
    return "Triton kernels in Triton's CPU interpreter" if is_interpreted(_rms_norm_kernel) else "CPU reference code"


def demo(args: argparse.Namespace) -> int:
    import os

    import torch

    if args.inner == "eager" and args.mode != "default":
        _progress(f"--mode {args.mode} needs the Inductor inner compiler (CUDA graphs, autotuning are Inductor's)")
        return 2

    import paiton
    from paiton.models.hf_loop import hf_static_cache_greedy
    from paiton.models.qwen3 import QWEN3_PRESETS, build_qwen3

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _progress("no CUDA/ROCm device here; use --device cpu")
        return 2
    model_name = args.model or ("qwen3-8b" if device.startswith("cuda") else "tiny")
    if model_name not in QWEN3_PRESETS:
        _progress(f"unknown model {model_name!r}; presets: {', '.join(sorted(QWEN3_PRESETS))}")
        return 2
    dtype = getattr(torch, DTYPES[args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")])
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}

    if device == "cpu":
        # Run Paiton's Triton kernels on CPU in Triton's interpreter (set before the kernels are
        # imported), so the parity shown is the kernels' and not the CPU reference's.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _progress(f"building {model_name} ({dtype}, random weights) on {device}")
    model = build_qwen3(model_name, device=device, dtype=dtype, **overrides)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=generator).to(device)

    options = {"paiton.inner_compiler": args.inner} if args.inner != "inductor" else None
    compiled = torch.compile(model, backend="paiton", mode=None if args.mode == "default" else args.mode, options=options)

    _progress("eager run")
    expected = hf_static_cache_greedy(model, model, input_ids, args.new_tokens)
    _progress(f"compiling with backend='paiton' ({args.inner} inner compiler, mode={args.mode}) and running")
    start = time.perf_counter()
    # Fed eager's tokens (teacher forcing): every step compares the same computation.
    actual = hf_static_cache_greedy(compiled, model, input_ids, args.new_tokens, follow=expected)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    first_run_s = time.perf_counter() - start

    print(f"\nPaiton {paiton.__version__}: {model_name}, {model.config.num_hidden_layers} layers, {dtype}, {device}, "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"fused ops ran as: {_fused_ops_ran_as(device)}; compile + first run: {first_run_s:.1f} s\n")
    print("| graph | " + " | ".join(paiton.PASS_NAMES) + " |")
    print("|---|" + "---|" * len(paiton.PASS_NAMES))
    for graph in paiton.fusion_graphs(model):
        print(f"| {graph.compile_id} | " + " | ".join(str(graph.counts.get(n, 0)) for n in paiton.PASS_NAMES) + " |")

    layers = model.config.num_hidden_layers
    print(f"expected per graph: fused_add_rms_norm={2 * layers}, rms_norm={2 * layers + 1} (4 norms a layer + final), "
          f"qk_norm_rope={layers}, swiglu={layers}, decode_attention={layers} (in graphs of up to 8 query tokens), "
          f"kv_cache_write={layers} and cache_counters={2 * layers} (StaticCache), "
          f"one_row_linear={2 * layers + 1} and silu_mul_linear={layers} (batch-1 decode), "
          f"few_rows_linear={2 * layers + 1} (decode at batch 2-64)")

    runs = {"paiton": actual}
    if args.compare_inductor:
        _progress(f"compiling with stock Inductor (mode={args.mode}) for comparison")
        torch._dynamo.reset()  # also drops Paiton's records, printed above
        inductor = torch.compile(model, mode=None if args.mode == "default" else args.mode)
        runs["stock inductor"] = hf_static_cache_greedy(inductor, model, input_ids, args.new_tokens, follow=expected)

    print("\nparity with eager (each compiled run fed eager's greedy tokens):\n")
    print("| compiled with | max abs logit diff, prefill | max, decode steps | argmax agrees with eager |")
    print("|---|---|---|---|")
    tokens_expected = torch.stack([e.argmax(-1) for e in expected], dim=1)
    for name, logits in runs.items():
        diffs = [(a.float() - e.float()).abs().max().item() for a, e in zip(logits, expected)]
        agree = (torch.stack([a.argmax(-1) for a in logits], dim=1) == tokens_expected).float().mean().item()
        print(f"| {name} | {diffs[0]:.3g} | {max(diffs[1:], default=0):.3g} | {100 * agree:.1f}% |")
    if dtype != torch.float32:
        print("\n(In bf16 compiled code keeps fp32 intermediates where eager rounds, so compiled runs drift from "
              "eager; random weights make argmax near-ties common. Compare Paiton's row with stock Inductor's.)")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Stream tokens from the bundled decode loop, then print each sequence and its timings."""
    import os

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _progress("no CUDA/ROCm device here; use --device cpu")
        return 2
    if device == "cpu" and args.backend == "paiton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Paiton's kernels, interpreted (see `demo`)
    from paiton.models.decode_loop import DecodeLoop, Sampling

    started = time.perf_counter()
    ready = _model_on_this_rank(args, device)
    if ready is None:
        return 2
    device, rank, channel, model, tokenizer = ready
    if args.prompt is not None:
        if tokenizer is None:
            _progress("--prompt needs a checkpoint directory with a tokenizer; give --prompt-ids instead")
            return 2
        prompts = [tokenizer(args.prompt).input_ids]
    elif args.prompt_ids:
        try:
            prompts = [[int(t) for t in ids.split(",") if t.strip()] for ids in args.prompt_ids]
        except ValueError:
            _progress("--prompt-ids takes comma-separated integers, e.g. --prompt-ids 1,2,3")
            return 2
    else:
        _progress("give --prompt-ids (or --prompt with a checkpoint that has a tokenizer)")
        return 2
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        _progress(f"token ids must be in [0, {vocab})")
        return 2

    options = {"paiton.inner_compiler": args.inner} if args.backend == "paiton" and args.inner != "inductor" else None
    mode = "auto" if args.mode == "auto" else (None if args.mode == "default" else args.mode)
    max_length = args.max_length or max(64, 2 ** (max(len(p) for p in prompts) + args.max_new_tokens - 1).bit_length())
    # Every rank parses the same arguments, so every rank builds the same loop.
    loop = DecodeLoop(model, max_batch_size=len(prompts), max_length=max_length, backend=args.backend, mode=mode,
                      options=options)
    if rank != 0:
        return _follow(loop, channel)
    _progress(f"model ready in {time.perf_counter() - started:.1f} s; the first prefill and decode step compile "
              f"({args.backend}), later ones replay")
    stop = [int(t) for t in args.stop_token_ids.split(",")] if args.stop_token_ids else []
    if tokenizer is not None and tokenizer.eos_token_id is not None and not stop:
        stop = [tokenizer.eos_token_id]

    def show(sequence, token, seconds):
        text = tokenizer.decode([token]) if tokenizer is not None else str(token)
        print(f"[{seconds * 1e3:9.1f} ms] seq {sequence}: {text}", file=sys.stderr, flush=True)

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    with channel.leading(loop) if channel is not None else contextlib.nullcontext():  # TP: rank 0 broadcasts each step
        result = loop.generate(prompts, args.max_new_tokens, sampling, stop_token_ids=stop,
                               on_token=show if args.stream else None)
    for b, tokens in enumerate(result.tokens):
        text = tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens))
        print(f"seq {b} ({result.finish_reasons[b]}, {len(tokens)} tokens): {text}")
        print(f"  TTFT {result.ttft_s[b] * 1e3:.1f} ms (includes compiling on a first call), "
              f"TPOT {result.tpot_s[b] * 1e3:.2f} ms, E2E {result.e2e_s[b] * 1e3:.1f} ms")
    return 0


def _load_model(args: argparse.Namespace, device: str):
    """(model, its tokenizer or None) from --checkpoint or the --model preset, in --dtype (default
    bf16 on a GPU, fp32 on CPU); None after saying what is wrong (a bad checkpoint, an unknown preset)."""
    import torch

    from paiton.models.checkpoint import CheckpointError, load_qwen3_checkpoint
    from paiton.models.qwen3 import QWEN3_PRESETS, build_qwen3

    dtype = getattr(torch, DTYPES[args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")])
    if args.checkpoint:
        _progress(f"loading {args.checkpoint} onto {device} as {dtype}")
        try:
            return load_qwen3_checkpoint(args.checkpoint, device=device, dtype=dtype)
        except CheckpointError as error:
            _progress(str(error))
            return None
    if args.model not in QWEN3_PRESETS:
        _progress(f"unknown model {args.model!r}; presets: {', '.join(sorted(QWEN3_PRESETS))}")
        return None
    _progress(f"building {args.model} with random weights on {device} as {dtype}")
    return build_qwen3(args.model, device=device, dtype=dtype, seed=args.seed), None


def _compile_options(pairs: list[str]) -> dict:
    """KEY=VALUE pairs of --compile-option as torch.compile options (true/false, ints, floats, strings)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--compile-option takes KEY=VALUE, got {pair!r}")
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[key] = lowered == "true"
        else:
            try:
                options[key] = int(value)
            except ValueError:
                try:
                    options[key] = float(value)
                except ValueError:
                    options[key] = value
    return options


def _compile_cache_key(args: argparse.Namespace, device: str, options: dict) -> dict:
    """What a server's compile cache is made for (backends/compile_cache.py's `made_for`): the
    model and configuration its graphs come from and the static shapes in them."""
    import torch

    return dict(model=os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint else args.model,
                dtype=args.dtype, device=device, backend=args.backend, mode=args.mode, options=dict(options),
                fp8=bool(args.fp8), fp8_lm_head=bool(args.fp8_lm_head), max_slots=args.max_slots, max_model_len=args.max_model_len,
                max_prefill_tokens=args.max_prefill_tokens,
                tensor_parallel=args.tensor_parallel or int(os.environ.get("WORLD_SIZE", "1")),
                torch=torch.__version__)


def serve(args: argparse.Namespace) -> int:
    """Build the model, its tokenizer and the continuous-batching engine; serve the OpenAI API."""
    import torch

    from paiton.models.engine import Engine
    from paiton.models.server import run_server
    from paiton.models.tokenizer import TokenizerInfo, stand_in_tokenizer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _progress("no CUDA/ROCm device here; use --device cpu")
        return 2
    try:
        options = _compile_options(args.compile_option)
    except ValueError as error:
        _progress(str(error))
        return 2
    if args.backend == "paiton" and args.inner != "inductor":
        options["paiton.inner_compiler"] = args.inner
    warmup = args.warmup if args.warmup is not None else device.startswith("cuda")
    if args.save_compile_cache and not warmup:
        _progress("--save-compile-cache saves what the warm-up compiled: leave out --no-warmup")
        return 2
    if missing := [path for path in args.load_compile_cache if not os.path.isfile(path)]:
        _progress(f"--load-compile-cache: no such file {', '.join(missing)}")
        return 2
    started = time.perf_counter()
    made_for = _compile_cache_key(args, device, options)
    if args.load_compile_cache:
        from paiton.backends.compile_cache import cache_mismatches, load_compile_cache

        notes = []
        for path in args.load_compile_cache:
            configuration, shapes = cache_mismatches(load_compile_cache(path), made_for)
            if configuration:
                notes.append(f"{path} is another configuration's ({', '.join(configuration)})")
            elif shapes:
                notes.append(f"{path} was made with other shapes, {', '.join(shapes)}: its graphs will not be "
                             "these (expect a cold compile; start with its shapes to use it)")
        _progress(f"compile cache loaded from {', '.join(args.load_compile_cache)} in {time.perf_counter() - started:.1f} s"
                  + "".join(f"; {note}" for note in notes))
    ready = _model_on_this_rank(args, device)
    if ready is None:
        return 2
    device, rank, channel, model, tokenizer = ready
    if args.fp8 or args.fp8_lm_head:
        from paiton.models.fp8 import is_fp8, quantize_fp8

        # An FP8 checkpoint is FP8 already, but for its lm_head when it came in the model's dtype.
        if not is_fp8(model) or (args.fp8_lm_head and type(getattr(model, "lm_head", None)) is torch.nn.Linear):
            try:
                quantize_fp8(model, include_lm_head=args.fp8_lm_head)
            except RuntimeError as error:  # a chip without FP8
                _progress(str(error))
                return 2
    mode = "auto" if args.mode == "auto" else (None if args.mode == "default" else args.mode)
    engine = Engine(model, max_slots=args.max_slots, max_length=args.max_model_len, backend=args.backend, mode=mode,
                    options=options or None, max_prefill_tokens=args.max_prefill_tokens)
    if rank != 0:  # rank 0 serves, schedules and warms up; this rank runs the same steps on its shard
        return _follow(engine, channel)
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint else args.model)
    if tokenizer is not None:
        info = TokenizerInfo(f"the checkpoint's ({type(tokenizer).__name__})", "checkpoint", len(tokenizer))
    else:
        if args.tokenizer:
            os.environ["PAITON_TOKENIZER"] = args.tokenizer
        _progress("loading the stand-in tokenizer (trained on ShareGPT V3 at first use, then cached)")
        try:
            tokenizer, info = stand_in_tokenizer(model.config.vocab_size)
        except (RuntimeError, ValueError) as error:
            _progress(str(error))
            return 2
    _progress(f"model ready in {time.perf_counter() - started:.1f} s: {name}, tokenizer: {info.name}; "
              f"{args.max_slots} slots x {args.max_model_len} tokens, backend {args.backend}"
              + (", FP8 weights" if args.fp8 or args.fp8_lm_head else "") + (" (lm_head too)" if args.fp8_lm_head else "")
              + (f", tensor parallel {channel.ranks}" if channel else "")
              + (f" {options}" if options else "") + (", warming up (compiling) first" if warmup else
                                                      "; the first requests compile"))
    after_warmup = None
    if args.save_compile_cache:
        def after_warmup():
            from paiton.backends.compile_cache import save_compile_cache

            save_compile_cache(args.save_compile_cache, [], made_for)
            return (f"compile cache saved to {args.save_compile_cache} "
                    f"({os.path.getsize(args.save_compile_cache) / 2**20:.1f} MiB)")
    if channel is None:
        return run_server(engine, tokenizer, info, name, args.host, args.port, warmup=warmup, after_warmup=after_warmup,
                          stack_dump_s=args.warmup_stack_dumps)
    from paiton.models.tp_runtime import end_server_on_step_error

    # A failed step (a rank died, or hangs past --tp-timeout) ends the server: the ranks may be out of step.
    failure = end_server_on_step_error(engine, channel)
    with channel.leading(engine):  # every step the engine runs is broadcast to the other ranks first
        run_server(engine, tokenizer, info, name, args.host, args.port, warmup=warmup, after_warmup=after_warmup,
                   stack_dump_s=args.warmup_stack_dumps)
    if error := failure():
        _progress(f"stopped: a tensor-parallel step failed ({type(error).__name__}: {error})")
        # Exit now, without the interpreter's teardown: the process group still holds gloo's
        # connection to the rank that died, and destroying it at exit can abort the process
        # ("terminate called without an active exception": status -6 instead of 1, seen once
        # in a CPU suite run of test_tensor_parallel_serving.py, 2026-12-06). Nothing of this
        # process is usable after a failed step; its output is flushed first.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 0


def _add_tensor_parallel_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--tensor-parallel", type=int, metavar="N",
                         help="shard the model over N processes, one per GPU, started by torchrun --nproc-per-node N "
                              "(default: torchrun's WORLD_SIZE); rank 0 schedules")
    command.add_argument("--tp-timeout", type=float, default=300.0, metavar="SECONDS",
                         help="under tensor parallelism: how long a collective waits for a rank before failing")


def build_parser() -> argparse.ArgumentParser:
    """The `paiton` command line: demo, generate, serve."""
    parser = argparse.ArgumentParser(prog="paiton", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo", help="compile a random Qwen3 with paiton; show fusions and parity with eager")
    p.add_argument("--model", help="preset: tiny, qwen3-0.6b ... qwen3-32b (default: tiny on CPU, qwen3-8b on GPU)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--layers", type=int, help="override the preset's layer count (a shorter model, same layer shape)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--inner", choices=["inductor", "eager"], default="inductor", help="compiler for what Paiton does not fuse")
    p.add_argument("--mode", default="default", help="torch.compile mode: default, reduce-overhead, max-autotune, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare-inductor", dest="compare_inductor", action="store_false",
                   help="skip the stock-Inductor run shown beside Paiton's parity")
    p.set_defaults(run=demo)

    g = commands.add_parser("generate", help="generate with the bundled decode loop (a preset or a local checkpoint)")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--model", default="tiny", help="preset with random weights (default: tiny)")
    source.add_argument("--checkpoint", help="a local Hugging Face Qwen3 directory (safetensors)")
    g.add_argument("--prompt-ids", action="append", help="comma-separated token ids; repeat for a batch")
    g.add_argument("--prompt", help="text (needs a checkpoint with a tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--max-length", type=int, help="static cache length (default: the next power of two that fits)")
    g.add_argument("--backend", default="paiton", help="paiton (default), inductor, eager (no compile), any torch.compile backend")
    g.add_argument("--inner", choices=["inductor", "eager"], default="inductor", help="paiton's inner compiler")
    g.add_argument("--mode", default="auto", help="auto (reduce-overhead on GPU), default, reduce-overhead, ...")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", choices=sorted(DTYPES))
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop-token-ids", help="comma-separated (default: the tokenizer's EOS, if any)")
    g.add_argument("--no-stream", dest="stream", action="store_false", help="print only the result, not each token")
    _add_tensor_parallel_arguments(g)
    g.set_defaults(run=generate)

    s = commands.add_parser("serve", help="an OpenAI-compatible server (continuous batching) over a preset or checkpoint")
    source = s.add_mutually_exclusive_group()
    source.add_argument("--model", default="tiny", help="preset with random weights (default: tiny)")
    source.add_argument("--checkpoint", help="a local Hugging Face Qwen3 directory (safetensors; its tokenizer)")
    s.add_argument("--served-model-name", help="the name clients ask for (default: the preset or directory name)")
    s.add_argument("--tokenizer", help="a tokenizer.json for a preset (default: the ShareGPT-trained stand-in)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (the one taken is printed)")
    s.add_argument("--max-slots", type=int, default=32, help="sequences decoded at once (the continuous batch)")
    s.add_argument("--max-model-len", type=int, default=2048, help="prompt + output tokens per sequence (the cache length)")
    s.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens one prefill step packs")
    s.add_argument("--backend", default="paiton", help="paiton (default), inductor, eager (no compile), any torch.compile backend")
    s.add_argument("--inner", choices=["inductor", "eager"], default="inductor", help="paiton's inner compiler")
    s.add_argument("--mode", default="auto", help="auto (reduce-overhead on GPU), default, reduce-overhead, ...")
    s.add_argument("--compile-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch.compile option (repeatable), e.g. coordinate_descent_tuning=true")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", choices=sorted(DTYPES))
    s.add_argument("--seed", type=int, default=0, help="the presets' random weights")
    s.add_argument("--fp8", action="store_true", help="FP8 weights: every decoder linear per channel (paiton.quantize_fp8)")
    s.add_argument("--fp8-lm-head", action="store_true",
                   help="--fp8 and the lm_head too (quantize_fp8's include_lm_head: its bytes halved, at the accuracy "
                        "bench/results/fp8_accuracy-*.md reports with --lm-head)")
    s.add_argument("--load-compile-cache", action="append", default=[], metavar="FILE",
                   help="compile artifacts an earlier start saved (repeatable): the warm-up compiles from them")
    s.add_argument("--save-compile-cache", metavar="FILE",
                   help="after the warm-up, save what it compiled (Inductor and AOTAutograd caches, xz) to FILE")
    s.add_argument("--warmup", dest="warmup", action="store_true", default=None,
                   help="compile and record CUDA graphs before serving (default on a GPU)")
    s.add_argument("--no-warmup", dest="warmup", action="store_false")
    s.add_argument("--warmup-stack-dumps", type=float, metavar="SECONDS",
                   default=float(os.environ.get("PAITON_WARMUP_STACK_DUMPS", "0")),
                   help="while warming up, print every thread's stack each SECONDS (where a long warm-up "
                        "spends its time; default: $PAITON_WARMUP_STACK_DUMPS, else off)")
    _add_tensor_parallel_arguments(s)
    s.set_defaults(run=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("serve", "generate"):
        if args.tensor_parallel is not None and args.tensor_parallel < 1:
            parser.error("--tensor-parallel must be at least 1")
        if args.tp_timeout <= 0:
            parser.error("--tp-timeout must be positive")
    if args.command == "serve":
        for name in ("max_slots", "max_model_len", "max_prefill_tokens"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        return args.run(args)
    if args.command == "generate":
        if args.max_new_tokens < 1:
            parser.error("--max-new-tokens must be at least 1")
        return args.run(args)
    for name in ("batch", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

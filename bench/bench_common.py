"""What the benchmark scripts share: the configurations they compare (one bundled decode loop
each), writing a result as JSON (every raw number) and a markdown table side by side, under one
file stem; comparing generated tokens with eager's."""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# eager; stock Inductor with mode "reduce-overhead" (on a GPU); the strongest stock setting we
# know (gpt-fast's: reduce-overhead plus coordinate descent tuning, under which Inductor also
# turns a one-row matmul into a tuned Triton reduction); Paiton; Paiton with that same setting
# for what Inductor still generates around Paiton's kernels. A Paiton configuration may switch
# passes off by name: "paiton-cdt-no-merged_projections-no-swiglu" (experiments on which
# fusions pay at which batch size).
# "paiton-fp8": Paiton on an FP8 copy of the model (models/fp8.py: decoder linears per channel);
# "paiton-fp8-head": the same with the lm_head in FP8 too (quantize_fp8's include_lm_head).
# "-pdl" after a Paiton configuration's name ("paiton-pdl", "paiton-fp8-pdl"): its kernels launched
# with programmatic dependent launch (PAITON_PDL=1 while it compiles and runs: fusion/pdl.py; the
# others run with PAITON_PDL unset, as Paiton does by default). "-l2pf" likewise: the l2_prefetch
# pass runs and the norm and rotary kernels prefetch the next product's weight into L2
# (PAITON_L2_PREFETCH=1: fusion/l2_prefetch.py). "-nl" likewise: the norm_linear pass runs, the
# decode step's norms inside its one-row products (PAITON_NORM_LINEAR=1: fusion/norm_linear.py).
# "-notma": the few-rows GEMM's launches that read W by tensor descriptor left out of its timing
# (PAITON_W_TMA=0: fusion/few_rows_gemm.py), an A/B of them in one process.
# They may follow one name, in that order ("paiton-fp8-pdl-l2pf-nl-notma").
CONFIGS = ("eager", "inductor", "inductor-cdt", "paiton", "paiton-cdt", "paiton-fp8", "paiton-fp8-head")
FP8_HEAD = "-fp8-head"
PDL_SUFFIX = "-pdl"
L2_PREFETCH_SUFFIX = "-l2pf"
NORM_LINEAR_SUFFIX = "-nl"
NO_W_TMA_SUFFIX = "-notma"


def _launch_switches(base: str) -> tuple[str, dict[str, bool]]:
    """(the configuration without its launch suffixes, {suffix: present})."""
    present = {}
    for suffix in (NO_W_TMA_SUFFIX, NORM_LINEAR_SUFFIX, L2_PREFETCH_SUFFIX, PDL_SUFFIX):  # the reverse of their order in a name
        present[suffix] = base.endswith(suffix)
        base = base.removesuffix(suffix)
    return base, present


def is_config(config: str) -> bool:
    from paiton.passes.pass_manager import PASS_NAMES

    base, *off = config.split("-no-")
    base, switches = _launch_switches(base)
    return (base in CONFIGS and (not (off or any(switches.values())) or base.startswith("paiton"))
            and set(off) <= set(PASS_NAMES))


def uses_pdl(config: str) -> bool:
    return _launch_switches(config.split("-no-")[0])[1][PDL_SUFFIX]


def uses_l2_prefetch(config: str) -> bool:
    return _launch_switches(config.split("-no-")[0])[1][L2_PREFETCH_SUFFIX]


def uses_norm_linear(config: str) -> bool:
    return _launch_switches(config.split("-no-")[0])[1][NORM_LINEAR_SUFFIX]


def without_w_tma(config: str) -> bool:
    return _launch_switches(config.split("-no-")[0])[1][NO_W_TMA_SUFFIX]


def fp8_lm_head(config: str) -> bool:
    """Whether a configuration's FP8 weights take the lm_head too ("paiton-fp8-head...")."""
    return _launch_switches(config.split("-no-")[0])[0].endswith(FP8_HEAD)


def floor_key(config: str) -> str:
    """The env entry holding the floor of the weights a configuration reads: fp8_head_floor_us,
    fp8_floor_us (fp8_floor_fields) or floor_us (floor_fields)."""
    if "-fp8" not in config:
        return "floor_us"
    return "fp8_head_floor_us" if fp8_lm_head(config) else "fp8_floor_us"


@contextlib.contextmanager
def config_environment(config: str):
    """The environment a configuration runs in, restored after: PAITON_PDL=1 for a "-pdl" one,
    PAITON_L2_PREFETCH=1 for a "-l2pf" one, PAITON_NORM_LINEAR=1 for a "-nl" one, PAITON_W_TMA=0
    for a "-notma" one; for the others those unset, so they run as Paiton does by default (one
    process may run several kinds)."""
    from paiton.fusion.few_rows_gemm import W_TMA_ENV
    from paiton.fusion.l2_prefetch import PREFETCH_ENV
    from paiton.fusion.pdl import PDL_ENV
    from paiton.passes.norm_linear import NORM_LINEAR_ENV

    wanted = {PDL_ENV: "1" if uses_pdl(config) else None, PREFETCH_ENV: "1" if uses_l2_prefetch(config) else None,
              NORM_LINEAR_ENV: "1" if uses_norm_linear(config) else None, W_TMA_ENV: "0" if without_w_tma(config) else None}
    before = {name: os.environ.pop(name, None) for name in wanted}
    os.environ.update({name: value for name, value in wanted.items() if value is not None})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parse_configs(parser, text: str) -> list[str]:
    """The comma-separated configurations of a --configs argument; an unknown one is a usage
    error naming the known ones."""
    configs = text.split(",")
    if unknown := [c for c in configs if not is_config(c)]:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    return configs


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def add_run_arguments(parser) -> None:
    """--device, --paiton-inner and --out, as the profilers take them."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paiton-inner", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--out", default=RESULTS_DIR)


def parse_model_and_configs(parser, args) -> list[str]:
    """args.configs as a list (parse_configs); an unknown --model preset is a usage error."""
    from paiton.models.qwen3 import QWEN3_PRESETS

    if args.model not in QWEN3_PRESETS:
        parser.error(f"unknown preset {args.model!r}; presets: {', '.join(QWEN3_PRESETS)}")
    return parse_configs(parser, args.configs)


def run_environment(device: str) -> dict:
    """What a result file records about the run: date, commit (PAITON_COMMIT: the device machine's
    copy of the checkout may carry a stale git history, so git is not asked), card, driver and
    the versions of python, torch, triton and transformers."""
    import datetime
    import platform
    import subprocess

    import torch
    import transformers
    import triton

    card, driver = "CPU", None
    if device.startswith("cuda"):
        card = torch.cuda.get_device_properties(0).name
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            driver = subprocess.run(query, capture_output=True, text=True).stdout.strip() or None
        except FileNotFoundError:  # ROCm
            driver = None
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=os.environ.get("PAITON_COMMIT", "unknown"), card=card, driver=driver,
                python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__)


# Where a configuration's compile time goes, from torch._dynamo's own timers (seconds summed per
# timed function; dynamo's total holds tracing and the backend, the backend holds AOTAutograd,
# Paiton's passes, Inductor's code generation and the waits on kernel builds, or on a cache hit
# the loading of the cached graph) and the compile caches' counters. What the warm-up spends outside dynamo is the
# first runs: Triton's JIT of kernels called outside Inductor's code, autotuning done at a
# kernel's first call (coordinate descent, Paiton's one-row choices), CUDA graph recording.
COMPILE_TIMERS = {
    "dynamo": "_compile.compile_inner",
    "tracing": "bytecode_tracing",
    "backend": "OutputGraph.call_user_compiler",
    "inductor_codegen": "GraphLowering.compile_to_module",
    "kernel_builds": "async_compile.wait",
}
COMPILE_CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                          ("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_hit"),
                          ("aot_autograd", "autograd_cache_miss"), ("aot_autograd", "autograd_cache_bypass"))


def launch_name(config) -> str:
    """A kernel launch's short name for a sweep's tables: "64x128 w4 s4", then every other key of
    the launch in its order, a flag by its name ("swap_ab") and a number with it ("splits=2"), so
    launches differing in any key get different names; a string (the vendor's) stays itself."""
    if isinstance(config, str):
        return config
    base = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    extra = "".join(f" {key.lower()}" + ("" if value is True else f"={value}")
                    for key, value in config.items() if key not in base and value)
    return f"{config['BLOCK_N']}x{config['BLOCK_K']} w{config['num_warps']} s{config['num_stages']}" + extra


def rounds_at(batch: int, rounds: int | None, rounds_from: tuple[int, int] | list[int] | None) -> int | None:
    """The rounds (requests = rounds x B) that batch size B runs: `rounds`, or from batch size
    `rounds_from[0]` on `rounds_from[1]` (the reference protocol's "every slot used at least twice
    at 64 and 128" without twice the requests at the small sizes)."""
    if rounds_from and rounds is not None and batch >= rounds_from[0]:
        return rounds_from[1]
    return rounds


def requests_per_batch_line(env: dict) -> str:
    """How many requests each batch size ran, in words (a results file's environment)."""
    if not env.get("rounds"):
        return f"{env['num_prompts']} requests at every batch size"
    text = f"{env['rounds']} x B requests at batch size B"
    if env.get("rounds_from"):
        start, rounds = env["rounds_from"]
        text += f" ({rounds} x B from batch size {start} on)"
    if env.get("min_prompts"):
        text += f", at least {env['min_prompts']}"
    return text + f" (from a pool of {env['num_prompts']})"


def compile_clock() -> dict:
    """A snapshot of the compile timers and cache counters above, for `compile_breakdown`."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    snapshot = {name: sum(compilation_time_metrics.get(timer, ())) for name, timer in COMPILE_TIMERS.items()}
    snapshot.update({counter: counters[group][counter] for group, counter in COMPILE_CACHE_COUNTERS})
    return snapshot


def compile_breakdown(before: dict, after: dict, wall_s: float) -> dict:
    """What happened between two `compile_clock` snapshots around a warm-up of `wall_s` seconds:
    each timer's seconds and counter's count, and the seconds spent outside dynamo."""
    spent = {name: after[name] - before[name] for name in after}
    spent["outside_dynamo"] = wall_s - spent["dynamo"]
    return spent


def compile_breakdown_markdown(rows: list[dict]) -> str:
    """One line per row whose warm-up compiled something (dynamo ran over a second), for a
    results table's notes ("" when none did)."""
    lines = [f"- batch {r['batch']}, {r.get('label', r['config'])}: {r['compile_s']:.0f} s = dynamo {b['dynamo']:.0f} s (tracing "
             f"{b['tracing']:.0f}, backend {b['backend']:.0f}; Inductor's code generation {b['inductor_codegen']:.0f}, "
             f"waiting on kernel builds {b['kernel_builds']:.0f}) + first runs {b['outside_dynamo']:.0f} s; caches: FX graph "
             f"{b['fxgraph_cache_hit']} hit / {b['fxgraph_cache_miss']} miss / {b['fxgraph_cache_bypass']} bypass, "
             f"AOTAutograd {b['autograd_cache_hit']} / {b['autograd_cache_miss']} / {b['autograd_cache_bypass']}"
             for r in rows if (b := r.get("compile_breakdown")) and b["dynamo"] > 1]
    if not lines:
        return ""
    return "\n".join(["", "Compile time by phase (torch._dynamo's timers; the first runs are Triton's JIT, "
                      "autotuning at first call and CUDA graph recording):", ""] + lines) + "\n"


def copy_rate_tbps(device: str, nbytes: int = 2 * 2**30) -> float | None:
    """The card's device-to-device copy rate in TB/s, bytes read plus bytes written (median of
    a buffer copy far larger than L2, as ../shared/baseline measures it); None off the GPU.
    The decode floor is the weights' bytes over this rate: one read of every weight."""
    import torch

    if not device.startswith("cuda"):
        return None
    from triton.testing import do_bench

    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e12


def versions_line(env: dict) -> str:
    """"<date>, commit <commit>, torch <v>, triton <v>, <dtype>": how a results table begins."""
    return f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, {env['dtype']}"


def floor_fields(model, device: str) -> dict:
    """A results file's env entries for the decode floor: weight_bytes, and on a GPU the copy
    rate measured now (copy_TBps) and weight bytes over it (floor_us), which `floor_lines` writes."""
    fields = dict(weight_bytes=weight_bytes(model))
    if rate := copy_rate_tbps(device):
        fields.update(copy_TBps=rate, floor_us=fields["weight_bytes"] / (rate * 1e12) * 1e6)
    return fields


def fp8_floor_fields(model, copy_bytes_per_s: float | None, lm_head: bool = False) -> dict:
    """A results file's env entries for the FP8 copy's floor beside the model's (an -fp8
    configuration's weights): its weight bytes, and those over the measured copy rate (None off
    the GPU); with `lm_head` also those of the copy whose lm_head is FP8 (fp8_head_*)."""
    def fields(prefix, nbytes):
        return {f"{prefix}_weight_bytes": nbytes,
                f"{prefix}_floor_us": nbytes / copy_bytes_per_s * 1e6 if copy_bytes_per_s else None}

    return {**fields("fp8", fp8_weight_bytes(model)),
            **(fields("fp8_head", fp8_weight_bytes(model, lm_head=True)) if lm_head else {})}


def fp8_weight_bytes(model, lm_head: bool = False) -> int:
    """weight_bytes of `model` quantized as quantize_fp8 does it (every bias-free linear of the
    decoder layers, and the lm_head if `lm_head`: one byte an element and an fp32 scale per
    output row), counted without making the FP8 copy (a Qwen3-32B on an 80 GB card cannot hold
    both); the decoder's own count if it is FP8 already. A tied lm_head quantized adds its FP8
    copy (the embedding stays)."""
    import torch

    from paiton.models.fp8 import is_fp8, quantizable_linears

    def quantized_bytes(weight) -> int:  # one byte an element, an fp32 scale a row
        return weight.numel() + weight.shape[0] * 4

    total = weight_bytes(model)
    if not is_fp8(model):
        for layer in getattr(getattr(model, "model", model), "layers", ()):
            for _, _, linear in quantizable_linears(layer):
                total += quantized_bytes(linear.weight) - linear.weight.nbytes
    head = getattr(model, "lm_head", None)
    if lm_head and type(head) is torch.nn.Linear:
        w = head.weight
        tied = w.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # weight_bytes counted it once
        total += quantized_bytes(w) - (0 if tied else w.nbytes)
    return total


def floor_lines(env: dict) -> list[str]:
    """The decode floor's markdown line (`floor_fields`), or none off the GPU."""
    if not env.get("floor_us"):
        return []
    return [f"Floor: {env['weight_bytes'] / 1e9:.2f} GB of weights over the measured copy rate {env['copy_TBps']:.2f} TB/s "
            f"(read+write) = {env['floor_us']:.0f} us per step.", ""]


def weight_bytes(model) -> int:
    """Bytes of every parameter (a tied lm_head counted once), as ../shared/baseline counts them
    for the issue's floor. The embedding table is in it, though a decode step reads one row of
    it: 1.24 GB of Qwen3-8B's 16.38 (untied)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def compile_settings(config: str, device: str, paiton_inner: str = "inductor") -> tuple[str, dict]:
    """(backend, torch.compile keyword arguments) for a compiled one of CONFIGS; on a GPU every
    one of them uses CUDA graphs."""
    cudagraphs = {"triton.cudagraphs": True} if device.startswith("cuda") else {}
    mode = {"mode": "reduce-overhead"} if device.startswith("cuda") else {}
    if not is_config(config) or config == "eager":
        raise ValueError(f"unknown compiled configuration {config!r}; choose from {', '.join(CONFIGS[1:])}")
    config, *off = config.split("-no-")
    config = _launch_switches(config)[0].removesuffix(FP8_HEAD).removesuffix("-fp8")  # the launches or the weights differ, not the compile
    passes_off = {f"paiton.{name}": False for name in off}
    if config.startswith("paiton") and paiton_inner == "eager":
        return "paiton", {"options": {"paiton.inner_compiler": "eager", **passes_off}}
    if passes_off and config == "paiton":
        return "paiton", {"options": {**passes_off, **cudagraphs}}
    if config in ("inductor", "paiton"):
        return config, mode
    if config in ("inductor-cdt", "paiton-cdt"):
        return config[:-4], {"options": {"coordinate_descent_tuning": True, **passes_off, **cudagraphs}}
    raise AssertionError(config)


_FP8_COPIES: dict[tuple[int, bool], object] = {}


def model_for(model, config: str):
    """`model`, or for an FP8 configuration its FP8 copy (made once per model, sharing the rest;
    an -fp8-head configuration's copy shares the -fp8 copy's decoder weights, its lm_head FP8)."""
    if "-fp8" not in config:
        return model
    from paiton.models.fp8 import fp8_copy, is_fp8

    head = fp8_lm_head(config)
    if is_fp8(model) and not head:  # quantized in place already (profile_decode_step --fp8-in-place)
        return model
    key = (id(model), head)
    if key not in _FP8_COPIES:
        _FP8_COPIES[key] = fp8_copy(model_for(model, "paiton-fp8"), include_lm_head=True) if head else fp8_copy(model)
    return _FP8_COPIES[key]


def make_loop(model, config: str, max_batch: int, max_length: int, device: str, paiton_inner: str = "inductor"):
    """A DecodeLoop for one of CONFIGS."""
    from paiton.models.decode_loop import DecodeLoop

    model = model_for(model, config)
    if config == "eager":
        return DecodeLoop(model, max_batch_size=max_batch, max_length=max_length, backend="eager")
    backend, kwargs = compile_settings(config, device, paiton_inner)
    return DecodeLoop(model, max_batch_size=max_batch, max_length=max_length, backend=backend,
                      mode=kwargs.get("mode"), options=kwargs.get("options"))


def make_engine(model, config: str, max_slots: int, max_length: int, device: str, paiton_inner: str = "inductor",
                **engine_kwargs):
    """A continuous-batching Engine (models/engine.py) for one of CONFIGS, compiled as make_loop's loop is;
    `engine_kwargs` go to the Engine (e.g. max_prefill_tokens)."""
    from paiton.models.engine import Engine

    model = model_for(model, config)
    if config == "eager":
        return Engine(model, max_slots=max_slots, max_length=max_length, backend="eager", **engine_kwargs)
    backend, kwargs = compile_settings(config, device, paiton_inner)
    return Engine(model, max_slots=max_slots, max_length=max_length, backend=backend, mode=kwargs.get("mode"),
                  options=kwargs.get("options"), **engine_kwargs)


# What a timed choice was measured against: bf16's vendor GEMM, or for FP8 weights (no vendor
# one-row FP8 product) the first candidate launch.
BASELINE_KEYS = (("vendor_us", "vendor"), ("first_candidate_us", "first candidate"), ("first_launch_us", "first launch"))


def baseline_text(record: dict) -> str:
    return next((f"{label} {record[key]:.1f} us" for key, label in BASELINE_KEYS if key in record), "no baseline")


def one_row_choices_markdown(records: list[dict]) -> str:
    """One line per shape of `paiton.fusion.gemv.chosen_launches()`: which kernel `choose` picked
    for each one-row product, from the card's measured table or timed at first use (so a
    result records what actually ran), for a results table's notes ("" when nothing was chosen)."""
    if not records:
        return ""
    lines = ["", "One-row products, as `choose` decided them (the card's table in backends/measured_gemv.py, "
             "or timed at first use: best of its rounds):", ""]
    for r in records:
        choice = r["choice"] if isinstance(r["choice"], str) else "GEMV " + ", ".join(f"{k}={v}" for k, v in r["choice"].items())
        how = f": {r['chosen_us']:.1f} us, {baseline_text(r)}" if "chosen_us" in r else (
            " (table)" if r.get("source") == "table" else "")
        # `dtype` is the input's; an FP8 weight's own dtype is named too (its line read "bfloat16" alone)
        weight = f", weight {r['weight_dtype']}" if r.get("weight_dtype") else ""
        lines.append(f"- {r['n']} x {r['k']} {r['dtype']}{weight}{' gated' if r['gated'] else ''}: {choice}{how}")
    return "\n".join(lines) + "\n"


def time_replays(graph: "torch.cuda.CUDAGraph", replays: int) -> list[float]:
    """Milliseconds of each of `replays` replays (events around each), after 3 unmeasured."""
    import torch

    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def write_results(out_dir: str, stem_name: str, result: dict, table: str, echo: bool = True) -> str:
    """Write <out_dir>/<stem_name>.json and .md; print the table (`echo`); return the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, stem_name)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)
    if echo:
        print(table)
    return stem


def grouped_bar_plot(path: str, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> None:
    """A PNG of bars: one group per key of `groups`, one bar per series inside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(name for values in groups.values() for name in values))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) * len(series) + 2), 4.5))
    for index, name in enumerate(series):
        xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [values.get(name, 0.0) for values in groups.values()], width, label=name)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8, rotation=30 if len(groups) > 6 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """The first position where `tokens` differs from `reference` (None: identical)."""
    for i, (x, y) in enumerate(zip(tokens, reference)):
        if x != y:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))

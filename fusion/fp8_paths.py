"""An FP8 linear of several rows (a decode step at batch 2 and more, a prefill): which of three
products computes y = x @ dequantize(W8, scales).T, chosen per shape.

    FP8_GEMM    Paiton's few-rows GEMM on the FP8 weight (fusion/few_rows_gemm.py): W read once, converted to x's dtype in
                registers, products on the matrix instructions in x's dtype (W8A16). 2-64 rows.
    SCALED_MM   x quantized per token by fusion/quantize_rows.py (one fp32 scale a row), then
                torch._scaled_mm(x8, W8.T, scale_a [M, 1], scale_b [1, N], out_dtype=bf16):
                cuBLASLt (or CUTLASS) on NVIDIA, hipBLASLt on ROCm, FP8 x FP8 on the tensor
                cores at twice bf16's rate (W8A8: each activation is also rounded to e4m3,
                about 2**-4 of itself; and Hopper's FP8 matrix units add in about 13 mantissa
                bits, promoted to fp32 every 128 products: measured up to 2**-7.5 of
                sum |x||w| on an H200, where the FP8 GEMM's fp32 sums are off by 2**-17). bf16 x, scales per output channel, K and N multiples of
                16: what _scaled_mm's row-wise scaling takes on every chip and torch from 2.5
                to 2.13 (out_dtype bf16 is the one output every row-wise kernel has: CUTLASS's
                and hipBLASLt's take no other). W8 [N, K] row-major is W8.T column-major, the
                layout _scaled_mm needs of its second operand: no copy. On gfx942 both operands
                are e4m3fnuz (largest 240), as _scaled_mm requires there.
    DEQUANTIZE  W dequantized to x's dtype (a write and a read of two bytes a weight), then
                torch's linear: every layout, every chip; the CPU's path.

Which paths a chip has, in their fallback order, is its lowering table's `several_rows`
(backends/lowering.py). `choose_path` picks among those that take the shape: timed on the GPU
once per (device, rows rounded up to a power of two, N, K, dtypes, scale layout), as the
one-row choice is (fusion/timing.py: back to back, host launches hidden, weights from memory),
and kept for the process (`chosen_paths()` lists the choices with their times). Not timed: on
a CPU, and while a CUDA graph is being captured (then the first path of the order runs, and
the choice waits for a later call).

Weight-only (PAITON_FP8_WEIGHT_ONLY=1 in the environment): SCALED_MM is never taken, so no
activation is rounded to FP8 at any row count. Without it the timing may pick SCALED_MM at 32
rows and more (Qwen3-32B's q/k/v and gate/up on an H100 at a88eea9) while 1-16 rows stay
weight-only: a request's greedy tokens can then depend on how many others share its decode
step, and a prefill's logits carry the activations' rounding too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

from paiton.fusion import few_rows_gemm as _few_rows
from paiton.fusion.few_rows_gemm import MAX_ROWS, few_rows_gemm
from paiton.fusion.gemv import ROW_SCALES, SCALE_BLOCK, scales_kind
from paiton.fusion.quantize_rows import quantize_rows, quantize_rows_reference
from paiton.fusion.swiglu import silu_mul
from paiton.fusion.timing import TIMING_ROUNDS, best_times, bucket_probe, cold_copies, rows_bucket, time_ms, timed_choices
from paiton.fusion.triton_utils import as_rows, device_guard

log = logging.getLogger(__name__)

FP8_GEMM, SCALED_MM, DEQUANTIZE = "fp8_gemm", "scaled_mm", "dequantize"
PATHS = (FP8_GEMM, SCALED_MM, DEQUANTIZE)
SCALED_MM_ALIGNMENT = 16  # K and N: _scaled_mm's check on CUDA and ROCm


def dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W8 * scales in fp32, rounded to `dtype` once: per row ([N] or [N, 1]) or per 128 x 128
    block ([ceil(N / 128), ceil(K / 128)]). (fusion/fp8_linear.py exports it beside quantize_weight.)"""
    kind = scales_kind(weight, scales)
    w = weight.float()
    if kind == ROW_SCALES:
        return (w * scales.reshape(-1, 1)).to(dtype)
    n, k = weight.shape
    full = scales.repeat_interleave(SCALE_BLOCK, 0)[:n].repeat_interleave(SCALE_BLOCK, 1)[:, :k]
    return (w * full).to(dtype)


def scaled_mm_unsupported(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> str | None:
    """Why SCALED_MM cannot take this product (None: it can)."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    if x.dtype != torch.bfloat16:
        return f"row-wise _scaled_mm gives bf16 only; x is {x.dtype}"
    if scales_kind(weight, scales) != ROW_SCALES:
        return "scales per 128 x 128 block (row-wise _scaled_mm takes one per output channel)"
    n, k = weight.shape
    if n % SCALED_MM_ALIGNMENT or k % SCALED_MM_ALIGNMENT:
        return f"N and K must be multiples of {SCALED_MM_ALIGNMENT}; W is [{n}, {k}]"
    if weight.stride(1) != 1 or weight.stride(0) < k:
        return f"W must be row-major (W.T column-major); strides {weight.stride()}"
    return None


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """SCALED_MM: x [..., K] quantized per row to W's FP8 format, then torch._scaled_mm with the
    rows' scales and W's per-channel scales, out in x's dtype (bf16)."""
    reason = scaled_mm_unsupported(x, weight, scales)
    if reason is not None:
        raise ValueError(f"paiton scaled_mm_linear: {reason}")
    n, k = weight.shape
    x8, x_scales = quantize_rows(as_rows(x), weight.dtype)
    y = torch._scaled_mm(x8, weight.t(), scale_a=x_scales.reshape(-1, 1), scale_b=scales.reshape(1, n),
                         out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], n)


def scaled_mm_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What SCALED_MM computes, emulated in float64: x quantized per row (the reference rule),
    both operands dequantized exactly, multiplied; not rounded to x's dtype."""
    x8, x_scales = quantize_rows_reference(x, weight.dtype)
    activations = x8.double() * x_scales.double()[..., None]
    return activations @ (weight.double() * scales.double().reshape(-1, 1)).T


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, swiglu_out: bool = False) -> torch.Tensor:
    """FP8_GEMM: the few-rows GEMM on the FP8 weight (`swiglu_out`: a gate/up packed weight,
    SwiGLU on its halves, in the kernel's last step or by silu_mul's kernel after it, as the
    choice times them). On a GPU its launch is the one few_rows_gemm.choose timed fastest for
    the shape and row count among the chip's `several_rows_candidates` (the lowering table's
    fp8_linear; the first is the untimed launch); elsewhere, and for a table without them, the
    untimed launch."""
    if x.is_cuda:
        from paiton.backends.lowering import lowering_for
        from paiton.backends.target import detect_target

        candidates = lowering_for("fp8_linear", detect_target(x.device)).params.get("several_rows_candidates")
        if candidates:
            config = _few_rows.choose(x, weight, candidates, scales=scales, swiglu_out=swiglu_out)
            if config != _few_rows.VENDOR:
                return _few_rows.launch_candidate(x, weight, config, scales, swiglu_out=swiglu_out)
    return few_rows_gemm(x, weight, scales, swiglu_out=swiglu_out)


def dequantize_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """DEQUANTIZE: torch's linear over W dequantized to x's dtype."""
    return torch.nn.functional.linear(x, dequantize(weight, scales, x.dtype))


RUNS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    FP8_GEMM: fp8_gemm, SCALED_MM: scaled_mm_linear, DEQUANTIZE: dequantize_linear,
}


def run_path(path: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
             swiglu_out: bool = False) -> torch.Tensor:
    """`path`'s product; with `swiglu_out` (a gate/up packed weight) silu_mul of its two halves:
    FP8_GEMM's launch applies it in its last step where its choice finds that faster, the other
    paths run silu_mul's kernel after the product."""
    if swiglu_out and path == FP8_GEMM:
        return fp8_gemm(x, weight, scales, swiglu_out=True)
    y = RUNS[path](x, weight, scales)
    return silu_mul(*y.chunk(2, dim=-1)) if swiglu_out else y


def weight_only() -> bool:
    """PAITON_FP8_WEIGHT_ONLY=1: no path that rounds the activations to FP8 (module docstring)."""
    return os.environ.get("PAITON_FP8_WEIGHT_ONLY", "0") == "1"


def eligible_paths(rows: int, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                   paths: Sequence[str]) -> list[str]:
    """The paths of `paths` (in order) that take this product, DEQUANTIZE last if it is not
    among them (it takes every product). FP8_GEMM: up to MAX_ROWS rows; SCALED_MM: as
    scaled_mm_unsupported says, and not under PAITON_FP8_WEIGHT_ONLY=1."""
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"paiton fp8 paths: unknown {sorted(unknown)}; paths are {list(PATHS)}")
    takes = {FP8_GEMM: rows_bucket(rows) <= MAX_ROWS,
             SCALED_MM: not weight_only() and scaled_mm_unsupported(x, weight, scales) is None, DEQUANTIZE: True}
    eligible = [path for path in paths if takes[path]]
    return eligible if DEQUANTIZE in eligible else eligible + [DEQUANTIZE]


# (device, rows bucket, N, K, x dtype, W dtype, scale layout, weight-only, SwiGLU out) -> the chosen
# path, and how it was chosen (source, and timed: each path's best time in us).
_CHOICES: dict[tuple, str] = {}
_TIMINGS: dict[tuple, dict] = {}


def choose_path(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, paths: Sequence[str],
                time_ms_fn: Callable[[Callable[[], object]], float] | None = None, swiglu_out: bool = False) -> str:
    """The path for x [..., K] @ dequantize(weight, scales).T among `paths` (the chip's, in
    fallback order; with `swiglu_out`, the product followed by SwiGLU on its halves, a choice of
    its own: run_path): the only eligible one; else, decided once per key and kept: on a GPU (or
    with `time_ms_fn`, the tests' timer) the fastest over TIMING_ROUNDS rounds of each in
    turn, at the bucket's row count, over cold copies of W (a tie keeps the earlier path); on a
    CPU the first. While a CUDA graph is captured: the first, not kept."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0:
        return DEQUANTIZE
    eligible = eligible_paths(rows, x, weight, scales, paths)
    if len(eligible) == 1:
        return eligible[0]
    kind = "rows" if scales_kind(weight, scales) == ROW_SCALES else "blocks"
    key = (str(x.device), rows_bucket(rows), weight.shape[0], weight.shape[1], x.dtype, weight.dtype, kind, weight_only(),
           swiglu_out)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if time_ms_fn is None and not x.is_cuda:
        _CHOICES[key], _TIMINGS[key] = eligible[0], {"source": "fallback"}
        return eligible[0]
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return eligible[0]
    if time_ms_fn is None and not timed_choices():  # untimed, kept: PAITON_TIMED_CHOICES=0
        _CHOICES[key], _TIMINGS[key] = eligible[0], {"source": "untimed"}
        return eligible[0]
    timed = time_paths(x, weight, scales, eligible, TIMING_ROUNDS, time_ms_fn or time_ms, swiglu_out)
    choice, best_ms = min(timed, key=lambda timing: timing[1])  # min keeps the first of equal times
    log.info("paiton fp8: %d rows x [%d x %d] %s%s on %s: %s (%s)", key[1], key[2], key[3], kind,
             ", SwiGLU out" if swiglu_out else "", x.device, choice,
             ", ".join(f"{path} {ms * 1e3:.1f} us" for path, ms in timed))
    _CHOICES[key] = choice
    _TIMINGS[key] = {"source": "timed", "times_us": {path: ms * 1e3 for path, ms in timed}}
    return choice


def time_paths(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, paths: Sequence[str], rounds: int,
               time_ms_fn: Callable[[Callable[[], object]], float] = time_ms,
               swiglu_out: bool = False) -> list[tuple[str, float]]:
    """[(path, ms), ...]: each path's best time for one product of rows_bucket(rows) rows (x's
    rows repeated: no random numbers drawn) over `rounds` rounds, in turn, W from memory (a
    product over each of timing.cold_copies(W) per run). A path that fails here is left out;
    DEQUANTIZE's failure is raised."""
    probe = bucket_probe(as_rows(x))
    weights = cold_copies(weight)
    runs = [(path, lambda path=path: [run_path(path, probe, w, scales, swiglu_out) for w in weights]) for path in paths]
    with device_guard(x):
        timed = best_times(runs, rounds, time_ms_fn, required=DEQUANTIZE, what=f"paiton fp8 on {x.device}")
    return [(path, ms / len(weights)) for path, ms in timed]


def chosen_paths() -> list[dict]:
    """What `choose_path` decided so far, one record per key (for benchmarks and result files:
    which product ran each FP8 linear of several rows): rows (the bucket), n, k, dtypes, scale
    layout, the choice, its source ("timed" or "fallback") and, timed, every path's time."""
    return [dict(device=key[0], rows=key[1], n=key[2], k=key[3], dtype=str(key[4]).removeprefix("torch."),
                 weight_dtype=str(key[5]).removeprefix("torch."), scales=key[6], weight_only=key[7],
                 **({"swiglu_out": True} if key[8] else {}), choice=choice, **_TIMINGS.get(key, {}))
            for key, choice in _CHOICES.items()]


def describe_choice(record: dict) -> str:
    """One of chosen_paths' records as a line (for logs and result files): which product ran
    the shape and row count, and every path's time where it was timed."""
    times = ", ".join(f"{path} {us:.1f}" for path, us in record.get("times_us", {}).items())
    return (f"{record['rows']} rows x [{record['n']} x {record['k']}]{', SwiGLU out' if record.get('swiglu_out') else ''}: "
            f"{record['choice']} "
            f"({record['source']}{'; us: ' + times if times else ''})")


def describe_choices() -> list[str]:
    """A line per choice `choose_path` made so far (describe_choice)."""
    return [describe_choice(record) for record in chosen_paths()]


def several_rows_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, paths: Sequence[str],
                         swiglu_out: bool = False) -> torch.Tensor:
    """x [..., K] @ dequantize(weight, scales).T in x's dtype by the path choose_path takes (with
    `swiglu_out`, a gate/up packed weight: silu_mul of the product's halves, run_path)."""
    return run_path(choose_path(x, weight, scales, paths, swiglu_out=swiglu_out), x, weight, scales, swiglu_out)


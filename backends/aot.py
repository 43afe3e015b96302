"""Compile Paiton's Triton kernels ahead of time for a GPU target, without the GPU, and read
what the compiled code uses: registers, spills, shared memory, loads, matrix instructions.

Each `*_build` function describes one kernel launch as the launcher makes it: its signature,
the launch configuration (`lowering.launch_config`'s keyword arguments, split here into the
kernel's constexprs and Triton's compile options), and the specialization Triton's JIT applies
at run time to aligned tensors (pointers and row widths divisible by 16), so that the code
compiled is the code that runs. Needs a process without TRITON_INTERPRET (the interpreter
replaces kernels by Python functions that `triton.compile` cannot take).

Used by `python -m paiton.backends.lowering` and by tests/aot_compile_kernels.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.compiler import ASTSource

from paiton.backends.target import Target
from paiton.fusion.decode_attention import _decode_attention_combine_kernel, _decode_attention_split_kernel
from paiton.fusion.few_rows_gemm import _few_rows_gemm_kernel
from paiton.fusion.prefill_attention import _prefill_attention_kernel
from paiton.fusion.gemv import BLOCK_SCALES, NO_SCALES, SCALE_BLOCK, _gemv_kernel, squares_count
from paiton.fusion.l2_prefetch import CHUNK_BYTES
from paiton.fusion.qk_norm_rope import _qk_norm_rope_kernel
from paiton.fusion.quantize_rows import FP8_LARGEST, FP8_MIN_EXPONENT, _quantize_rows_kernel
from paiton.fusion.rms_norm import _rms_norm_kernel
from paiton.fusion.swiglu import _silu_mul_kernel

# Launch keywords that are Triton compile options rather than kernel arguments.
TRITON_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "waves_per_eu", "matrix_instr_nonkdim", "kpack",
                            "launch_pdl"})


def with_pdl(config: dict) -> dict:
    """`config` launched with programmatic dependent launch, as fusion/pdl.pdl_launch adds it on
    sm_90 and later (the kernel's PDL constexpr and Triton's launch_pdl option)."""
    return {**config, "PDL": True, "launch_pdl": True}


@dataclass
class KernelBuild:
    """One kernel as a launch specializes it."""

    kernel: Any  # a triton.jit function
    signature: dict[str, str]  # argument -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]
    options: dict[str, Any]
    aligned: list[str] = field(default_factory=list)  # arguments the JIT sees divisible by 16

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def uses_dot(self) -> bool:
        """The kernel has matrix products, which should become the chip's matrix instructions: in
        its own source or in a jit function it calls (attention's shared `attend_tile`)."""
        called = [obj for name, obj in self.kernel.fn.__globals__.items()
                  if isinstance(obj, triton.runtime.JITFunction) and f"{name}(" in self.kernel.src]
        return any("tl.dot(" in fn.src for fn in (self.kernel, *called))

    def compile(self, target: Target):
        names = list(self.kernel.arg_names)
        missing = (set(names) ^ set(self.signature)) - {"PDL"}  # every kernel has one; _split gives its value
        if missing:
            raise ValueError(f"{self.name}: signature and kernel arguments differ in {sorted(missing)}")
        signature = {n: self.signature.get(n, "constexpr") for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in self.aligned}
        source = ASTSource(fn=self.kernel, signature=signature, constexprs=self.constexprs, attrs=attrs)
        return triton.compile(source, target=target.triton_target(), options=self.options)


def _split(kernel, config: dict[str, Any], constexprs: dict[str, Any]) -> tuple[dict, dict]:
    """(constexprs, compile options) of a launch with `config` plus the launcher's own constexprs."""
    options = {k: v for k, v in config.items() if k in TRITON_OPTIONS}
    kernel_args = {k: v for k, v in config.items() if k in kernel.arg_names}
    unused = set(config) - set(options) - set(kernel_args)
    if unused:
        raise ValueError(f"{kernel.__name__}: launch keywords {sorted(unused)} are neither kernel arguments nor Triton options")
    return {"PDL": False, **kernel_args, **constexprs}, options


def prefetching(config: dict, chunks: int, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """`config` with the next product's weight prefetched into L2, `chunks` bulk prefetches of
    `chunk_bytes` a program, as fusion/l2_prefetch.prefetch_arguments adds it on sm_90 and later."""
    return {**config, "PREFETCH_CHUNKS": chunks, "PREFETCH_CHUNK_BYTES": chunk_bytes}


def _prefetch_arguments(config: dict) -> tuple[dict[str, str], dict[str, Any]]:
    """(signature, launcher constexprs) of a window kernel's prefetch arguments: a weight pointer
    and a byte count when `config` prefetches (prefetching), else the kernel's defaults (None, 0)
    as constexprs, as a launch without them specializes."""
    if config.get("PREFETCH_CHUNKS"):
        return {"prefetch_ptr": "*fp8e4nv", "prefetch_bytes": "i32", "prefetch_first_program": "i32"}, {}
    return ({"prefetch_ptr": "constexpr", "prefetch_bytes": "constexpr", "prefetch_first_program": "constexpr"},
            {"prefetch_ptr": None, "prefetch_bytes": 0, "prefetch_first_program": 0, "PREFETCH_CHUNKS": 0,
             "PREFETCH_CHUNK_BYTES": CHUNK_BYTES})


def rms_norm_build(config: dict, dtype: str, has_residual: bool) -> KernelBuild:
    pointer = f"*{dtype}"
    prefetch_signature, prefetch_launcher = _prefetch_arguments(config)
    signature = {
        "x_ptr": pointer, "residual_ptr": pointer, "weight_ptr": pointer, "out_ptr": pointer, "sum_ptr": pointer,
        "n_rows": "i32", "n_cols": "i32", "eps": "fp32",
        "HAS_RESIDUAL": "constexpr", "BLOCK_ROWS": "constexpr", "BLOCK_COLS": "constexpr", "NUM_COL_BLOCKS": "constexpr",
        "PREFETCH_CHUNKS": "constexpr", "PREFETCH_CHUNK_BYTES": "constexpr", **prefetch_signature,
    }
    constexprs, options = _split(_rms_norm_kernel, config, {"HAS_RESIDUAL": has_residual, **prefetch_launcher})
    aligned = ["x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "sum_ptr", "n_cols"]
    aligned += ["prefetch_ptr", "prefetch_bytes"] if config.get("PREFETCH_CHUNKS") else []
    return KernelBuild(_rms_norm_kernel, signature, constexprs, options, aligned)


def silu_mul_build(config: dict, dtype: str) -> KernelBuild:
    signature = {
        "gate_ptr": f"*{dtype}", "up_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
        "n_cols": "i32", "gate_row_stride": "i32", "up_row_stride": "i32", "BLOCK": "constexpr",
    }
    constexprs, options = _split(_silu_mul_kernel, config, {})
    aligned = [n for n, kind in signature.items() if kind != "constexpr"]
    return KernelBuild(_silu_mul_kernel, signature, constexprs, options, aligned)


def qk_norm_rope_build(config: dict, dtype: str, write_cache: bool) -> KernelBuild:
    pointers = ["q_ptr", "k_ptr", "v_ptr", "q_w_ptr", "k_w_ptr", "q_out_ptr", "k_out_ptr", "v_out_ptr", "cos_ptr", "sin_ptr"]
    ints = ["seq_len", "n_q_heads", "n_k_heads", "head_dim", "cache_len", "slot_stride_b", "slot_stride", "slot_step"]
    for tensor in ("q", "k", "v", "q_out", "k_out", "v_out"):
        ints += [f"{tensor}_stride_b", f"{tensor}_stride_s", f"{tensor}_stride_h"]
    ints += ["cos_stride_b", "cos_stride_s", "sin_stride_b", "sin_stride_s"]
    launcher = {"WRITE_CACHE": write_cache}
    if write_cache:  # StaticCache's start slot (stride 0, step 1): the JIT specializes the 1 as a constant.
        launcher["slot_step"] = 1  # (A hand-written loop's slot tensor, stride 1, is another specialization.)
    prefetch_signature, prefetch_launcher = _prefetch_arguments(config)
    constexprs, options = _split(_qk_norm_rope_kernel, config, {**launcher, **prefetch_launcher})
    signature = {**{p: f"*{dtype}" for p in pointers}, "slot_ptr": "*i64", **{n: "i32" for n in ints}, "eps": "fp32",
                 "WRITE_CACHE": "constexpr", "BLOCK_HEADS": "constexpr", "BLOCK_HALF": "constexpr",
                 "PREFETCH_CHUNKS": "constexpr", "PREFETCH_CHUNK_BYTES": "constexpr",
                 **{n: "constexpr" for n in constexprs}, **prefetch_signature}
    # As the JIT specializes Qwen3's aligned tensors (head_dim 128, strides multiples of 16), and
    # the slot stride and step it sees as 0 (divisible by 16).
    aligned = [n for n, kind in signature.items()
               if kind != "constexpr" and n not in ("eps", "seq_len", "n_q_heads", "n_k_heads", "cache_len", "slot_ptr")]
    return KernelBuild(_qk_norm_rope_kernel, signature, constexprs, options, aligned)


def gemv_build(config: dict, dtype: str, gated: bool = False, weight_dtype: str | None = None,
               scales: int = NO_SCALES, norm: bool = False, residual: bool = False, swiglu_out: bool = False) -> KernelBuild:
    """One-row linear, Qwen3's widths: N and K multiples of every block (EVEN_N, EVEN_K);
    `gated`: SwiGLU applied to the input as it is loaded (silu_mul_linear); `weight_dtype` an FP8
    type ("fp8e4nv": e4m3fn, NVIDIA; "fp8e4b8": e4m3fnuz, MI300X) with fp32 `scales` per row or
    per 128 x 128 block (fp8_linear); `norm`: the product of the input RMS-normalized (the sums of
    its squares read, rms_norm_linear), `residual`: the residual added to the outputs and the sums
    of their squares written (linear_add); `swiglu_out`: a packed gate/up weight whose product
    leaves silu(gate) * up (SWIGLU_OUT). A silu-first launch (gemv.silu_first) of a gated
    product is the plain kernel after silu_mul's: built plain."""
    if config.get("SILU_FIRST"):
        config, gated = {key: value for key, value in config.items() if key != "SILU_FIRST"}, False
    config = dict(config)
    splits = config.pop("SPLITS", 1)  # > 1: split along K (its fp32 partial sums and counters)
    signature = {"x_ptr": f"*{dtype}", "up_ptr": f"*{dtype}", "w_ptr": f"*{weight_dtype or dtype}", "y_ptr": f"*{dtype}",
                 "N": "i32", "K": "i32", "stride_wn": "i32", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                 "EVEN_N": "constexpr", "EVEN_K": "constexpr", "GATED": "constexpr",
                 "scale_ptr": "*fp32" if scales else "constexpr", "stride_sn": "i32" if scales == BLOCK_SCALES else "constexpr",
                 "SCALES": "constexpr", "SCALE_BLOCK": "constexpr", "X_PER_ROW": "constexpr", "CHUNK": "constexpr",
                 "norm_w_ptr": f"*{dtype}" if norm else "constexpr", "squares_ptr": "*fp32" if norm else "constexpr",
                 "n_squares": "i32" if norm else "constexpr", "eps": "fp32" if norm else "constexpr",
                 "NORM": "constexpr", "SQUARES_BLOCK": "constexpr", "res_ptr": f"*{dtype}" if residual else "constexpr",
                 "RESIDUAL": "constexpr", "squares_out_ptr": "*fp32" if residual else "constexpr",
                 "SQUARES_OUT": "constexpr", "SWIGLU_OUT": "constexpr", "k_slice": "i32" if splits > 1 else "constexpr",
                 "partial_ptr": "*fp32" if splits > 1 else "constexpr", "count_ptr": "*i32" if splits > 1 else "constexpr",
                 "SPLITS": "constexpr"}
    launcher = {"SPLITS": splits, "EVEN_N": True, "EVEN_K": True, "GATED": gated, "SCALES": scales, "SCALE_BLOCK": SCALE_BLOCK,
                "X_PER_ROW": config.get("X_PER_ROW", False), "CHUNK": config.get("CHUNK", 0), "NORM": norm,
                # Qwen3-32B's hidden size, 5120: the sums of squares of 1280 groups of 4
                "SQUARES_BLOCK": triton.next_power_of_2(squares_count(5120)) if norm else 1,
                "RESIDUAL": residual, "SQUARES_OUT": residual, "SWIGLU_OUT": swiglu_out}
    if not scales:
        launcher["scale_ptr"] = None
    if scales != BLOCK_SCALES:
        launcher["stride_sn"] = 0
    if not norm:
        launcher.update(norm_w_ptr=None, squares_ptr=None, n_squares=0, eps=0.0)
    if not residual:
        launcher.update(res_ptr=None, squares_out_ptr=None)
    if splits == 1:
        launcher.update(k_slice=0, partial_ptr=None, count_ptr=None)
    constexprs, options = _split(_gemv_kernel, config, launcher)
    aligned = (["x_ptr", "up_ptr", "w_ptr", "y_ptr", "N", "K", "stride_wn"] + (["scale_ptr"] if scales else [])
               + (["norm_w_ptr", "squares_ptr", "n_squares"] if norm else [])
               + (["res_ptr", "squares_out_ptr"] if residual else [])
               + (["k_slice", "partial_ptr", "count_ptr"] if splits > 1 else []))
    return KernelBuild(_gemv_kernel, signature, constexprs, options, aligned)


def decode_attention_split_build(config: dict, dtype: str, group: int, has_positions: bool, has_mask: bool) -> KernelBuild:
    # A nonzero combine_in_split builds the launch that combines its splits (COMBINE, with
    # counters); callers pass 0 for the split kernel that the combine kernel follows.
    combine = bool(config.get("combine_in_split", 0))
    config = {k: v for k, v in config.items() if k not in ("combine_num_warps", "combine_in_split")}
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "pos_ptr": "*i64",
                "mask_ptr": "*i1", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}",
                "count_ptr": "*i32" if combine else f"*{dtype}"}
    ints = ["n_kv_heads", "q_len", "head_dim", "cache_len", "q_stride_b", "q_stride_h", "q_stride_s", "k_stride_b",
            "k_stride_h", "k_stride_n", "v_stride_b", "v_stride_h", "v_stride_n", "pos_stride_b", "pos_stride_s",
            "mask_stride_b", "mask_stride_s", "mask_stride_n", "split_size", "n_splits"]
    launcher = {"GROUP": group, "HAS_POSITIONS": has_positions, "HAS_MASK": has_mask, "DOT_FP32": False,
                "DOT_PRECISION": "ieee" if dtype == "fp32" else None, "SPLIT_FILLED": config.get("SPLIT_FILLED", True),
                "COMBINE": combine}
    if has_mask:  # a contiguous mask: the JIT specializes its unit key stride as a constant
        launcher["mask_stride_n"] = 1
    constexprs, options = _split(_decode_attention_split_kernel, config, launcher)
    signature = {**pointers, **{n: "i32" for n in ints}, "scale": "fp32", **{n: "constexpr" for n in constexprs}}
    aligned = [n for n in signature if n.endswith("_ptr") or n in (
        "head_dim", "k_stride_b", "k_stride_h", "k_stride_n", "v_stride_b", "v_stride_h", "v_stride_n",
        "q_stride_b", "q_stride_h", "q_stride_s", "split_size")]
    return KernelBuild(_decode_attention_split_kernel, signature, constexprs, options, aligned)


def prefill_attention_build(config: dict, dtype: str, group: int) -> KernelBuild:
    """Packed prompts' prefill attention, as the engine launches it: rows and positions int64
    [1, T] (contiguous: the JIT specializes their unit token stride as a constant)."""
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "rows_ptr": "*i64", "pos_ptr": "*i64",
                "out_ptr": f"*{dtype}"}
    ints = ["n_q_heads", "seq_len", "head_dim", "q_stride_b", "q_stride_h", "q_stride_s", "k_stride_b", "k_stride_h",
            "k_stride_s", "v_stride_b", "v_stride_h", "v_stride_s", "rows_stride_b", "pos_stride_b", "out_stride_b",
            "out_stride_h", "out_stride_s"]
    launcher = {"GROUP": group, "DOT_FP32": False, "DOT_PRECISION": "ieee" if dtype == "fp32" else None,
                "rows_stride_s": 1, "pos_stride_s": 1}
    constexprs, options = _split(_prefill_attention_kernel, config, launcher)
    signature = {**pointers, **{n: "i32" for n in ints}, "scale": "fp32", **{n: "constexpr" for n in constexprs}}
    aligned = [n for n in signature if n.endswith("_ptr") or n in (
        "head_dim", "q_stride_b", "q_stride_h", "q_stride_s", "k_stride_b", "k_stride_h", "k_stride_s", "v_stride_b",
        "v_stride_h", "v_stride_s", "out_stride_b", "out_stride_h", "out_stride_s")]
    return KernelBuild(_prefill_attention_kernel, signature, constexprs, options, aligned)


def decode_attention_combine_build(config: dict, dtype: str, n_splits: int) -> KernelBuild:
    signature = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}", "n_q_heads": "i32",
                 "q_len": "i32", "head_dim": "i32", "n_splits": "i32", "BLOCK_SPLITS": "constexpr", "BLOCK_D": "constexpr"}
    launch = {"BLOCK_SPLITS": triton.next_power_of_2(n_splits), "BLOCK_D": config["BLOCK_D"],
              "num_warps": config["combine_num_warps"], **{k: v for k, v in config.items() if k in ("PDL", "launch_pdl")}}
    constexprs, options = _split(_decode_attention_combine_kernel, launch, {})
    aligned = ["part_out_ptr", "part_lse_ptr", "out_ptr", "head_dim"]
    return KernelBuild(_decode_attention_combine_kernel, signature, constexprs, options, aligned)


# ---------------------------------------------------------------------------------------------
# What the compiled code uses
# ---------------------------------------------------------------------------------------------


def resources(compiled, target: Target) -> dict[str, Any]:
    """registers (NVIDIA: per thread; AMD: VGPRs per lane), spills (NVIDIA: bytes of local
    memory per thread, which for Triton's code is spilled registers; AMD: VGPRs + SGPRs
    spilled), shared_bytes (what a launch needs: Triton fails it on a chip with less), the
    matrix instructions and global load widths, and vendor details."""
    asm = compiled.asm
    shared = compiled.metadata.shared
    if target.vendor == "cuda":
        code = asm["ptx"]
        usage = _cubin_resource_usage(asm["cubin"]) if "cubin" in asm else {}
        return {
            "binary": "cubin" in asm,
            "registers": usage.get("REG"),
            "spills": usage.get("LOCAL"),
            "shared_bytes": shared,
            "matrix": sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync)\b", code))),
            "loads": sorted(set(re.findall(r"ld\.global[.\w:]*", code))),  # with cache hints (::evict_first)
            # Global-to-shared copies of a pipelined matrix kernel, by size (0x10: 16 bytes).
            "async_copies": sorted(set(re.findall(r"cp\.async\.cg\.shared\.global[.\w]* \[[^]]*\], \[[^]]*\], (0x\w+)", code))),
            # Tiles by the tensor memory accelerator (a descriptor's loads, W_TMA): bulk tensor copies.
            "tensor_copies": code.count("cp.async.bulk.tensor"),
            "local_memory": ".local" in code,
            # Programmatic dependent launch (fusion/pdl.py): the wait, the L2 prefetches before it,
            # and what else comes before it (nothing may touch global memory there).
            "pdl_wait": "griddepcontrol.wait" in code,
            "l2_prefetches": code.count("prefetch.global.L2"),
            # Bulk prefetches of the next product's weight (fusion/l2_prefetch.py).
            "bulk_l2_prefetches": code.count("cp.async.bulk.prefetch.L2"),
            **_pdl_order(code),
        }
    code = asm["amdgcn"]

    def number(key: str) -> int:
        return int(re.search(rf"{key}:?\s+(\d+)", code).group(1))

    vgpr_spills, sgpr_spills = number(r"\.vgpr_spill_count"), number(r"\.sgpr_spill_count")
    return {
        "binary": "hsaco" in asm,
        "registers": number(r"\.vgpr_count"),
        "spills": vgpr_spills + sgpr_spills,
        "shared_bytes": shared,
        "matrix": sorted(set(re.findall(r"\bv_mfma_\w+", code))),
        "loads": sorted(set(re.findall(r"(?:global|buffer)_load_\w+", code))),
        "sgprs": number(r"\.sgpr_count"),
        "vgpr_spills": vgpr_spills,
        "sgpr_spills": sgpr_spills,
        "scratch_bytes": number("; ScratchSize"),
        "waves_per_simd": number("; Occupancy"),
    }


# Global memory accesses in PTX: loads, stores, atomics and reductions, asynchronous copies.
# (A bulk L2 prefetch, cp.async.bulk.prefetch, is a hint like prefetch.global.L2, not an access.)
_GLOBAL_ACCESS = re.compile(
    r"\b(?:ld\.global|st\.global|atom\.|red\.|cp\.async\.\w*\.?shared\.global|cp\.async\.bulk(?!\.prefetch))")


def _pdl_order(ptx: str) -> dict[str, Any]:
    """Where a PDL launch's wait stands in the code: the global memory accesses before the first
    griddepcontrol.wait (there must be none: only L2 prefetches may come first), and whether
    griddepcontrol.launch_dependents comes after it. Empty without a wait."""
    at = ptx.find("griddepcontrol.wait")
    if at < 0:
        return {}
    released = ptx.find("griddepcontrol.launch_dependents")
    return {"global_accesses_before_wait": _GLOBAL_ACCESS.findall(ptx[:at]),
            "launch_dependents_after_wait": released > at}


def _cubin_resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, LOCAL, SHARED, STACK, ... of the cubin's kernel, from cuobjdump (shipped in Triton's
    wheel); {} without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    line = next((line for line in out.splitlines() if "REG:" in line), "")
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


def _cuobjdump() -> str | None:
    knobs = getattr(triton, "knobs", None)
    try:
        path = knobs.nvidia.cuobjdump.path if knobs is not None else None
    except (AttributeError, RuntimeError):
        path = None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for candidate in (path, bundled, shutil.which("cuobjdump")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def few_rows_gemm_build(config: dict, dtype: str, weight_dtype: str, scales: int, gated: bool = False,
                        swiglu_out: bool = False) -> KernelBuild:
    """The GEMM of 2-64 rows (fusion/few_rows_gemm.py): x in `dtype`, W in `weight_dtype` (x's
    dtype, or "fp8e4nv"/"fp8e4b8" with fp32 scales per row or per 128 x 128 block; NO_SCALES:
    no scale pointer, as the bf16 product launches it); products in x's dtype on the chip's
    matrix instructions (DOT_FP32 is the interpreter's). config["SPLITS"] > 1: split along K,
    with its fp32 partial sums and per-tile counters (atomics). `gated`: x is SwiGLU's gate and
    up_ptr its up half, applied as x loads (down_proj at 2-64 rows). `swiglu_out`: W is gate/up
    packed and SwiGLU pairs the halves in the product's last step (gate/up at 2-64 rows)."""
    config = dict(config)
    splits = config.pop("SPLITS", 1)
    via_fp16 = config.pop("W_VIA_FP16", False) and weight_dtype.startswith("fp8")
    tma = config.pop("W_TMA", False)
    signature = {"x_ptr": f"*{dtype}", "w_ptr": f"*{weight_dtype}",
                 # W_TMA: a tensor descriptor of W's [BLOCK_N, BLOCK_K] tiles (Triton's type string for one)
                 "w_desc": f"tensordesc<{weight_dtype}[{config['BLOCK_N']}, {config['BLOCK_K']}]>" if tma else "constexpr",
                 "scale_ptr": "constexpr" if scales == NO_SCALES else "*fp32", "y_ptr": f"*{dtype}",
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
                 "stride_sn": "i32" if scales == BLOCK_SCALES else "constexpr", "K_SLICE": "i32",
                 "partial_ptr": "*fp32" if splits > 1 else "constexpr", "count_ptr": "*i32" if splits > 1 else "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "SCALES": "constexpr",
                 "SCALE_BLOCK": "constexpr", "DOT_FP32": "constexpr", "SPLITS": "constexpr", "W_VIA_FP16": "constexpr",
                 "SWAP_AB": "constexpr", "W_TMA": "constexpr", "up_ptr": f"*{dtype}" if gated else "constexpr",
                 "stride_um": "i32" if gated else "constexpr", "GATED": "constexpr", "SWIGLU_OUT": "constexpr"}
    launcher = {"SCALES": scales, "SCALE_BLOCK": SCALE_BLOCK, "DOT_FP32": False, "SPLITS": splits,
                "W_VIA_FP16": via_fp16, "SWAP_AB": config.pop("SWAP_AB", False), "W_TMA": tma, "GATED": gated,
                "SWIGLU_OUT": swiglu_out}
    if not gated:
        launcher.update(up_ptr=None, stride_um=0)
    if not tma:
        launcher["w_desc"] = None
    if scales != BLOCK_SCALES:
        launcher["stride_sn"] = 0
    if scales == NO_SCALES:
        launcher["scale_ptr"] = None
    if splits == 1:
        launcher.update(partial_ptr=None, count_ptr=None)
    constexprs, options = _split(_few_rows_gemm_kernel, config, launcher)
    aligned = ["x_ptr", "w_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn", "stride_ym", "K_SLICE"]
    aligned += [] if scales == NO_SCALES else ["scale_ptr"]
    aligned += ["partial_ptr", "count_ptr"] if splits > 1 else []
    aligned += ["up_ptr", "stride_um"] if gated else []
    return KernelBuild(_few_rows_gemm_kernel, signature, constexprs, options, aligned)


# Triton's names of the FP8 formats (the pointer types of FP8 tensors) and torch's dtypes.
TRITON_FP8_DTYPES = {"fp8e4nv": torch.float8_e4m3fn, "fp8e4b8": torch.float8_e4m3fnuz}


def quantize_rows_build(config: dict, dtype: str, fp8_type: str) -> KernelBuild:
    """Row-wise activation quantization (fusion/quantize_rows.py) ahead of torch._scaled_mm: x in
    `dtype` to `fp8_type` ("fp8e4nv": e4m3fn; "fp8e4b8": e4m3fnuz, the MI300X's), one fp32 scale
    a row; the chip's own FP8 conversion (ROUND_IN_FP32 is the interpreter's)."""
    fp8 = TRITON_FP8_DTYPES[fp8_type]
    signature = {"x_ptr": f"*{dtype}", "q_ptr": f"*{fp8_type}", "scale_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
                 "stride_xm": "i32", "LARGEST": "constexpr", "MIN_EXPONENT": "constexpr", "ROUND_IN_FP32": "constexpr",
                 "BLOCK_ROWS": "constexpr", "BLOCK_COLS": "constexpr", "NUM_COL_BLOCKS": "constexpr"}
    launcher = {"LARGEST": FP8_LARGEST[fp8], "MIN_EXPONENT": FP8_MIN_EXPONENT[fp8], "ROUND_IN_FP32": False}
    constexprs, options = _split(_quantize_rows_kernel, config, launcher)
    aligned = ["x_ptr", "q_ptr", "scale_ptr", "n_cols", "stride_xm"]
    return KernelBuild(_quantize_rows_kernel, signature, constexprs, options, aligned)

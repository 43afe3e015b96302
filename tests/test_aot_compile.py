"""Paiton's kernels compile ahead of time for NVIDIA (sm_80, sm_90) and AMD (gfx942, gfx950)
(the FP8 GEMV for the chips with FP8: e4m3fn on sm_90 and gfx950, e4m3fnuz on gfx942)
without the hardware, each with the launch configuration its chip's lowering table picks, and
the code is what the chip needs: no register spills, no more shared memory than the chip has,
16-byte loads for the memory-bound kernels, and the chip's matrix instructions for products (mma
on NVIDIA: decode tiles of 16 query rows are below wgmma's 64; mfma on AMD)."""

import json
import os
import subprocess
import sys

import pytest

from paiton.backends.lowering import TRITON, lowering_table
from paiton.backends.target import target_named

SCRIPT = os.path.join(os.path.dirname(__file__), "aot_compile_kernels.py")
TARGETS = {"sm_80", "sm_90", "gfx942", "gfx950"}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; 1 is the default
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_kernel_compiles_for_every_target(compiled):
    failed = {name: r["error"] for name, r in compiled.items() if not r["ok"]}
    assert not failed, failed
    targets = {name.rsplit("@", 1)[1] for name in compiled}
    assert targets == TARGETS
    assert all(r["binary"] for r in compiled.values())


def test_every_kernel_of_every_table_is_compiled(compiled):
    """Each target's table runs Paiton's Triton kernels for these ops; each op's kernels are among
    the compiled ones (decode attention has two: the split pass and the combine)."""
    kernels_of = {"rms_norm": {"_rms_norm_kernel"}, "fused_add_rms_norm": {"_rms_norm_kernel"},
                  "all_reduce_add_rms_norm": {"_rms_norm_kernel"},
                  "silu_mul": {"_silu_mul_kernel"}, "qk_norm_rope": {"_qk_norm_rope_kernel"},
                  "qk_norm_rope_cache": {"_qk_norm_rope_kernel"},
                  "decode_attention": {"_decode_attention_split_kernel", "_decode_attention_combine_kernel"},
                  "prefill_attention": {"_prefill_attention_kernel"},
                  "one_row_linear": {"_gemv_kernel"}, "silu_mul_linear": {"_gemv_kernel"},
                  "few_rows_linear": {"_few_rows_gemm_kernel"},
                  "fp8_linear": {"_gemv_kernel", "_few_rows_gemm_kernel", "_quantize_rows_kernel"},
                  "l2_prefetch": {"_rms_norm_kernel", "_qk_norm_rope_kernel"}, "norm_linear": {"_gemv_kernel"}}
    for target_name in TARGETS:
        table = lowering_table(target_named(target_name))
        triton_ops = {op for op, lowering in table.items() if lowering.implementation == TRITON}
        assert triton_ops <= set(kernels_of), triton_ops - set(kernels_of)  # a new op needs cases in the script
        expected = set().union(*(kernels_of[op] for op in triton_ops))
        got = {r["kernel"] for name, r in compiled.items() if name.endswith("@" + target_name)}
        assert got == expected, (target_name, got ^ expected)


def test_no_kernel_spills_registers(compiled):
    for name, r in compiled.items():
        assert r["registers"], (name, "register count not read")
        assert r["spills"] == 0, (name, r)
        if "@gfx" in name:  # scalar registers spill into vector lanes, vector ones to scratch memory
            assert r["vgpr_spills"] == r["sgpr_spills"] == r["scratch_bytes"] == 0, (name, r)


def test_shared_memory_fits_the_chip(compiled):
    """A launch that asks for more shared memory (LDS) than the chip has fails at run time; the
    table's tiles must fit in every dtype (fp32 tiles take twice bf16's)."""
    for name, r in compiled.items():
        assert r["shared_bytes"] <= r["shared_limit"], (name, r["shared_bytes"], r["shared_limit"], r["config"])


def reads_scalars(name: str) -> bool:
    """Kernels that also read a few scalars besides their wide rows: attention (positions, mask
    bytes, prefill's rows; the combine kernel's per-split log-sum-exp) and the QK-norm + RoPE kernel when it writes
    the cache (each token's cache slot), and the GEMV, whose row x is read in the weight tile's
    layout (narrower loads, from L2) beside the weight's 16-byte ones."""
    return name.startswith(("decode_attention", "prefill_attention", "gemv/", "few_rows_gemm/")) or "cache=True" in name


def test_nvidia_code_uses_16_byte_loads_and_no_local_memory(compiled):
    for name, r in compiled.items():
        if "@sm_" in name and name.startswith("few_rows_gemm/"):
            # A pipelined matrix kernel: W and x come by 16-byte asynchronous copies to shared memory,
            # or W by the tensor memory accelerator's bulk copies (W_TMA) and x by those 16-byte ones.
            assert r["async_copies"] == ["0x10"] and not r["local_memory"], (name, r["async_copies"])
            assert (r["tensor_copies"] > 0) == ("W_TMA=True" in name), (name, r["tensor_copies"])
        elif "@sm_" in name:
            wide = [load for load in r["loads"] if ".v4" in load]
            assert wide and (reads_scalars(name) or r["loads"] == ["ld.global.v4.b32"]), (name, r["loads"])
            assert not r["local_memory"], name


def test_products_use_the_chips_matrix_instructions(compiled):
    dot_kernels = {name for name, r in compiled.items() if r["uses_dot"]}
    attention = ("decode_attention/", "prefill_attention/")
    assert dot_kernels and all(name.startswith((*attention, "few_rows_gemm/")) for name in dot_kernels), dot_kernels
    for name in dot_kernels:
        matrix = compiled[name]["matrix"]
        if name.startswith(tuple(a + "fp32" for a in attention)) and "@sm_" in name:
            # fp32 models get IEEE fp32 products as eager does: no TF32 tensor-core mma.
            assert not matrix, (name, matrix)
        else:
            expected = "v_mfma" if "@gfx" in name else "mma"
            assert any(expected in m for m in matrix), (name, matrix)


def test_amd_code_uses_16_byte_loads(compiled):
    for name, r in compiled.items():
        if "@gfx" in name:
            if not reads_scalars(name):
                assert all(load.endswith("dwordx4") for load in r["loads"]), (name, r["loads"])
            assert any(load.endswith("dwordx4") for load in r["loads"]), (name, r["loads"])



def test_fp8_gemv_compiles_for_each_chips_format(compiled):
    """The FP8 GEMV is built where the chip has FP8, in its format (the MI300X's e4m3fnuz,
    OCP e4m3fn elsewhere), and not for sm_80, which has none."""
    fp8 = {name for name in compiled if "/fp8=" in name}
    assert {name.rsplit("@", 1)[1] for name in fp8} == {"sm_90", "gfx942", "gfx950"}
    assert all(("fp8=e4m3fnuz" in name) == name.endswith("@gfx942") for name in fp8)
    assert {name.split("/scales=")[1].split("/")[0] for name in fp8 if "/scales=" in name} == {"rows", "blocks"}
    assert {name.split("/", 1)[0] for name in fp8} == {"gemv", "few_rows_gemm", "quantize_rows"}


def test_activation_quantization_uses_the_chips_fp8_conversion(compiled):
    """The per-token quantization before torch._scaled_mm converts with the chip's instruction
    (cvt.rn.satfinite to e4m3 on NVIDIA; v_cvt_pk_fp8_f32 on gfx942, v_cvt_scalef32_pk_fp8_f32
    on gfx950), not the interpreter's rounding in fp32, and divides with IEEE rounding (div.rn on
    NVIDIA, v_div_scale's correctly rounded sequence on AMD: the scales equal torch's bit for
    bit); for every Qwen3 width, the 32B's 25600-wide down_proj input in two passes."""
    names = [name for name in compiled if name.startswith("quantize_rows/")]
    assert {name.rsplit("@", 1)[1] for name in names} == {"sm_90", "gfx942", "gfx950"}
    assert {name.split("/cols=")[1].split("@")[0] for name in names} == {"4096", "5120", "12288", "25600"}
    for name in names:
        conversions = compiled[name]["conversions"]
        if "@sm_" in name:
            assert {"cvt.rn.satfinite.e4m3x2.f32", "div.rn.f32"} <= set(conversions), (name, conversions)
        else:
            fp8_conversion = "v_cvt_pk_fp8_f32" if "@gfx942" in name else "v_cvt_scalef32_pk_fp8_f32"
            assert {fp8_conversion, "v_div_scale_f32"} <= set(conversions), (name, conversions)


def test_few_rows_candidates_are_built_where_they_fit(compiled):
    """The few-rows GEMM's candidates are compiled for each NVIDIA chip at 16 and 64 rows a program
    (and with SWIGLU_OUT at 32) where their estimated shared memory fits (fusion/few_rows_gemm.fitting; what did compile is
    checked against the chip by test_shared_memory_fits_the_chip): every one at 16 rows in bf16
    on sm_90 (the W_TMA launches among them), most at 64; on sm_80, which has no tensor memory
    accelerator, none with W_TMA; none for the AMD tables, which leave these products to Inductor."""
    from paiton.fusion.few_rows_gemm import FEW_ROWS_CANDIDATES, FEW_ROWS_TMA_CANDIDATES

    def built(dtype, rows, target):
        return [n for n in compiled if n.startswith(f"few_rows_gemm/{dtype}/rows={rows}/") and n.endswith("@" + target)]

    hopper = len(FEW_ROWS_CANDIDATES) + len(FEW_ROWS_TMA_CANDIDATES)
    assert len(built("bf16", 16, "sm_90")) == hopper
    assert len(built("bf16", 64, "sm_90")) >= hopper - 1
    assert sum("W_TMA=True" in n for n in built("bf16", 16, "sm_90")) == len(FEW_ROWS_TMA_CANDIDATES)
    assert built("fp32", 16, "sm_80") and not any("W_TMA" in n for n in built("bf16", 16, "sm_80"))
    assert not built("bf16", 16, "gfx942")
    # gate/up with SwiGLU in its last step (two W tiles a stage): most of them at 32 rows in bf16
    swiglu_out = [n for n in compiled if n.startswith("few_rows_gemm/bf16/swiglu_out/rows=32/") and n.endswith("@sm_90")]
    assert len(swiglu_out) >= hopper - 4 and sum("W_TMA=True" in n for n in swiglu_out) == len(FEW_ROWS_TMA_CANDIDATES)
    # ... and on FP8 weights (fp8_linear_silu_mul): most of the FP8 launches with quantize_fp8's row
    # scales on sm_90, every W_TMA one among them; the untimed launch with block scales on every FP8 chip
    from paiton.fusion.few_rows_gemm import FP8_FEW_ROWS_CANDIDATES, FP8_FEW_ROWS_TMA_CANDIDATES

    fp8_rows = [n for n in compiled if n.startswith("few_rows_gemm/bf16/fp8=e4m3fn/scales=rows/swiglu_out/rows=32/")
                and n.endswith("@sm_90")]
    fp8_hopper = len(FP8_FEW_ROWS_CANDIDATES) + len(FP8_FEW_ROWS_TMA_CANDIDATES)
    assert len(fp8_rows) >= fp8_hopper - 3 and sum("W_TMA=True" in n for n in fp8_rows) == len(FP8_FEW_ROWS_TMA_CANDIDATES)
    fp8_blocks = {n.rsplit("@", 1)[1] for n in compiled if "/scales=blocks/swiglu_out/" in n}
    assert fp8_blocks == {"sm_90", "gfx942", "gfx950"}


def test_pdl_launches_wait_before_they_read(compiled):
    """On sm_90 every kernel of a decode step also compiles for programmatic dependent launch
    (PAITON_PDL=1, fusion/pdl.py): its code waits for the kernel before it (griddepcontrol.wait)
    before any global load, store or atomic, then releases the next (launch_dependents), and the
    products (GEMV, few-rows GEMM) prefetch their first weight tiles into L2 before the wait; a
    build without PDL never waits, and no chip without PDL (sm_80, AMD) gets a PDL build."""
    pdl = {name for name in compiled if "/pdl" in name}
    assert {name.rsplit("@", 1)[1] for name in pdl} == {"sm_90"}
    assert {compiled[name]["kernel"] for name in pdl} == {r["kernel"] for r in compiled.values()}
    for name, r in compiled.items():
        if "@sm_" in name:
            assert r["pdl_wait"] == ("/pdl" in name), name
            product = name.startswith(("gemv/", "few_rows_gemm/"))
            assert (r["l2_prefetches"] > 0) == ("/pdl" in name and product), (name, r["l2_prefetches"])
        if "/pdl" in name:  # the wait comes before any load, store or atomic, the release after it
            assert r["global_accesses_before_wait"] == [] and r["launch_dependents_after_wait"], (name, r)


def test_window_kernels_ask_l2_for_the_next_weight(compiled):
    """On sm_90 the norm and rotary kernels also compile with the bulk L2 prefetch of the next
    product's weight (fusion/l2_prefetch.py): only those builds have cp.async.bulk.prefetch.L2,
    no chip without it (sm_80, AMD) gets one, the prefetch spills nothing, and with PDL it is
    still the only thing before the wait (no load, store or atomic)."""
    prefetching = {name for name in compiled if "/prefetch" in name}
    assert {name.rsplit("@", 1)[1] for name in prefetching} == {"sm_90"}
    assert {compiled[name]["kernel"] for name in prefetching} == {"_rms_norm_kernel", "_qk_norm_rope_kernel"}
    for name, r in compiled.items():
        if "@sm_" in name:
            assert (r["bulk_l2_prefetches"] > 0) == (name in prefetching), (name, r["bulk_l2_prefetches"])
    for name in prefetching:
        assert compiled[name]["spills"] == 0, name
        if "/pdl" in name:
            assert compiled[name]["global_accesses_before_wait"] == [], name


"""Targets and lowering tables: chip detection, the tables' contents, the launchers taking their
configuration from the table of their device, passes leaving an op to Inductor where a table
says so, the `paiton.target` option, and the `python -m paiton.backends.lowering` command."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from paiton_testing import EAGER_INNER, capture_paiton_graphs, fusions, transformers_rms_norm

import paiton
from paiton.backends import lowering
from paiton.backends.aot import TRITON_OPTIONS
from paiton.backends.lowering import FUSED_OPS, IMPLEMENTATIONS, INDUCTOR, TRITON, Lowering, LoweringKey, launch_config
from paiton.backends.options import PaitonOptionError, PaitonOptions
from paiton.backends.target import CPU, TARGET_PRESETS, Target, detect_target, target_named
from paiton.passes.pass_manager import DYNAMO_GRAPH_PASSES, PASS_ORDER, PaitonPassManager

ROCM_ONLY_OPTIONS = {"waves_per_eu", "matrix_instr_nonkdim", "kpack"}


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def test_every_preset_has_a_table_and_a_compile_target():
    assert set(TARGET_PRESETS) == set(lowering.TABLES)
    for name, target in TARGET_PRESETS.items():
        assert target.arch == name and target_named(name) is target
        if target.is_gpu:
            gpu = target.triton_target()
            assert (gpu.backend, gpu.warp_size) == (target.vendor, target.warp_size)
    assert TARGET_PRESETS["sm_90"].triton_target().arch == 90 and TARGET_PRESETS["gfx942"].triton_target().arch == "gfx942"


def test_unknown_target_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown target 'h100'; known targets are \['cpu', 'gfx90a', 'gfx942'"):
        target_named("h100")


def test_cpu_tensors_run_on_the_cpu_target():
    assert detect_target(torch.device("cpu")) is CPU
    assert detect_target("meta") is CPU


def fake_gpu(monkeypatch, hip: str | None, **props):
    """Make torch report one GPU with these properties (no GPU needed)."""
    from paiton.backends import target as target_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(**props))
    monkeypatch.setattr(torch.version, "hip", hip)
    target_module._gpu_target.cache_clear()  # the caller clears it again when done
    return target_module


def test_reads_an_nvidia_gpu(monkeypatch):
    target_module = fake_gpu(
        monkeypatch, None, name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, warp_size=32,
        gcnArchName="NVIDIA H100 80GB HBM3", shared_memory_per_block=49152, shared_memory_per_multiprocessor=233472,
    )
    try:
        target = detect_target("cuda")
        assert target == Target("cuda", "sm_90", 32, 132, 232448, "NVIDIA H100 80GB HBM3")
        assert lowering.lowering_table(target) == lowering.TABLES["sm_90"]  # same arch, same table
    finally:
        target_module._gpu_target.cache_clear()


def test_reads_an_amd_gpu(monkeypatch):
    target_module = fake_gpu(
        monkeypatch, "6.2", name="AMD Instinct MI300X", major=9, minor=4, multi_processor_count=304, warp_size=64,
        gcnArchName="gfx942:sramecc+:xnack-", shared_memory_per_block=65536, shared_memory_per_multiprocessor=65536,
    )
    try:
        target = detect_target(torch.device("cuda", 0))
        assert (target.vendor, target.arch, target.warp_size, target.multiprocessors) == ("hip", "gfx942", 64, 304)
        assert target.shared_memory_per_block == 65536
    finally:
        target_module._gpu_target.cache_clear()


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------


def test_every_table_lowers_every_op():
    for arch, table in lowering.TABLES.items():
        assert set(table) == set(FUSED_OPS), arch
        assert all(entry.implementation in IMPLEMENTATIONS for entry in table.values()), arch


def test_every_pass_creates_a_known_op():
    """Each op of the tables is made by a pass, and each pass's op is in the tables (swiglu_out's
    product is the few-rows linear's, lowered by its entry); a pass without an op (fused_op
    None) only rewrites the inputs of others' ops."""
    fused_ops = [cls.fused_op for cls in (*DYNAMO_GRAPH_PASSES, *PASS_ORDER) if cls.fused_op is not None]
    # fp8_linear is put in by quantize_fp8 (models/fp8.py), a model transform: the passes only
    # merge and feed it (merged_projections, silu_mul_linear).
    assert set(fused_ops) | {"fp8_linear"} == set(FUSED_OPS)
    assert [op for op in fused_ops if fused_ops.count(op) > 1] == ["few_rows_linear"] * 2


def test_launch_parameters_are_the_vendors_own():
    """A CUDA launch rejects ROCm's options (Triton: "Keyword argument ... was specified but
    unrecognised"); Triton forces kpack to 1 on gfx950."""
    for arch, table in lowering.TABLES.items():
        for op, entry in table.items():
            launch_options = set(entry.params) & (TRITON_OPTIONS | ROCM_ONLY_OPTIONS)
            if TARGET_PRESETS[arch].vendor != "hip":
                assert not launch_options & ROCM_ONLY_OPTIONS, (arch, op, entry.params)
    assert "kpack" not in lowering.TABLES["gfx950"]["decode_attention"].params
    assert lowering.TABLES["gfx942"]["decode_attention"].params["matrix_instr_nonkdim"] == 16


@given(n_rows=st.integers(1, 4096), n_cols=st.integers(1, 40000), arch=st.sampled_from(sorted(TARGET_PRESETS)))
def test_rms_norm_config_is_the_shape_helper_plus_the_chips_options(n_rows, n_cols, arch):
    from paiton.fusion.rms_norm import rms_norm_launch_config

    target = target_named(arch)
    config = launch_config("rms_norm", target, n_rows=n_rows, n_cols=n_cols)
    assert config == {**rms_norm_launch_config(n_rows, n_cols), **lowering.TABLES[arch]["rms_norm"].params}


def test_wavefront_width_sizes_the_elementwise_block():
    assert launch_config("silu_mul", target_named("sm_90"))["BLOCK"] == 1024
    assert launch_config("silu_mul", target_named("gfx942"))["BLOCK"] == 2048
    # A ROCm chip without a table and with 32-wide waves (RDNA): the block follows its warp size.
    rdna = Target("hip", "gfx1100", 32, 48, 65536, "Radeon RX 7900 XTX")
    assert launch_config("silu_mul", rdna)["BLOCK"] == 1024


@pytest.mark.parametrize("target", [
    Target("cuda", "sm_120", 32, 170, 101376, "NVIDIA GeForce RTX 5090"),
    Target("hip", "gfx1100", 32, 48, 65536, "Radeon RX 7900 XTX"),
], ids=lambda t: t.arch)
def test_a_chip_without_a_table_gets_the_vendor_defaults_and_one_note(caplog, target):
    lowering.lowering_table.cache_clear()
    with caplog.at_level(logging.WARNING, logger="paiton"):
        configs = [launch_config("decode_attention", target, group=4, q_len=1, head_dim=128) for _ in range(3)]
        launch_config("rms_norm", target, n_rows=1, n_cols=4096)
    notes = [r for r in caplog.records if "no lowering table" in r.getMessage()]
    assert len(notes) == 1 and target.arch in notes[0].getMessage()
    # 32-key tiles, 2 stages: fits 43 KB of shared memory in fp32; no MFMA options (RDNA has none).
    assert configs[0]["BLOCK_N"] == 32 and configs[0]["num_stages"] == 2
    assert not set(configs[0]) & ROCM_ONLY_OPTIONS
    # Only the GEMV's (norms inside it too) and the few-rows GEMM's ops stay Inductor's on AMD chips, as on the known ones (untimed
    # there); FP8 is not assumed on a chip nobody has checked (an sm_89+ NVIDIA chip has it), nor the bulk
    # L2 prefetch before sm_90 or on AMD.
    left = {op for op, entry in lowering.lowering_table(target).items() if entry.implementation == INDUCTOR}
    sm = int(target.arch[3:]) if target.vendor == "cuda" else 0
    assert left == ({"one_row_linear", "silu_mul_linear", "few_rows_linear", "norm_linear"} if target.vendor == "hip" else set()) | (
        set() if sm >= 89 else {"fp8_linear"}) | (set() if sm >= 90 else {"l2_prefetch"})


@pytest.mark.parametrize(("target", "tma"), [
    (Target("cuda", "sm_89", 32, 142, 101376, "L40S"), False),  # FP8, but no tensor memory accelerator
    (Target("cuda", "sm_86", 32, 84, 101376, "RTX 3090"), False),
    (Target("cuda", "sm_120", 32, 170, 101376, "NVIDIA GeForce RTX 5090"), True),
    (target_named("sm_80"), False), (target_named("sm_90"), True), (target_named("sm_100"), True),
], ids=lambda t: getattr(t, "arch", str(t)))
def test_w_tma_launches_only_where_the_chip_has_the_tensor_memory_accelerator(target, tma):
    """The few-rows GEMM's W_TMA launches (W's tiles by tensor descriptor) are timed on sm_90 and
    later only: a chip before Hopper, with a table or the vendor defaults, has the others alone,
    for bf16 and for FP8 weights."""
    lowering.lowering_table.cache_clear()
    lists = [launch_config("few_rows_linear", target)["candidates"]]
    if lowering.lowering_for("fp8_linear", target).implementation == TRITON:
        lists.append(launch_config("fp8_linear", target)["several_rows_candidates"])
    assert lists[0] and len(lists) == (1 if target.arch in ("sm_80", "sm_86") else 2)
    assert all(any(config.get("W_TMA") for config in configs) is tma for configs in lists)
    assert all(any(not config.get("W_TMA") for config in configs) for configs in lists)


def test_unknown_op_is_an_error():
    with pytest.raises(ValueError, match="unknown Paiton op 'gelu'"):
        launch_config("gelu", CPU)


# ---------------------------------------------------------------------------------------------
# The launchers take their configuration from the table of their device
# ---------------------------------------------------------------------------------------------


class RecordingKernel:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_launches_use_the_table_of_the_tensors_device(monkeypatch):
    from paiton.fusion import decode_attention, swiglu
    from paiton.fusion.triton_utils import is_interpreted

    if not is_interpreted(swiglu._silu_mul_kernel):
        pytest.skip("launches on CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
    silu = RecordingKernel(swiglu._silu_mul_kernel)
    split = RecordingKernel(decode_attention._decode_attention_split_kernel)
    combine = RecordingKernel(decode_attention._decode_attention_combine_kernel)
    monkeypatch.setattr(swiglu, "_silu_mul_kernel", silu)
    monkeypatch.setattr(decode_attention, "_decode_attention_split_kernel", split)
    monkeypatch.setattr(decode_attention, "_decode_attention_combine_kernel", combine)
    # The CPU table, with launch sizes of its own: the launches must show them.
    monkeypatch.setitem(lowering.LOWERINGS, LoweringKey("silu_mul", "cpu"), Lowering(lowering.REFERENCE, dict(BLOCK=64, num_warps=2)))
    attention = dict(BLOCK_N=16, num_warps=2, num_stages=1, combine_num_warps=1)
    monkeypatch.setitem(lowering.LOWERINGS, LoweringKey("decode_attention", "cpu"), Lowering(lowering.REFERENCE, attention))
    lowering.lowering_table.cache_clear()
    try:
        gate, up = torch.randn(3, 100), torch.randn(3, 100)
        torch.testing.assert_close(swiglu._launch(gate, up), swiglu.silu_mul_reference(gate, up))
        q, k_cache, v_cache = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
        out = decode_attention._launch(q, k_cache, v_cache, torch.tensor([39]), None, 0.25, n_splits=2)
        torch.testing.assert_close(out, decode_attention.decode_attention_reference(q, k_cache, v_cache, torch.tensor([39]), None, 0.25),
                                   atol=1e-5, rtol=1e-5)
    finally:
        lowering.lowering_table.cache_clear()
    assert [(k["BLOCK"], k["num_warps"]) for k in silu.launches] == [(64, 2)]
    assert [(k["BLOCK_N"], k["num_warps"], k["num_stages"]) for k in split.launches] == [(16, 2, 1)]
    assert [k["num_warps"] for k in combine.launches] == [1]


# ---------------------------------------------------------------------------------------------
# A table that leaves an op to Inductor: the pass does not run, the report shows 0
# ---------------------------------------------------------------------------------------------


class NormsAndProjections(torch.nn.Module):
    """Two projections of one input (merged_projections), a residual add + RMSNorm
    (fused_add_rms_norm) and an RMSNorm (rms_norm), as transformers writes them."""

    def __init__(self, dim=32):
        super().__init__()
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.k = torch.nn.Linear(dim, dim, bias=False)
        self.w1 = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.w2 = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        residual = x + self.q(x) * self.k(x)
        return transformers_rms_norm(transformers_rms_norm(residual, self.w1), self.w2)


@pytest.fixture
def chip_leaving_to_inductor(monkeypatch):
    """A CUDA chip (arch "sm_test") whose table leaves rms_norm and packed_linear to Inductor."""
    table = {**lowering.TABLES["sm_90"],
             "rms_norm": Lowering(INDUCTOR, {}, "test"), "packed_linear": Lowering(INDUCTOR, {}, "test")}
    for op, entry in table.items():
        monkeypatch.setitem(lowering.LOWERINGS, LoweringKey(op, "sm_test"), entry)
    lowering.lowering_table.cache_clear()
    yield Target("cuda", "sm_test", 32, 132, 232448, "test chip")
    lowering.lowering_table.cache_clear()


def test_ops_left_to_inductor_are_not_fused_and_report_zero(chip_leaving_to_inductor):
    module, x = NormsAndProjections(), torch.randn(4, 32)
    q_storage = module.q.weight.untyped_storage().data_ptr()
    with torch.no_grad(), capture_paiton_graphs() as graphs:
        expected = module(x)
        out = torch.compile(module, backend="paiton", options={**EAGER_INNER, "paiton.target": chip_leaving_to_inductor})(x)
    torch.testing.assert_close(out, expected)
    assert paiton.fusion_counts(module) == fusions(fused_add_rms_norm=1)
    (record,) = paiton.fusion_graphs(module)
    assert record.target == "sm_test" and record.counts["rms_norm"] == 0 and record.counts["merged_projections"] == 0
    [(_, after, _)] = graphs
    assert after["aten.rsqrt.default"] == 1 and "paiton.rms_norm.default" not in after  # the plain norm stays ATen
    assert module.q.weight.untyped_storage().data_ptr() == q_storage  # weights not packed


def test_the_same_module_fuses_everything_on_a_known_chip():
    module, x = NormsAndProjections(), torch.randn(4, 32)
    with torch.no_grad():
        torch.compile(module, backend="paiton", options={**EAGER_INNER, "paiton.target": "sm_90"})(x)
    assert paiton.fusion_counts(module) == fusions(merged_projections=1, fused_add_rms_norm=1, rms_norm=1)
    assert paiton.fusion_graphs(module)[0].target == "sm_90"


def test_pass_manager_cache_key_follows_the_table(chip_leaving_to_inductor):
    assert PaitonPassManager(target=chip_leaving_to_inductor).left_to_inductor == ("merged_projections", "rms_norm")
    assert PaitonPassManager(target=chip_leaving_to_inductor).uuid() != PaitonPassManager(target=TARGET_PRESETS["sm_90"]).uuid()
    assert PaitonPassManager(target=TARGET_PRESETS["sm_90"]).uuid() == PaitonPassManager(target=TARGET_PRESETS["sm_90"]).uuid()


# ---------------------------------------------------------------------------------------------
# The paiton.target option
# ---------------------------------------------------------------------------------------------


def test_target_option_names_a_preset():
    assert PaitonOptions.from_backend_kwargs().target is None
    assert PaitonOptions.from_backend_kwargs(options={"paiton.target": "gfx942"}).target is TARGET_PRESETS["gfx942"]
    custom = Target("cuda", "sm_89", 32, 142, 101376, "L40S")
    assert PaitonOptions.from_backend_kwargs(options={"paiton.target": custom}).target is custom


@pytest.mark.parametrize("value", ["mi300x", 90, None])
def test_target_option_errors_list_the_known_targets(value):
    with pytest.raises(PaitonOptionError, match=re.escape("paiton.target names a chip") + r".*'gfx942', 'gfx950'"):
        PaitonOptions.from_backend_kwargs(options={"paiton.target": value})


def test_target_of_another_vendor_than_the_gpu_is_an_error():
    """Inputs on a CUDA device (fake tensors: no GPU needed) and an AMD target."""
    from torch._subclasses import FakeTensorMode

    from paiton.backends.paiton_backend import paiton_backend

    gm = torch.fx.symbolic_trace(lambda x: x * 2)
    with FakeTensorMode():
        example = torch.empty(4, device="cuda")
    with pytest.raises(PaitonOptionError, match="'gfx942' is a hip chip, but this graph's inputs are on a cuda GPU"):
        paiton_backend(gm, [example], options={"paiton.target": "gfx942"})


# ---------------------------------------------------------------------------------------------
# python -m paiton.backends.lowering
# ---------------------------------------------------------------------------------------------


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(op, kernel) -> the row's cells, from the command's table."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("op "))
    rows = {}
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[(cells[0], cells[2])] = cells
    return rows


def test_command_prints_the_compiled_table_for_a_target():
    """Run as a user would, from a shell with TRITON_INTERPRET=1 as the tests have it: the
    command compiles in a process of its own without it. (At 64 tokens most of its kernels are
    the AOT test's, found in Triton's cache when that test ran first.)"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-m", "paiton.backends.lowering", "--target", "gfx942", "--tokens", "64"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paiton lowering for gfx942 (AMD Instinct MI300X)" in result.stdout
    rows = table_rows(result.stdout)
    assert sorted({op for op, _ in rows}) == sorted(FUSED_OPS)
    table = lowering.TABLES["gfx942"]
    for (op, kernel), (_, implementation, _, shape, registers, spills, shared, config) in rows.items():
        assert implementation == table[op].implementation, (op, implementation)
        if implementation == TRITON and kernel != "-":  # "-": no launch at this size (the FP8 GEMV at 64 rows)
            vgprs, sgprs = re.fullmatch(r"(\d+) v, (\d+) s", registers).groups()
            assert 0 < int(vgprs) <= 512 and spills == "0", (kernel, registers, spills)
            assert float(shared.removesuffix(" KB")) * 1024 <= TARGET_PRESETS["gfx942"].shared_memory_per_block
    split = rows[("decode_attention", "_decode_attention_split_kernel")]
    assert {"BLOCK_N=32", "matrix_instr_nonkdim=16", "kpack=1"} <= set(split[-1].split())
    assert rows[("silu_mul", "_silu_mul_kernel")][-1] == "BLOCK=2048 num_warps=4"
    assert rows[("packed_linear", "torch linear")][1:2] == ["vendor"]


def test_command_for_the_cpu_prints_without_compiling():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "paiton.backends.lowering", "--target", "cpu", "--model", "qwen3-32b"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert {cells[1] for cells in rows.values()} == {"reference", "vendor", "inductor"}
    assert {op for op, _ in rows if rows[(op, _)][1] == "inductor"} == {"l2_prefetch"}  # no L2 to prefetch into
    assert rows[("rms_norm", "_rms_norm_kernel")][3] == "[1, 5120]"
    assert all(cells[4] == "-" for cells in rows.values())  # nothing compiled


# ---------------------------------------------------------------------------------------------
# bench/lowering_sweep.py (times on a GPU; its candidates and its run-time check run here)
# ---------------------------------------------------------------------------------------------

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_sweep_without_a_gpu_fails_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the sweep would run")
    result = subprocess.run([sys.executable, os.path.join(BENCH, "lowering_sweep.py"), "--tokens", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "needs a CUDA or ROCm GPU" in result.stderr and "python -m paiton.backends.lowering" in result.stderr


def without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


@pytest.mark.parametrize("arch", ["sm_90", "gfx942", "gfx950"])
def test_sweep_candidates_start_with_the_table_and_launch_on_their_chip(monkeypatch, arch):
    """Every candidate is a launch the chip's Triton backend accepts: kernel arguments and that
    backend's options only (the package's kernel builds reject anything else)."""
    from paiton.backends import aot

    monkeypatch.syspath_prepend(BENCH)
    import lowering_sweep

    target = target_named(arch)
    shapes = {"rms_norm": dict(n_rows=64, n_cols=20480), "fused_add_rms_norm": dict(n_rows=1, n_cols=4096), "silu_mul": {},
              "qk_norm_rope": dict(n_q_heads=32, n_k_heads=8, head_dim=128),
              "qk_norm_rope_cache": dict(n_q_heads=64, n_k_heads=8, head_dim=128),
              "decode_attention": dict(group=4, q_len=1, head_dim=128),
              "prefill_attention": dict(head_dim=128, element_size=2)}
    assert set(shapes) == set(lowering_sweep.OPS)
    builds = {"rms_norm": lambda c: aot.rms_norm_build(c, "bf16", False),
              "fused_add_rms_norm": lambda c: aot.rms_norm_build(c, "bf16", True),
              "silu_mul": lambda c: aot.silu_mul_build(c, "bf16"),
              "qk_norm_rope": lambda c: aot.qk_norm_rope_build(c, "bf16", False),
              "qk_norm_rope_cache": lambda c: aot.qk_norm_rope_build(c, "bf16", True),
              # n_splits is the launcher's argument (the sweep's call passes it on), not a kernel keyword
              "decode_attention": lambda c: (aot.decode_attention_split_build(without(c, "n_splits"), "bf16", 4, True, False),
                                             aot.decode_attention_combine_build(without(c, "n_splits"), "bf16", 8)),
              "prefill_attention": lambda c: aot.prefill_attention_build(c, "bf16", 8)}
    for op, shape in shapes.items():
        table = launch_config(op, target, **shape)
        found = lowering_sweep.candidates(op, table, target)
        assert found[0] == table and len(found) > 2, op
        assert all(found.count(c) == 1 for c in found), op
        for config in found:
            builds[op](config)  # raises on a keyword that is neither a kernel argument nor an option
            options = set(config) & ROCM_ONLY_OPTIONS
            assert target.vendor == "hip" or not options, (op, config)
            assert arch != "gfx950" or "kpack" not in config, (op, config)


def test_sweep_records_the_configuration_the_launcher_picks(monkeypatch):
    """The sweep's run-time check, on CPU tensors under Triton's interpreter: what the launch
    asked the table for is the table's configuration for the device, and an alternative launch
    gives the table's output."""
    from paiton.fusion.rms_norm import _rms_norm_kernel
    from paiton.fusion.triton_utils import is_interpreted

    if not is_interpreted(_rms_norm_kernel):
        pytest.skip("launches on CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
    monkeypatch.syspath_prepend(BENCH)
    import lowering_sweep

    for op, tokens in (("rms_norm", 2), ("fused_add_rms_norm", 2), ("silu_mul", 2), ("qk_norm_rope_cache", 2),
                       ("prefill_attention", 40)):
        call, shape, _ = lowering_sweep.make_case(op, "qwen3-8b", tokens, torch.float32, "cpu")
        table = launch_config(op, CPU, **shape)
        assert lowering_sweep.picked_at_run_time(call) == [table], op
        reference = call(table)
        reference = tuple(t.clone() for t in reference) if isinstance(reference, tuple) else reference
        assert lowering_sweep.outputs_match(call(lowering_sweep.candidates(op, table, CPU)[1]), reference), op


def test_lowering_sweep_times_decode_attention_over_a_servers_cache(monkeypatch):
    """The sweep's decode attention case over a cache and fill of choice (a server's 1472 holding
    a short context): its description says so, and the layout before (SPLIT_FILLED=False) is a
    candidate whose output is the table's."""
    from paiton.fusion.rms_norm import _rms_norm_kernel
    from paiton.fusion.triton_utils import is_interpreted

    if not is_interpreted(_rms_norm_kernel):
        pytest.skip("launches on CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
    monkeypatch.syspath_prepend(BENCH)
    import lowering_sweep

    call, shape, description = lowering_sweep.make_case("decode_attention", "qwen3-8b", 2, torch.float32, "cpu",
                                                        cache_len=200, filled=70)
    assert "cache 200 filled 70" in description and description.endswith("splits by default")
    table = launch_config("decode_attention", CPU, **shape)
    found = lowering_sweep.candidates("decode_attention", table, CPU)
    before = [c for c in found if c.get("SPLIT_FILLED") is False]
    assert before == [{**table, "SPLIT_FILLED": False}]
    assert lowering_sweep.outputs_match(call(before[0]), call(table))
    # Other split counts: the launcher's `n_splits` (not a kernel keyword), passed on by the
    # sweep's call; the output stays the table's.
    counts = [c["n_splits"] for c in found if "n_splits" in c]
    assert counts == list(lowering_sweep.DECODE_SPLIT_COUNTS)
    from paiton.fusion import decode_attention

    asked, launch = [], decode_attention._launch
    monkeypatch.setattr(decode_attention, "_launch", lambda *a, **k: (asked.append(k.get("n_splits")), launch(*a, **k))[1])
    assert lowering_sweep.outputs_match(call({**table, "n_splits": 3}), call(table))
    assert asked == [3, None]
    # ... and the keys are divided as asked: 300 keys of a 400-key cache in 3 splits of whole
    # 64-key tiles (128, 128, 44 keys: each split's log-sum-exp finite), where the launcher's
    # default on this one-multiprocessor CPU target is a single split.
    q, k_cache, v_cache = torch.randn(2, 32, 1, 128), torch.randn(2, 8, 400, 128), torch.randn(2, 8, 400, 128)
    for n_splits, expected in ((None, 1), (3, 3)):
        lse = []
        launch(q, k_cache, v_cache, torch.tensor([299]), None, 128**-0.5, n_splits=n_splits, config=table, split_lse=lse)
        assert lse[0].shape[-1] == expected and bool(torch.isfinite(lse[0]).all()), n_splits

"""Smoke runs of the GPU benchmark scripts on CPU with the tiny preset: they run end to end
and write well-formed results (the numbers themselves only mean something on a GPU)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_profile_decode_step_smoke(tmp_path):
    import profile_decode_step

    profile_decode_step.main(["--model", "tiny", "--device", "cpu", "--batches", "1,2", "--configs", "paiton",
                              "--paiton-inner", "eager", "--prompt-len", "8", "--steps", "2", "--profile-steps", "1",
                              "--cache-len", "64", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile_decode_step-tiny-CPU-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert json.loads(path.read_text())["env"]["cache_len"] == 64 and ", cache 64," in path.with_suffix(".md").read_text()
    assert [(r["config"], r["batch"]) for r in rows] == [("paiton", 1), ("paiton", 2)]
    for row in rows:
        names = {k["name"] for k in row["kernels"]}
        # A decode step of the tiny model runs Paiton's fused ops, two layers' worth each; SwiGLU
        # is inside down_proj's product at one row (the GEMV), inside gate/up's at 2 rows (the
        # few-rows GEMM).
        swiglu = "paiton::silu_mul_packed_linear" if row["batch"] == 1 else "paiton::packed_linear_silu_mul"
        assert {"paiton::decode_attention", "paiton::qk_norm_rope_cache", swiglu} <= names, names
        assert row["categories"]["paiton kernels"] > 0 and row["step_us"] > 0
        assert abs(sum(row["categories"].values()) - row["kernel_us"]) < 1e-6 * max(row["kernel_us"], 1)
        assert row["synchronizing_calls"] == [] and row["cudagraph_counters"] == {}  # (no CUDA: nothing to find)
    text = path.with_suffix(".md").read_text()
    assert "| paiton | 2 |" in text and "synchronized with the host" not in text
    # A row whose step waited for the GPU (what sync debug mode said, and where) or whose CUDA
    # graphs were skipped is listed with what was found.
    rows[1].update(synchronizing_calls=["called a synchronizing CUDA operation\n  File \"fp8_paths.py\", line 9"],
                   cudagraph_counters={"cudagraph_skips": 1})
    text = profile_decode_step.markdown(json.loads(path.read_text())["env"], rows, 3)
    assert "- paiton batch 2: counters {'cudagraph_skips': 1}, 1 synchronizing call(s) in one step" in text
    assert 'File "fp8_paths.py", line 9' in text


def test_profile_decode_step_fp8_beside_bf16(tmp_path):
    """Issue 21's decode step without a server: the FP8 copy's step beside bf16's, FP8's products
    in its profile, and its weight bytes (fewer: the decoder linears at one byte) in the file."""
    import profile_decode_step

    # --runs: the pairs in the order given (not batch by batch), each once
    # --stack-dumps: the run's stacks (where a cold compile spends its time) in a file of their own
    profile_decode_step.main(["--model", "tiny", "--device", "cpu", "--runs", "paiton-fp8@1,paiton@1,paiton-fp8@2",
                              "--paiton-inner", "eager", "--prompt-len", "8", "--steps", "2", "--profile-steps", "1",
                              "--stack-dumps", "0.2", "--tag", "dumps", "--out", str(tmp_path)])
    stacks = (tmp_path / "stacks-profile_decode_step-tiny-dumps.log").read_text()
    assert "stacks at" in stacks and "profile_decode_step.py" in stacks
    (path,) = tmp_path.glob("profile_decode_step-tiny-CPU-*-dumps.json")
    result = json.loads(path.read_text())
    assert [(r["config"], r["batch"]) for r in result["rows"]] == [("paiton-fp8", 1), ("paiton", 1), ("paiton-fp8", 2)]
    fp8_names = {k["name"] for k in result["rows"][0]["kernels"]}
    assert "paiton::silu_mul_fp8_linear" in fp8_names and "paiton::fp8_linear" in fp8_names, fp8_names
    assert 0 < result["env"]["fp8_weight_bytes"] < result["env"]["weight_bytes"]
    assert "FP8 weights (the -fp8 configurations)" in path.with_suffix(".md").read_text()


def test_profile_decode_step_fp8_in_place(tmp_path):
    """--fp8-in-place (a card that cannot hold a bf16 model and its FP8 copy): the bf16 rows run
    first whatever the order asked, then the model itself is quantized for the FP8 ones, and the
    FP8 floor is the bytes the quantized model holds, counted before it was made."""
    import profile_decode_step
    from bench_common import fp8_weight_bytes, weight_bytes

    from paiton.models.fp8 import fp8_copy
    from paiton.models.qwen3 import build_qwen3

    model = build_qwen3("tiny", device="cpu", dtype=torch.float32)
    assert fp8_weight_bytes(model) == weight_bytes(fp8_copy(model)) < weight_bytes(model)
    profile_decode_step.main(["--model", "tiny", "--device", "cpu", "--runs", "paiton-fp8@1,paiton@1,paiton@2",
                              "--fp8-in-place", "--paiton-inner", "eager", "--prompt-len", "8", "--steps", "2",
                              "--profile-steps", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile_decode_step-tiny-CPU-*.json")
    result = json.loads(path.read_text())
    assert [(r["config"], r["batch"]) for r in result["rows"]] == [("paiton", 1), ("paiton", 2), ("paiton-fp8", 1)]
    bf16_names = {k["name"] for k in result["rows"][0]["kernels"]}
    fp8_names = {k["name"] for k in result["rows"][2]["kernels"]}
    assert "paiton::fp8_linear" in fp8_names and not any("fp8" in name for name in bf16_names), (bf16_names, fp8_names)
    assert result["env"]["fp8_weight_bytes"] == fp8_weight_bytes(model)


def test_profile_decode_step_fp8_lm_head(tmp_path):
    """"paiton-fp8-head": the FP8 copy with its lm_head in FP8 too (one more FP8 product a step,
    the lm_head's bytes halved in its floor), sharing the -fp8 copy's decoder weights."""
    import profile_decode_step
    from bench_common import floor_key, fp8_lm_head, fp8_weight_bytes, model_for, weight_bytes

    from paiton.models.fp8 import Fp8Linear, fp8_copy
    from paiton.models.qwen3 import build_qwen3

    model = build_qwen3("tiny", device="cpu", dtype=torch.float32)
    head_bytes = fp8_weight_bytes(model, lm_head=True)
    assert head_bytes == weight_bytes(fp8_copy(model, include_lm_head=True)) < fp8_weight_bytes(model)
    plain, headed = model_for(model, "paiton-fp8"), model_for(model, "paiton-fp8-head-pdl")
    assert type(plain.lm_head) is torch.nn.Linear and isinstance(headed.lm_head, Fp8Linear)
    assert headed.model.layers[0].mlp.down_proj.weight is plain.model.layers[0].mlp.down_proj.weight
    assert [fp8_lm_head(c) for c in ("paiton-fp8", "paiton-fp8-head", "paiton-fp8-head-nl", "paiton")] == [False, True, True, False]
    assert [floor_key(c) for c in ("paiton", "paiton-fp8-pdl", "paiton-fp8-head")] == ["floor_us", "fp8_floor_us", "fp8_head_floor_us"]
    profile_decode_step.main(["--model", "tiny", "--device", "cpu", "--runs", "paiton-fp8@1,paiton-fp8-head@1",
                              "--paiton-inner", "eager", "--prompt-len", "8", "--steps", "2", "--profile-steps", "1",
                              "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile_decode_step-tiny-CPU-*.json")
    result = json.loads(path.read_text())
    assert result["env"]["fp8_head_weight_bytes"] == head_bytes and result["env"]["fp8_weight_bytes"] == fp8_weight_bytes(model)
    launches = [{k["name"]: k["launches_per_step"] for k in row["kernels"]} for row in result["rows"]]
    assert launches[1]["paiton::fp8_linear"] == launches[0]["paiton::fp8_linear"] + 1, launches
    assert "the -fp8-head configurations" in path.with_suffix(".md").read_text()


@pytest.mark.parametrize(("config", "valid", "pdl", "l2pf", "nl", "notma"), [
    ("paiton-fp8-head", True, False, False, False, False), ("paiton-fp8-head-pdl-nl", True, True, False, True, False),
    ("inductor-fp8-head", False, False, False, False, False), ("paiton-head", False, False, False, False, False),
    ("paiton-pdl", True, True, False, False, False), ("paiton-fp8-pdl", True, True, False, False, False),
    ("paiton-cdt-pdl-no-swiglu", True, True, False, False, False), ("paiton-fp8", True, False, False, False, False),
    ("inductor-pdl", False, False, False, False, False), ("eager-pdl", False, False, False, False, False),
    ("pdl", False, False, False, False, False),
    ("paiton-pdl-pdl", False, False, False, False, False), ("paiton-fp8-l2pf", True, False, True, False, False),
    ("paiton-fp8-pdl-l2pf", True, True, True, False, False), ("paiton-l2pf-pdl", False, False, False, False, False),
    ("inductor-l2pf", False, False, False, False, False), ("paiton-l2pf-no-l2_prefetch", True, False, True, False, False),
    ("paiton-fp8-nl", True, False, False, True, False), ("paiton-pdl-nl", True, True, False, True, False),
    ("paiton-nl-pdl", False, False, False, False, False), ("inductor-cdt-nl", False, False, False, False, False),
    ("paiton-notma", True, False, False, False, True), ("paiton-fp8-pdl-nl-notma", True, True, False, True, True),
    ("paiton-notma-pdl", False, False, False, False, False), ("inductor-cdt-notma", False, False, False, False, False)])
def test_launch_switch_configurations(monkeypatch, config, valid, pdl, l2pf, nl, notma):
    """"-pdl", "-l2pf", "-nl" and "-notma" after a Paiton configuration: the same compile
    settings, with PDL (PAITON_PDL=1 while it runs), the L2 prefetch (PAITON_L2_PREFETCH=1), the
    norms in the products (PAITON_NORM_LINEAR=1) or no W_TMA launches timed (PAITON_W_TMA=0);
    unset for the others, whatever the environment says: Paiton's default; restored after."""
    from bench_common import (compile_settings, config_environment, is_config, uses_l2_prefetch, uses_norm_linear, uses_pdl,
                              without_w_tma)

    assert is_config(config) is valid
    if not valid:
        return
    assert uses_pdl(config) is pdl and uses_l2_prefetch(config) is l2pf and uses_norm_linear(config) is nl
    assert without_w_tma(config) is notma
    base = config.replace("-pdl", "").replace("-l2pf", "").replace("-nl", "").replace("-notma", "")
    assert compile_settings(config, "cuda") == compile_settings(base, "cuda")
    switches = {"PAITON_PDL": "1" if pdl else None, "PAITON_L2_PREFETCH": "1" if l2pf else None,
                "PAITON_NORM_LINEAR": "1" if nl else None, "PAITON_W_TMA": "0" if notma else None}
    for name in switches:
        monkeypatch.setenv(name, f"untouched {name}")
    with config_environment(config):
        assert {name: os.environ.get(name) for name in switches} == switches
    assert all(os.environ[name] == f"untouched {name}" for name in switches)


def test_few_rows_sweep_reads_choose_s_own_timings(monkeypatch):
    """bench/few_rows_sweep.py times through few_rows_gemm.choose (here with a fake timer, under
    the interpreter): every launch of the table and the proposed ones not already in it, the
    vendor's for a bf16 weight, each in its group; an FP8 weight has no vendor row."""
    import few_rows_sweep

    from paiton.fusion import few_rows_gemm

    monkeypatch.setattr(few_rows_gemm, "_CHOICES", {})
    monkeypatch.setattr(few_rows_gemm, "_TIMINGS", {})
    table = [few_rows_gemm.candidate(16, 32, 4, 1)]
    monkeypatch.setattr(few_rows_sweep, "PROPOSED", (table[0], few_rows_gemm.candidate(32, 32, 4, 1, tma=True)))
    monkeypatch.setattr(few_rows_sweep, "PROPOSED_FP8", (few_rows_gemm.candidate(32, 32, 4, 1, tma=True),))
    timer = lambda fn: (fn(), 1.0)[1]  # noqa: E731  (1 ms for any run: the names and groups are what is checked)
    result = few_rows_sweep.sweep(48, 64, 4, None, 1.0, table, device="cpu", time_ms_fn=timer)
    assert result["kinds"] == {"vendor": "vendor", "16x32 w4 s1": "table", "32x32 w4 s1 w_tma": "proposed"}
    assert set(result["times_us"]) == set(result["kinds"]) and not result["notes"]
    assert result["floor_us"] == round(48 * 64 * 2 / 1e12 * 1e6, 2)
    fp8 = few_rows_sweep.sweep(48, 64, 4, torch.float8_e4m3fn, 1.0, table, device="cpu", time_ms_fn=timer)
    assert fp8["kinds"] == {"16x32 w4 s1": "table", "32x32 w4 s1 w_tma": "proposed"} and fp8["weight_dtype"] == "float8_e4m3fn"


def test_launch_names_tell_every_table_launch_apart():
    """bench_common.launch_name (the sweeps' tables, keyed by it): every launch of the GEMV and
    few-rows tables gets its own name (fp8_gemm_sweep's own, tiles and warps only, gave three FP8
    GEMV launches one name between them, and its results kept the last)."""
    from bench_common import launch_name

    from paiton.fusion import few_rows_gemm, gemv

    few_rows = few_rows_gemm.FEW_ROWS_CANDIDATES + few_rows_gemm.FEW_ROWS_TMA_CANDIDATES
    fp8_few_rows = few_rows_gemm.FP8_FEW_ROWS_CANDIDATES + few_rows_gemm.FP8_FEW_ROWS_TMA_CANDIDATES
    for table in (gemv.GEMV_CANDIDATES, gemv.FP8_GEMV_CANDIDATES, few_rows, fp8_few_rows):
        assert len({launch_name(config) for config in table}) == len(table)
    assert launch_name(few_rows_gemm.candidate(64, 128, 4, 4, splits=2, swap_ab=True, tma=True)) == \
        "64x128 w4 s4 splits=2 swap_ab w_tma"
    assert launch_name(few_rows_gemm.VENDOR) == few_rows_gemm.VENDOR


def test_profile_decode_step_pdl_rows(tmp_path):
    """A "-pdl" row beside the plain one (on a CPU PDL changes nothing: the same fused ops)."""
    import profile_decode_step

    profile_decode_step.main(["--model", "tiny", "--device", "cpu", "--runs", "paiton@1,paiton-pdl@1",
                              "--paiton-inner", "eager", "--prompt-len", "8", "--steps", "2", "--profile-steps", "1",
                              "--cache-len", "64", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile_decode_step-tiny-CPU-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert json.loads(path.read_text())["env"]["cache_len"] == 64 and ", cache 64," in path.with_suffix(".md").read_text()
    assert [(r["config"], r["batch"]) for r in rows] == [("paiton", 1), ("paiton-pdl", 1)]
    assert {k["name"] for k in rows[0]["kernels"]} == {k["name"] for k in rows[1]["kernels"]}


@pytest.mark.parametrize("fp8", [False, True])
def test_pdl_chain_smoke(tmp_path, fp8):
    """bench/pdl_chain.py on CPU: the chain of a decode layer's products and norms runs in both
    modes (eagerly: no CUDA graph, no PDL on a CPU) with the same result, and says it was not timed."""
    import pdl_chain

    assert pdl_chain.main(["--model", "tiny", "--layers", "2", "--device", "cpu", "--out", str(tmp_path)]
                          + (["--fp8"] if fp8 else [])) == 0
    (path,) = tmp_path.glob(f"pdl_chain-tiny{'-fp8' if fp8 else ''}-CPU-*.json")
    result = json.loads(path.read_text())["result"]
    assert result["outputs_equal"] and not result["pdl_launched"] and result["plain_us_per_layer"] is None
    assert "Not timed (no GPU)" in path.with_suffix(".md").read_text()


@pytest.mark.parametrize("runs", ["paiton", "paiton@", "paiton@0", "paiton@x", "nonesuch@1"])
def test_profile_decode_step_runs_usage_errors(runs, capsys):
    import profile_decode_step

    with pytest.raises(SystemExit):
        profile_decode_step.main(["--model", "tiny", "--device", "cpu", "--runs", runs])
    expected = "unknown configuration" if runs.startswith("nonesuch") else "--runs wants CONFIG@BATCH"
    assert expected in capsys.readouterr().err


def test_decode_loop_compare_smoke(tmp_path):
    import decode_loop_compare

    decode_loop_compare.main(["--models", "tiny", "--batches", "1,2", "--configs", "eager,paiton", "--device", "cpu",
                              "--inner", "eager", "--prompt-len", "8", "--new-tokens", "4", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("decode_loop-CPU-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["backend"], r["batch"]) for r in rows} == {(c, b) for c in ("eager", "paiton") for b in (1, 2)}
    for row in rows:
        assert row["sequences_equal_to_eager"] == row["batch"], row  # fp32: the same greedy tokens
        assert row["tpot_ms"] > 0 and row["ttft_ms"] > 0


def test_one_row_choices_are_listed_per_shape(monkeypatch):
    """Result files name the kernel each one-row shape ran with (a choice timed at first use can
    differ between runs) and what it was chosen on: the times, or the card's table."""
    from bench_common import one_row_choices_markdown

    from paiton.fusion import gemv

    config = gemv.gemv_config(16, 512, 8, 3)
    fp8_key = ("cuda:0", 4096, 4096, 4096, torch.bfloat16, False, torch.float8_e4m3fn)
    monkeypatch.setattr(gemv, "_CHOICES", {fp8_key: config,
                                           ("cuda:0", 4096, 12288, 12288, torch.bfloat16, True): config,
                                           ("cuda:0", 151936, 4096, 4096, torch.bfloat16, False): gemv.VENDOR})
    # An FP8 weight's choice is timed against its first candidate (no vendor one-row FP8 product):
    # the H200 run at ee8f8a3 stopped at the first FP8 row on a KeyError here.
    monkeypatch.setattr(gemv, "_TIMINGS", {fp8_key: dict(source="timed", first_candidate_us=12.0, chosen_us=9.5),
                                           ("cuda:0", 4096, 12288, 12288, torch.bfloat16, True): dict(source="timed", vendor_us=40.0, chosen_us=31.5),
                                           ("cuda:0", 151936, 4096, 4096, torch.bfloat16, False): dict(source="table")})
    lines = one_row_choices_markdown(gemv.chosen_launches()).strip().splitlines()
    gemv_text = "GEMV " + ", ".join(f"{k}={v}" for k, v in config.items())
    assert lines[-3] == f"- 4096 x 4096 bfloat16, weight float8_e4m3fn: {gemv_text}: 9.5 us, first candidate 12.0 us"
    assert lines[-2] == f"- 4096 x 12288 bfloat16 gated: {gemv_text}: 31.5 us, vendor 40.0 us"
    assert lines[-1] == "- 151936 x 4096 bfloat16: vendor (table)"
    assert one_row_choices_markdown([]) == ""


def test_decode_loop_timeline_splits_idle_time_by_cause():
    """profile_decode_loop's reading of a timeline (a hand-made one in kineto's format): token
    periods between the host's waits, GPU busy time with overlaps once, and each idle gap
    blamed on the host when the launch after it came late, on the device otherwise."""
    import profile_decode_loop

    def event(cat, name, ts, dur, tid=1, correlation=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": {} if correlation is None else {"correlation": correlation}}

    events = [
        event("cuda_runtime", "cudaEventSynchronize", 0, 10),  # the prefill's token: the window starts at 10
        event("cuda_runtime", "cudaEventSynchronize", 60, 50),
        event("cuda_runtime", "cudaEventSynchronize", 150, 60),  # the window ends at 210: two tokens
        event("cpu_op", "decode step", 0, 300),
        event("cpu_op", "aten::argmax", 94, 10),
        event("cuda_runtime", "cudaGraphLaunch", 5, 3, correlation=1),
        event("kernel", "_gemv_kernel", 10, 40, tid=7, correlation=1),
        event("kernel", "_rms_norm_kernel", 45, 45, tid=7, correlation=1),  # overlaps the first by 5 us
        event("cuda_runtime", "cudaLaunchKernel", 95, 2, correlation=2),  # after the GPU went idle at 90
        event("kernel", "argmax_kernel", 100, 5, tid=7, correlation=2),
        event("cuda_runtime", "cudaGraphLaunch", 20, 3, correlation=3),  # queued long before
        event("kernel", "_gemv_kernel", 115, 85, tid=7, correlation=3),
        {"ph": "s", "cat": "ac2g", "name": "flow", "ts": 5, "id": 1},  # not a complete event: ignored
    ]
    result = profile_decode_loop.analyze_trace(events, gap_us=5.0)
    assert result["tokens"] == 2 and result["period_us"] == 100 and result["median_period_us"] == 100
    assert result["host_wait_us"] == 55
    assert result["gpu_busy_us"] == (80 + 5 + 85) / 2 and result["gpu_idle_us"] == 15
    assert result["idle_in_gaps_us"] == {"host late": 5.0, "device": 5.0}
    assert result["gaps"] == [
        {"cause": "host late", "launched_by": "aten::argmax", "next": "argmax_kernel", "count_per_token": 0.5, "us_per_token": 5.0},
        {"cause": "device", "launched_by": "decode step", "next": "_gemv_kernel", "count_per_token": 0.5, "us_per_token": 5.0}]
    assert result["eager_work"] == [{"name": "argmax_kernel", "launches_per_token": 0.5, "us_per_token": 2.5}]
    assert result["categories"]["paiton GEMV (one-row products)"] == 125 / 2
    assert profile_decode_loop.analyze_trace(events[:1]) == {"tokens": 0}


def test_profile_decode_loop_smoke(tmp_path):
    import profile_decode_loop

    profile_decode_loop.main(["--model", "tiny", "--device", "cpu", "--configs", "paiton", "--paiton-inner", "eager",
                              "--loops", "bundled,engine", "--batch", "2", "--cache-len", "40",
                              "--prompt-len", "8", "--new-tokens", "3", "--profile-tokens", "3", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile_decode_loop-tiny-CPU-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(row["config"], row["loop"], row["batch"], row["cache_len"]) for row in rows] == [
        ("paiton", "bundled", 2, 40), ("paiton", "engine", 2, 40)]
    for row in rows:
        assert row["tpot_ms"] > 0 and row["profiled_tpot_ms"] > 0 and row["median_itl_ms"] > 0
        assert row["tokens"] == 0  # no GPU: no waits for a token on the timeline
        assert (tmp_path / row["trace"]).stat().st_size > 0
    with pytest.raises(SystemExit):  # a cache too short for the prompt and its tokens
        profile_decode_loop.main(["--model", "tiny", "--device", "cpu", "--prompt-len", "8", "--cache-len", "9"])


def test_profile_prefill_work_arithmetic():
    """profile_prefill's FLOPs, by hand for the tiny preset (2 layers, hidden 96, 4 heads and 2 KV
    heads of 24, intermediate 160, vocab 512): linear weights 192x96 + 96x96 + 320x96 + 96x160 =
    73728 a layer; prompts of 3 and 5 tokens in 16 padded tokens."""
    import profile_prefill

    assert profile_prefill.linear_flops_per_token("tiny") == 2 * 2 * 73728
    work = profile_prefill.burst_work("tiny", [3, 5], padded_tokens=16)
    attention = 2 * 2 * 4 * 24 * (3 * 4 + 5 * 6)  # layers x 2 x heads x head_dim x sum n(n+1)
    assert work == {"useful_flop": 294912 * 8 + attention + 2 * 96 * 512 * 2, "pad_flop": 294912 * 8}


def test_profile_prefill_smoke(tmp_path):
    """A burst of four prompts (20, 10, 30 and 5 tokens) under a 32-token prefill budget packs
    first fit in arrival order: 20 + 10, then 30, then 5 (buckets 32, 32, 16)."""
    import profile_prefill
    from serving_workload import Request, save_requests

    workload = tmp_path / "burst.json"
    save_requests(workload, [Request(list(range(1, n + 1)), 8) for n in (20, 10, 30, 5)], {"made": "by the test"})
    profile_prefill.main(["--model", "tiny", "--device", "cpu", "--configs", "paiton", "--paiton-inner", "eager",
                          "--requests", str(workload), "--num-prompts", "4", "--cache-len", "40",
                          "--max-prefill-tokens", "32", "--repeats", "2", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile_prefill-tiny-CPU-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert (row["config"], row["prompts"], row["prompt_tokens"], row["padded_tokens"]) == ("paiton", 4, 65, 80)
    assert row["prefill_tokens"] == [32, 32, 16] and len(row["bursts"]) == 2
    assert all(b["prefill_tokens"] == [32, 32, 16] and b["wall_ms"] > 0 for b in row["bursts"] + [row["profiled"]])
    assert row["useful_flop"] == profile_prefill.burst_work("tiny", [20, 10, 30, 5], 80)["useful_flop"]
    table = path.with_suffix(".md").read_text()
    assert "| paiton | 3 (32, 32, 16) |" in table and "--paiton-inner eager" in table
    assert row["warm_up"] == "bursts" and row["first_wall_ms"] == row["bursts"][0]["wall_ms"]
    # The server's warm-up instead of two bursts (with the old warm-up's logit rows): same bursts.
    profile_prefill.main(["--model", "tiny", "--device", "cpu", "--configs", "paiton", "--paiton-inner", "eager",
                          "--requests", str(workload), "--num-prompts", "4", "--cache-len", "40", "--max-prefill-tokens",
                          "32", "--repeats", "1", "--warm-up", "engine", "--warm-logit-rows", "2", "--tag", "engine",
                          "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile_prefill-tiny-CPU-*-engine.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert (row["warm_up"], row["warm_logit_rows"], row["prefill_tokens"]) == ("engine", [2], [32, 32, 16])
    assert "the engine's own" in path.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):  # a cache too short for the longest prompt and its first token
        profile_prefill.main(["--model", "tiny", "--device", "cpu", "--requests", str(workload), "--cache-len", "30"])


def test_detached_run_outlives_the_command_that_started_it(tmp_path):
    """bench/detached.sh: `start` returns while the run goes on (a process session of its own),
    each call copies what the run wrote so far to $OUT and says "running" or "done rc=N"."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "detached.sh"
    env = {**os.environ, "DETACHED_ROOT": str(tmp_path / "runs")}

    def call(*args, out):
        env["OUT"] = str(tmp_path / out)
        return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)

    # The run writes one result at once, then waits for a file the test creates: no race on timing.
    gate = tmp_path / "gate"
    command = (f'echo first > "$DETACHED_OUT/a.json"; echo progress; '
               f'while [ ! -e {gate} ]; do sleep 0.1; done; echo second > "$DETACHED_OUT/b.json"; exit 3')
    try:
        started = call("start", "job", "1", command, out="out1")
        assert started.returncode == 0 and started.stdout.strip().endswith("running"), started
        assert (tmp_path / "out1" / "a.json").read_text() == "first\n"
        assert "progress" in (tmp_path / "out1" / "job.log").read_text()
        assert call("start", "job", "1", command, out="out1").returncode == 2  # once per name
    finally:
        gate.touch()  # a failed assertion must not leave the run waiting forever
    finished = call("wait", "job", "30", out="out2")
    assert finished.stdout.strip().endswith("done rc=3"), finished
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["a.json", "b.json", "job.log"]
    never = call("wait", "other", "1", out="out3")
    assert never.returncode == 2 and "never started" in never.stderr


def test_detached_run_packed_into_one_archive(tmp_path):
    """bench/detached.sh with DETACHED_PACK=1: one NAME.tgz in $OUT holding the results folder,
    subfolders included, and the log (the device hands back at most 8 files)."""
    import os
    import subprocess
    import tarfile

    script = Path(__file__).resolve().parents[1] / "bench" / "detached.sh"
    env = {**os.environ, "DETACHED_ROOT": str(tmp_path / "runs"), "DETACHED_PACK": "1", "OUT": str(tmp_path / "out")}
    command = ('for i in 1 2 3 4 5 6 7 8 9; do echo $i > "$DETACHED_OUT/r$i.md"; done; '
               'mkdir "$DETACHED_OUT/x"; echo deep > "$DETACHED_OUT/x/p.json"; echo logged')
    started = subprocess.run(["bash", str(script), "start", "job", "30", command], env=env, capture_output=True,
                             text=True, timeout=60)
    assert started.stdout.strip().endswith("done rc=0"), started
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["job.tgz"]
    with tarfile.open(tmp_path / "out" / "job.tgz") as archive:
        names = set(archive.getnames())
        assert {f"out/r{i}.md" for i in range(1, 10)} | {"out/x/p.json", "job.log"} <= names
        assert archive.extractfile("out/x/p.json").read() == b"deep\n"
        assert b"logged" in archive.extractfile("job.log").read()


def test_fused_kernels_cases_at_prefill_sizes_leave_out_the_decode_only_ops():
    import fused_kernels

    def ops_of(tokens):
        return {(c["model"], c["op"], c["what"]) for c in fused_kernels.cases(tokens)}

    decode, prefill = ops_of((64,)), ops_of((1024,))
    assert {op for _, op, _ in decode} >= set(fused_kernels.DECODE_ONLY_OPS)
    # At 1024 tokens (a prefill) the same cases but the decode-only ones, for both models.
    assert prefill == {c for c in decode if c[1] not in fused_kernels.DECODE_ONLY_OPS}
    assert all(c["rows"] % 1024 == 0 and c["tokens"] == 1024 for c in fused_kernels.cases((1024,)))


def test_fp8_accuracy_on_the_tiny_model_within_the_stated_bounds(tmp_path):
    """bench/fp8_accuracy.py on the tiny preset (bf16 reference, 160 teacher-forced tokens), random
    and outlier weights. The bounds stated for per-channel FP8 (measured on CPU, 2026-12-02:
    mean |dlogit| / std 0.027-0.037, max / std 0.19-0.32, greedy agreement 91-92%; bf16's own
    distance from fp32 5-7x smaller): mean / std <= 0.06, max / std <= 0.6, agreement >= 85%,
    and FP8 farther from the reference than bf16 is from fp32 (the comparison sees quantization)."""
    import fp8_accuracy

    fp8_accuracy.main(["--models", "tiny", "--tokens", "160", "--device", "cpu", "--baseline", "--lm-head",
                       "--out", str(tmp_path)])
    (path,) = tmp_path.glob("fp8_accuracy-CPU-*.json")
    rows = json.loads(path.read_text())["rows"]
    fp8 = [r for r in rows if r["fp8"].startswith("float8")]
    baseline = {r["weights"]: r for r in rows if r["fp8"].startswith("none")}
    assert sorted((r["weights"], r["lm_head"]) for r in fp8) == [("outliers", False), ("outliers", True),
                                                                  ("random", False), ("random", True)]
    assert len(baseline) == 2
    for decoder_only, with_head in zip(fp8[::2], fp8[1::2]):  # --lm-head: the same decoder, its lm_head quantized too
        assert with_head["lm_head"] and with_head["mean_logit_diff"] != decoder_only["mean_logit_diff"]
    for r in fp8:
        assert r["tokens"] == 160 and r["fp8"] == "float8_e4m3fn"
        assert r["mean_diff_over_std"] <= 0.06 and r["max_diff_over_std"] <= 0.6, r
        assert r["greedy_agreement"] >= 0.85, r
        assert r["mean_logit_diff"] > 2 * baseline[r["weights"]]["mean_logit_diff"], (r, baseline)
    assert path.with_suffix(".md").read_text().count("| tiny |") == 6 and path.with_suffix(".png").stat().st_size > 0


def test_swiglu_out_sweep_checks_both_ways_on_a_cpu(tmp_path):
    """bench/swiglu_out_sweep.py on a CPU: both ways of the batch-1 MLP (SwiGLU in down_proj's
    loop, or in gate/up's last step) give the same output bit for bit, FP8 and float32 weights;
    untimed, and its table says so."""
    import swiglu_out_sweep

    assert swiglu_out_sweep.main(["--models", "tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("swiglu_out_sweep-CPU-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["weights"], r["outputs_equal"]) for r in rows] == [("e4m3fn (row scales)", True), ("float32", True)]
    assert [r["timed_launches_relative_difference"] for r in rows] == [0.0, 0.0]  # the interpreter's one launch
    assert "Not timed (no GPU)" in path.with_suffix(".md").read_text()


def test_fp8_gemm_sweep_says_it_needs_a_gpu(capsys):
    """bench/fp8_gemm_sweep.py times GPU kernels only: on a CPU it exits with 2 and says why."""
    import fp8_gemm_sweep
    import pytest

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the sweep would run")
    assert fp8_gemm_sweep.main(["--models", "qwen3-8b", "--rows", "1,2"]) == 2
    assert "needs a CUDA or ROCm GPU" in capsys.readouterr().err


def test_tensor_parallel_smoke(tmp_path):
    """bench/tensor_parallel.py at TP 1 (it writes the reference tokens), then under torchrun at
    TP 2 on gloo (it reads them): fp32, so the TP 2 tokens equal TP 1's."""
    import os
    import subprocess

    script = str(Path(__file__).resolve().parents[1] / "bench" / "tensor_parallel.py")
    arguments = ["--model", "tiny", "--device", "cpu", "--inner", "eager", "--batch-sizes", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--out", str(tmp_path)]
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}  # Paiton's ops on their CPU references
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]):
        result = subprocess.run([*launcher, script, *arguments], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert os.environ.get("NCCL_NVLS_ENABLE") is None  # the script sets it for itself only
    (tp2,) = tmp_path.glob("tensor_parallel-tiny-tp2-CPU-*.json")
    found = json.loads(tp2.read_text())
    assert found["env"]["tp"] == 2 and [r["batch"] for r in found["rows"]] == [2]
    row = found["rows"][0]
    assert row["sequences_equal_to_tp1"] == 2 and row["tpot_vs_tp1"] > 0 and row["total_tokens_per_s"] > 0, row
    assert "| 2 | 2 |" in tp2.with_suffix(".md").read_text()

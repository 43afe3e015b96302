"""Smoke runs of the GPU benchmark scripts on CPU with the tiny preset: they run end to end
and write well-formed results (the numbers themselves only mean something on a GPU)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_profile_decode_step_smoke(tmp_path):
    import profile_decode_step

    profile_decode_step.main(["--model", "tiny", "--device", "cpu", "--batches", "1,2", "--configs", "paiton",
                              "--paiton-inner", "eager", "--prompt-len", "8", "--steps", "2", "--profile-steps", "1",
                              "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile_decode_step-tiny-CPU-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["config"], r["batch"]) for r in rows] == [("paiton", 1), ("paiton", 2)]
    for row in rows:
        names = {k["name"] for k in row["kernels"]}
        # A decode step of the tiny model runs Paiton's fused ops, two layers' worth each; at
        # batch 1 SwiGLU is inside down_proj's one-row product.
        swiglu = "paiton::silu_mul_packed_linear" if row["batch"] == 1 else "paiton::silu_mul"
        assert {"paiton::decode_attention", "paiton::qk_norm_rope_cache", swiglu} <= names, names
        assert row["categories"]["paiton kernels"] > 0 and row["step_us"] > 0
        assert abs(sum(row["categories"].values()) - row["kernel_us"]) < 1e-6 * max(row["kernel_us"], 1)
    assert "| paiton | 2 |" in path.with_suffix(".md").read_text()


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
    """Result files name the kernel each one-row shape ran with (the choice is timed at first
    use, so it can differ between runs) and the times it was chosen on."""
    from bench_common import one_row_choices_markdown

    from paiton.fusion import gemv

    config = gemv.gemv_config(16, 512, 8, 3)
    monkeypatch.setattr(gemv, "_CHOICES", {("cuda:0", 4096, 12288, 12288, torch.bfloat16, True): config,
                                           ("cuda:0", 151936, 4096, 4096, torch.bfloat16, False): gemv.VENDOR})
    monkeypatch.setattr(gemv, "_TIMINGS", {("cuda:0", 4096, 12288, 12288, torch.bfloat16, True): dict(vendor_us=40.0, chosen_us=31.5)})
    lines = one_row_choices_markdown(gemv.chosen_launches()).strip().splitlines()
    assert lines[-2] == "- 4096 x 12288 bfloat16 gated: GEMV " + ", ".join(f"{k}={v}" for k, v in config.items()) + \
        ": 31.5 us, vendor 40.0 us"
    assert lines[-1] == "- 151936 x 4096 bfloat16: vendor"
    assert one_row_choices_markdown([]) == ""

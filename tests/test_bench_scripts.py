"""Smoke runs of the GPU benchmark scripts on CPU with the tiny preset: they run end to end
and write well-formed results (the numbers themselves only mean something on a GPU)."""

import json
import sys
from pathlib import Path

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

"""Tensor parallelism (models/tensor_parallel.py, models/tp_runtime.py) on CPU: 2 and 4 gloo
processes started with torchrun (tests/tp_worker.py), each building the same tiny Qwen3 and
keeping its shard. The sharded model's logits equal the unsharded model's (eager and compiled
with Paiton), the bundled loop gives the unsharded model's greedy tokens, Paiton's all-reduce +
add + RMSNorm pass fires on every row-parallel product; with rank 0 scheduling and
broadcasting each step, the Engine (continuous batching) and the DecodeLoop give the unsharded
ones' tokens; a rank that dies, or hangs, makes the others fail with an error (a hang: after
the process group's timeout) instead of waiting forever."""

import json
import os
import subprocess
import sys
import time

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def torchrun(ranks: int, mode: str, out, timeout_s: float = 60.0, limit_s: float = 600.0, monitor_s: float | None = None):
    """`monitor_s`: how often torchrun's agent looks at its workers (it ends the others once one
    has failed, which can beat a survivor to writing what it saw)."""
    monitor = [f"--monitor-interval={monitor_s}"] if monitor_s is not None else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *monitor,
               WORKER, mode, str(out), str(timeout_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}  # the ops' CPU references
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=limit_s)
    return result, time.perf_counter() - start


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_model_equals_the_unsharded_one(tmp_path, ranks):
    out = tmp_path / "result.json"
    result, _ = torchrun(ranks, "parity", out)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["tp"] == ranks and found["local_heads"] == 8 // ranks and found["local_kv_heads"] == 4 // ranks
    assert found["eager_max_diff"] < 1e-5 and found["compiled_max_diff"] < 1e-5, found
    assert found["tokens_equal"]
    layers = 2
    for graph in found["graphs"]:  # the bundled loop's prefill and decode graphs
        # o_proj and down_proj's all-reduce joins the add + RMSNorm after it: 2 a layer.
        assert graph["all_reduce_add_rms_norm"] == 2 * layers and graph["fused_add_rms_norm"] == 2 * layers, graph
        assert graph["merged_projections"] == 2 * layers and graph["qk_norm_rope"] == layers


def _steps(out, ranks):
    return [json.loads(out.with_name(f"{out.name}.rank{r}").read_text()) for r in range(ranks)]


def test_engine_under_tp2_gives_the_unsharded_engines_tokens(tmp_path):
    """Rank 0 schedules five requests of 1-17 tokens through two slots (so requests wait, are
    prefilled while others decode, and a row is compacted as the batch drains) and broadcasts
    each step; the follower runs every one of them, and the greedy tokens equal those of the
    unsharded model's single-process Engine."""
    out = tmp_path / "result.json"
    result, _ = torchrun(2, "engine", out)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["tokens"] == found["expected"], found
    assert [len(t) for t in found["tokens"]] == [9, 3, 6, 2, 7]
    leader, follower = _steps(out, 2)
    assert leader == follower, (leader, follower)  # the follower ran each step rank 0 sent
    assert leader["prefill"] == found["engine_steps"]["prefill"] >= 3 and leader["decode"] == found["engine_steps"]["decode"]
    assert leader.get("move_row", 0) >= 1, leader  # compaction's row copies are steps too
    assert found["compiled_graphs"] == 3


def test_decode_loop_under_tp2_gives_the_unsharded_loops_tokens(tmp_path):
    """A ragged batch of four with per-row limits (the batch shrinks from 4 to 2 rows as rows
    finish), then a second generate at batch 1: rank 0's tokens equal the unsharded loop's."""
    out = tmp_path / "result.json"
    result, _ = torchrun(2, "decode_loop", out)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["tokens"] == found["expected"] and found["second"] == found["expected_second"], found
    leader, follower = _steps(out, 2)
    assert leader == follower == {"cache": 2, "forward": leader["forward"], "shrink": 1}, (leader, follower)


def test_a_rank_that_dies_makes_the_others_fail(tmp_path):
    """Rank 1 exits after both have built the model; rank 0's next collective raises at once
    (its peer's socket closed), long before the 60 s timeout. torchrun's agent looks every 5 s
    here, so it does not end rank 0 before rank 0 has written the error (under load, once, it did)."""
    out = tmp_path / "result.json"
    result, seconds = torchrun(2, "dead_rank", out, timeout_s=60, monitor_s=5)
    assert result.returncode != 0
    found = json.loads(out.read_text())
    assert found["error"] and "closed by peer" in found["error"] and found["seconds"] < 30, found


def test_a_rank_that_hangs_times_the_others_out(tmp_path):
    """The stated timeout (init_tensor_parallel's timeout_s, 5 s here): rank 0's collective
    raises after it, and the run ends well before the hanging rank would have."""
    out = tmp_path / "result.json"
    result, seconds = torchrun(2, "stuck_rank", out, timeout_s=5)
    assert result.returncode != 0
    found = json.loads(out.read_text())
    assert found["error"] and "Timed out" in found["error"], found
    assert 4.5 <= found["seconds"] <= 20 and seconds < 55, (found, seconds)


def test_degrees_that_do_not_divide_the_model_are_refused():
    from paiton.models.qwen3 import qwen3_config
    from paiton.models.tensor_parallel import check_divisible

    check_divisible(qwen3_config("qwen3-32b"), 8)  # 64 heads, 8 KV heads, 25600, 151936: TP 8 fits
    with pytest.raises(ValueError, match="num_key_value_heads=8"):
        check_divisible(qwen3_config("qwen3-32b"), 16)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        check_divisible(qwen3_config("tiny"), 4)


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_the_cli_refuses_a_degree_it_cannot_run(monkeypatch, capsys, command):
    """Before joining any process group: a degree without as many processes names the torchrun
    command, and one the model's heads do not divide names the head count."""
    from paiton.cli import main

    extra = ["--prompt-ids", "1,2"] if command == "generate" else []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([command, "--model", "tiny", "--tensor-parallel", "2", *extra]) == 2
    assert "torchrun --nproc-per-node 2 -m paiton " + command in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc-per-node 4 sets it
    monkeypatch.setenv("RANK", "3")
    assert main([command, "--model", "tiny", *extra]) == 2
    assert "[paiton rank 3] tensor parallel degree 4 must divide num_key_value_heads=2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command, "--model", "tiny", "--tensor-parallel", "0", *extra])


def test_the_vocab_parallel_head_gathers_along_dim_0_and_places_the_ranks_side_by_side(monkeypatch):
    """The lm_head's all-gather asks the collective for dim 0 only (torch 2.11's all_gather_tensor
    rearranges another gather_dim in a helper Dynamo will not trace: a compiled TP model failed
    there), and puts the ranks' vocabulary blocks side by side itself. Two ranks, simulated: the
    gather stacks rank 0's logits over rank 1's (its own weights' logits plus 100)."""
    import torch
    import torch.distributed._functional_collectives as funcol

    from paiton.models.tensor_parallel import VocabParallelHead

    asked = []

    def two_ranks_gather(tensor, gather_dim, group):
        asked.append(gather_dim)
        return torch.cat([tensor, tensor + 100], dim=gather_dim)

    monkeypatch.setattr(funcol, "all_gather_tensor", two_ranks_gather)
    weight = torch.randn(6, 4)
    head = VocabParallelHead(weight, group=None, parts=2)
    x = torch.randn(2, 3, 4)
    local = torch.nn.functional.linear(x, weight)
    assert torch.equal(head(x), torch.cat([local, local + 100], dim=-1))
    assert asked == [0]

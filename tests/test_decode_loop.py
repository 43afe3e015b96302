"""The bundled decode loop on a tiny random Qwen3 (fp32, CPU): eager loop = transformers' eager
generate token for token; Paiton-compiled loop = eager loop; ragged batches give each
sequence the tokens it gets alone; stop tokens, sampling, streaming, timing, bucketing."""

import pytest
import torch
from paiton_testing import EAGER_INNER, qwen3_fusions

import paiton
from paiton.models.decode_loop import DecodeLoop, Sampling, prompt_bucket, sample
from paiton.models.hf_loop import hf_static_cache_greedy
from paiton.models.qwen3 import build_qwen3

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23]]


@pytest.fixture(scope="module")
def model():
    return build_qwen3("tiny", dtype=torch.float32, num_hidden_layers=2, seed=3)


@pytest.fixture(scope="module")
def eager_loop(model):
    return DecodeLoop(model, max_batch_size=4, max_length=64, backend="eager")


def test_eager_loop_equals_transformers_generate(model, eager_loop):
    for prompt in PROMPTS:
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  cache_implementation="static")[0, len(prompt):].tolist()
        assert eager_loop.generate([prompt], 12).tokens == [expected]


def test_ragged_batch_rows_equal_their_prompts_alone(eager_loop):
    """Padding never leaks: each row of a left-padded batch gives what the prompt gives alone."""
    together = eager_loop.generate(PROMPTS, 12)
    assert together.tokens == [eager_loop.generate([p], 12).tokens[0] for p in PROMPTS]
    assert together.prompt_lengths == [5, 9, 3] and together.finish_reasons == ["length"] * 3


def test_three_loops_give_paiton_the_same_greedy_tokens(model, eager_loop):
    """A Paiton-compiled model in the bundled loop, in transformers' generate, and in a plain
    loop of a few lines (hf_static_cache_greedy) picks eager's tokens in each."""
    torch._dynamo.reset()
    expected = eager_loop.generate(PROMPTS, 10).tokens
    loop = DecodeLoop(model, max_batch_size=4, max_length=64, options=EAGER_INNER)
    assert loop.generate(PROMPTS, 10).tokens == expected
    graphs = paiton.fusion_graphs(model)
    # Prefill (padded to 16 tokens: SDPA) and the decode step (the decode kernel, with the
    # loop's mask passed in).
    assert [g.counts for g in graphs] == [qwen3_fusions(2, queries=16, batch=3, last_logits_only=True),
                                         qwen3_fusions(2, queries=1, batch=3)]

    compiled = torch.compile(model, backend="paiton", options=EAGER_INNER)
    plain = hf_static_cache_greedy(compiled, model, torch.tensor([PROMPTS[0]]), new_tokens=10)
    assert [logits.argmax(-1).item() for logits in plain] == expected[0]

    from transformers import CompileConfig

    config = CompileConfig(backend="paiton", fullgraph=True, mode=None, options=EAGER_INNER)
    config._compile_all_devices = True  # transformers compiles only on GPUs otherwise
    generated = model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                               cache_implementation="static", compile_config=config)
    assert generated[0, len(PROMPTS[1]):].tolist() == expected[1]


def test_each_sequence_stops_on_its_own(eager_loop):
    free = eager_loop.generate(PROMPTS, 12).tokens
    stop = free[0][2]  # the first sequence's third token
    result = eager_loop.generate(PROMPTS, 12, stop_token_ids=[stop])
    for row, (tokens, reason) in enumerate(zip(result.tokens, result.finish_reasons)):
        if stop in free[row]:
            end = free[row].index(stop) + 1
            assert tokens == free[row][:end] and reason == "stop"
        else:
            assert tokens == free[row] and reason == "length"
    assert result.tokens[0] == free[0][:3]


def test_streaming_and_timing(eager_loop):
    seen = []
    result = eager_loop.generate(PROMPTS[:2], 6, on_token=lambda b, token, t: seen.append((b, token, t)))
    assert [(b, tok) for b, tok, _ in seen if b == 0] == [(0, tok) for tok in result.tokens[0]]
    assert len(seen) == 12
    for times in result.token_times:
        assert times == sorted(times) and times[0] > 0
    assert result.ttft_s == [t[0] for t in result.token_times]
    assert all(tpot > 0 for tpot in result.tpot_s) and all(len(itl) == 5 for itl in result.itl_s)


def test_the_next_step_is_enqueued_before_a_token_is_read(model):
    loop = DecodeLoop(model, max_batch_size=2, max_length=64, backend="eager")
    calls = []
    forward = loop.forward
    loop.forward = lambda **kwargs: (calls.append(kwargs["input_ids"].shape), forward(**kwargs))[1]
    steps_before_token = []
    free = loop.generate([PROMPTS[0]], 5, on_token=lambda b, token, t: steps_before_token.append(len(calls))).tokens[0]
    # Token i reaches the host after the step that makes token i+1 was enqueued (prefill +
    # i + 1 calls); after the last token no step is needed, and none is wasted.
    assert steps_before_token == [2, 3, 4, 5, 5] and len(calls) == 5
    calls.clear()
    stopped = loop.generate([PROMPTS[0]], 5, stop_token_ids=[free[1]])
    # A stop token can't be foreseen: the step past it runs (prefill + one call per token), and
    # its token is dropped.
    assert stopped.tokens == [free[:free.index(free[1]) + 1]] and len(calls) == len(stopped.tokens[0]) + 1
    assert loop.generate([PROMPTS[0]], 5, keep_logits=3).logits[2].shape == (1, model.config.vocab_size)


def test_sampling_is_seeded_and_filters_work(eager_loop):
    hot = Sampling(temperature=1.5, seed=7)
    first, again = eager_loop.generate(PROMPTS, 8, hot).tokens, eager_loop.generate(PROMPTS, 8, hot).tokens
    assert first == again
    assert eager_loop.generate(PROMPTS, 8, Sampling(temperature=1.5, seed=8)).tokens != first
    greedy = eager_loop.generate(PROMPTS, 8).tokens
    assert eager_loop.generate(PROMPTS, 8, Sampling(temperature=2.0, top_k=1, seed=1)).tokens == greedy
    assert eager_loop.generate(PROMPTS, 8, Sampling(temperature=2.0, top_p=1e-6, seed=1)).tokens == greedy


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    top_k = sample(logits, Sampling(temperature=1.0, top_k=2), generator)
    assert set(top_k.tolist()) == {0, 1}
    # softmax of [4, 3, 2, 1, 0] = 0.636, 0.234, 0.086, ...: top_p 0.8 keeps the first two.
    top_p = sample(logits, Sampling(temperature=1.0, top_p=0.8), generator)
    assert set(top_p.tolist()) == {0, 1}


def test_prompt_buckets():
    assert [prompt_bucket(n, 1024) for n in (1, 16, 17, 100, 1000)] == [16, 16, 32, 128, 1024]
    assert prompt_bucket(40, 48) == 48


def test_a_request_that_fits_the_cache_is_taken(model):
    """max_length 40 (not a power of two): a 20-token prompt would pad to 32 and leave 8; it
    pads to 25 instead and takes 15 new tokens."""
    loop = DecodeLoop(model, max_batch_size=1, max_length=40, backend="eager")
    assert len(loop.generate([list(range(1, 21))], 15).tokens[0]) == 15


def test_bad_requests_are_clear_errors(eager_loop):
    with pytest.raises(ValueError, match="batch of 5 prompts; this loop takes 1 to 4"):
        eager_loop.generate([[1]] * 5, 4)
    with pytest.raises(ValueError, match="exceed max_length 64"):
        eager_loop.generate([[1] * 40], 30)
    with pytest.raises(ValueError, match="at least one token"):
        eager_loop.generate([[]], 4)
    with pytest.raises(ValueError, match="2 max_new_tokens for 3 prompts"):
        eager_loop.generate(PROMPTS, [4, 4])
    with pytest.raises(ValueError, match="at least 1"):
        eager_loop.generate(PROMPTS, [4, 0, 4])
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_generate_command(capsys, tmp_path):
    from paiton.cli import main

    assert main(["generate", "--prompt-ids", "5,6,7,8,9", "--prompt-ids", "21,22,23", "--max-new-tokens", "6",
                 "--backend", "eager", "--no-stream", "--seed", "3", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    model = build_qwen3("tiny", dtype=torch.float32, seed=3)
    expected = DecodeLoop(model, max_batch_size=2, max_length=64, backend="eager").generate([PROMPTS[0], PROMPTS[2]], 6)
    for b, tokens in enumerate(expected.tokens):
        assert f"seq {b} (length, 6 tokens): {' '.join(map(str, tokens))}" in out

    # A text prompt needs a tokenizer; a checkpoint without one is a clear error (exit 2).
    model.save_pretrained(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hello", "--backend", "eager"]) == 2
    assert "needs a checkpoint directory with a tokenizer" in capsys.readouterr().err
    assert main(["generate", "--model", "qwen3-1b", "--prompt-ids", "1"]) == 2
    assert main(["generate", "--prompt-ids", "1,x"]) == 2


def test_four_graphs_for_every_batch_size_and_prompt_length():
    """Batch sizes of 2 or more share one prefill and one decode graph (the batch is dynamic),
    whatever the prompt length (dynamic in prefill); batch 1 adds its own two; and the answers
    are those of the uncompiled model."""
    torch._dynamo.reset()
    model = build_qwen3("tiny", dtype=torch.float32, num_hidden_layers=1)
    loop = DecodeLoop(model, max_batch_size=4, max_length=64, options=EAGER_INNER)
    reference = DecodeLoop(model, max_batch_size=4, max_length=64, backend="eager")
    requests = ([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11], [12] * 20], [[13], [14], [15], list(range(1, 30))])
    for prompts in requests:
        assert loop.generate(prompts, 4).tokens == reference.generate(prompts, 4).tokens
    assert len(paiton.fusion_graphs(model)) == 2
    for prompts in ([[1, 2, 3]], [list(range(1, 22))]):  # batch 1, prompt buckets 16 and 32
        assert loop.generate(prompts, 4).tokens == reference.generate(prompts, 4).tokens
    assert len(paiton.fusion_graphs(model)) == 4
    counts = paiton.fusion_counts(model)
    assert counts["decode_attention"] == 2 and counts["kv_cache_write"] == 4, counts  # 1 layer, 4 graphs


def test_finished_sequences_leave_the_batch(model, eager_loop):
    """Per-sequence limits and a stop token: once half the rows are done the live sequences
    move to a smaller batch (cache rows gathered), and every sequence still gives the tokens it
    gives alone; compiled, the smaller batch reuses the dynamic-batch graphs."""
    torch._dynamo.reset()
    prompts = PROMPTS + [[31, 32, 33, 34, 35, 36, 37]]
    limits = [2, 12, 3, 9]
    alone = [eager_loop.generate([p], n).tokens[0] for p, n in zip(prompts, limits)]
    shrinks = []
    original = DecodeLoop._shrink

    def counting_shrink(self, cache, kept_rows):
        shrinks.append(list(kept_rows))
        return original(self, cache, kept_rows)

    compiled = DecodeLoop(model, max_batch_size=4, max_length=64, options=EAGER_INNER)
    for loop in (eager_loop, compiled):
        shrinks.clear()
        try:
            DecodeLoop._shrink = counting_shrink
            result = loop.generate(prompts, limits)
        finally:
            DecodeLoop._shrink = original
        assert result.tokens == alone and result.finish_reasons == ["length"] * 4
        assert shrinks == [[1, 3]]  # after 3 tokens rows 0 and 2 are done: batch 4 -> 2
    assert len(paiton.fusion_graphs(model)) == 2  # one prefill, one decode graph: the batch is dynamic

    stop = alone[1][4]  # sequence 1 stops at its 5th token (or earlier, if the token repeats)
    result = compiled.generate(prompts, limits, stop_token_ids=[stop])
    for tokens, reason, free in zip(result.tokens, result.finish_reasons, alone):
        end = free.index(stop) + 1 if stop in free else len(free)
        assert tokens == free[:end] and reason == ("stop" if stop in free else "length")

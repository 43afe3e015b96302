"""The continuous-batching engine (models/engine.py) on a tiny random Qwen3 (fp32, CPU): every
request gives what it gives alone through the bundled loop, whatever else shares the batch;
slots are reused; the compiled graphs stay three; stops, aborts, sampling and bad requests."""

import collections
import threading

import pytest
import torch
from paiton_testing import EAGER_INNER, fusions

import paiton
from paiton.models.decode_loop import DecodeLoop, Sampling
from paiton.models.engine import Engine, EngineError, EngineRequest, logit_rows_bucket
from paiton.models.qwen3 import build_qwen3

# Different prompt and output lengths, more requests than slots.
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23], [1, 2], [7] * 20, [3, 4, 5, 6],
           [40 + i for i in range(13)], [99], [8, 9, 10, 11, 12, 13, 14]]
LIMITS = [12, 5, 9, 14, 3, 7, 10, 6, 11]


@pytest.fixture(scope="module")
def model():
    return build_qwen3("tiny", dtype=torch.float32, num_hidden_layers=2, seed=3)


@pytest.fixture(scope="module")
def alone(model):
    """Each request's greedy tokens alone through the bundled (static) loop, eager."""
    loop = DecodeLoop(model, max_batch_size=1, max_length=64, backend="eager")
    return [loop.generate([p], n).tokens[0] for p, n in zip(PROMPTS, LIMITS)]


def test_eager_engine_gives_each_request_its_solo_tokens(model, alone):
    engine = Engine(model, max_slots=4, max_length=64, backend="eager", max_prefill_tokens=32)
    result = engine.generate(PROMPTS, LIMITS)
    assert result.tokens == alone
    assert result.finish_reasons == ["length"] * len(PROMPTS)
    # 9 requests through 4 slots: several prefills, each packing what fits.
    assert engine.steps["prefill"] >= 3 and engine.live_slots == 0
    assert all(len(t) == len(tokens) for t, tokens in zip(result.token_times, result.tokens))


def test_paiton_engine_equals_eager_with_three_graphs(model, alone):
    """Through backend="paiton": the same tokens; 16 requests of mixed lengths through 4 slots
    compile three graphs (decode at batch 1, decode at other batches, prefill); prefill attends
    within each packed prompt with Paiton's kernel, the decode
    graphs write the cache and attend with Paiton's kernels (each row at its own position), their
    other linears through the one-row GEMV (batch 1) or the few-rows GEMM (batch 2 and up)."""
    engine = Engine(model, max_slots=4, max_length=64, options=EAGER_INNER, max_prefill_tokens=32)
    assert engine.generate(PROMPTS, LIMITS).tokens == alone
    more = [[(7 * i + j) % 500 for j in range(1 + (5 * i) % 17)] for i in range(16)]
    limits = [1 + (3 * i) % 9 for i in range(16)]
    loop = DecodeLoop(model, max_batch_size=1, max_length=64, backend="eager")
    assert engine.generate(more, limits).tokens == [loop.generate([p], n).tokens[0] for p, n in zip(more, limits)]
    assert engine.compiled_graphs() == 3
    counts = sorted((g.counts for g in paiton.fusion_graphs(model)), key=lambda c: (c["one_row_linear"], c["kv_cache_write"]))
    layers = 2
    common = dict(merged_projections=2 * layers, fused_add_rms_norm=2 * layers, rms_norm=2 * layers + 1,
                  qk_norm_rope=layers, swiglu=layers)
    assert counts == [
        # prefill: attention within each packed prompt (Paiton's kernel), its cache write left to Inductor
        fusions(**common, prefill_attention=layers),
        fusions(**common, kv_cache_write=layers, decode_attention=layers,  # decode, batch 2 and up
                few_rows_linear=2 * layers + 1, swiglu_out=layers),
        fusions(**common, kv_cache_write=layers, decode_attention=layers,  # decode at batch 1: the GEMVs too
                one_row_linear=2 * layers + 1, silu_mul_linear=layers),
    ]


def test_prefill_packs_first_fit_in_arrival_order(model):
    """Prompts of 40, 40, 20 and 20 tokens at once under a 64-token budget: two prefills, [40, 20]
    and [40, 20] (in strict arrival order [40], [40, 20], [20]: three), the passed-over 40 first
    in the second; each request still gives its solo tokens, and a pass-over that finds
    nothing to fit leaves the queue's order as it was."""
    prompts = [[(11 * i + j) % 300 for j in range(n)] for i, n in enumerate((40, 40, 20, 20))]
    limits = [4, 5, 6, 3]
    engine = Engine(model, max_slots=4, max_length=64, backend="eager", max_prefill_tokens=64)
    admitted = []
    engine.step_hook = lambda verb, *tensors: admitted.append(int(tensors[2].unique().numel())) if verb == "prefill" else None
    result = engine.generate(prompts, limits)
    loop = DecodeLoop(model, max_batch_size=1, max_length=64, backend="eager")
    assert result.tokens == [loop.generate([p], n).tokens[0] for p, n in zip(prompts, limits)]
    assert engine.steps["prefill"] == 2
    # rows per prefill: 2 requests' slots and the padding's scratch row
    assert admitted == [3, 3]

    order = [EngineRequest([1] * 50, 2), EngineRequest([2] * 50, 2), EngineRequest([3] * 50, 2)]
    for request in order:
        engine.submit(request)
    engine._take_inbox()
    assert engine._prefill_waiting() and list(engine._waiting) == order[1:]


def test_a_burst_is_prefilled_before_the_next_decode_step(model):
    """Four 40-token prompts at once under a 64-token budget take four prefills: all four run
    before the first decode step (none in between, which would delay the last prompt's first
    token by a step), and later arrivals are prefilled as slots free; each request still gives
    its solo tokens."""
    prompts = [[(13 * i + j) % 400 for j in range(40)] for i in range(6)]
    limits = [3, 4, 5, 6, 2, 3]
    engine = Engine(model, max_slots=4, max_length=64, backend="eager", max_prefill_tokens=64)
    verbs = []
    engine.step_hook = lambda verb, *tensors: verbs.append(verb)
    result = engine.generate(prompts, limits)
    loop = DecodeLoop(model, max_batch_size=1, max_length=64, backend="eager")
    assert result.tokens == [loop.generate([p], n).tokens[0] for p, n in zip(prompts, limits)]
    assert verbs[:5] == ["prefill"] * 4 + ["decode"] and verbs.count("prefill") == 6


def test_a_prefill_bucket_longer_than_the_cache(model):
    """Two 35-token prompts packed into one 128-token bucket over a 48-slot cache: 58 padding
    tokens, more than the scratch row's slots; they wrap around it, nothing is written out of
    range, and each request gives its solo tokens."""
    prompts = [[(3 * i + j) % 500 for i in range(35)] for j in (1, 2)]
    loop = DecodeLoop(model, max_batch_size=1, max_length=48, backend="eager")
    alone = [loop.generate([p], 8).tokens[0] for p in prompts]
    engine = Engine(model, max_slots=2, max_length=48, backend="eager", max_prefill_tokens=128)
    assert engine.generate(prompts, 8).tokens == alone and engine.steps["prefill"] == 1


def test_warm_up_reports_each_shape_as_it_is_ready(model, alone):
    """warm_up's progress hears of the first request (the compiles), then each prefill bucket and
    decode batch size once, in order, with the seconds since its start; the engine serves as
    before after it."""
    engine = Engine(model, max_slots=2, max_length=48, backend="eager", max_prefill_tokens=32)
    heard = []
    seconds = engine.warm_up(progress=lambda what, at: heard.append((what, at)))
    assert [what for what, _ in heard] == ["first prefill (16 tokens) and decode steps (the compiles)",
                                           "prefill of 16 tokens", "prefill of 32 tokens", "decode at batch 1",
                                           "decode at batch 2"]
    times = [at for _, at in heard]
    assert times == sorted(times) and 0 < times[-1] <= seconds
    assert engine.generate(PROMPTS[:2], LIMITS[0]).tokens[0] == alone[0]


@pytest.mark.parametrize("concurrency", [8, 2])
def test_warm_up_calls_every_prefill_shape_a_burst_can_make_twice(model, alone, concurrency):
    """A burst packs prompts into prefills of any token bucket up to the budget with any count
    of logit rows the slots allow, and CUDA graph trees record a shape at its second call: the
    warm-up (here on the engine's thread, as a server runs it) calls each such shape at least
    twice, the 64-token bucket too, which no prompt of this 40-token context fills alone. The
    shapes a burst can make come from every prompt count and token total, not from warm_up. At
    a concurrency of 2 (a benchmark's batch size) no prefill packs more than 2 prompts, and the
    warm-up makes none that does."""
    engine = Engine(model, max_slots=8, max_length=40, backend="eager", max_prefill_tokens=64)
    engine.concurrency = concurrency
    calls = collections.Counter()

    def hook(verb, *tensors):
        if verb == "prefill":
            input_ids, _, _, last_index = tensors
            calls[(input_ids.shape[1], last_index.shape[0])] += 1

    reachable = set()
    for count in range(1, concurrency + 1):
        for total in range(count, engine.max_prefill_tokens + 1):
            if total <= count * (engine.max_length - 1):  # each prompt and its one token fit a sequence
                reachable.add((max(16, 1 << (total - 1).bit_length()), logit_rows_bucket(count)))
    assert reachable == {(t, r) for t in (16, 32, 64) for r in ((2, 8) if concurrency > 2 else (2,))}
    engine.step_hook = hook
    engine.start()
    try:
        engine.warm_up()
    finally:
        engine.stop()
    engine.step_hook = None
    assert set(calls) == reachable and min(calls.values()) >= 2, calls
    # Each packed round is one prefill of its shape: 8 prompts of 2 tokens, or none at 2 slots.
    assert engine._packed_prompt_lengths(16, 8) == ([2] * 8 if concurrency == 8 else None)
    assert engine.generate(PROMPTS[:2], LIMITS[0]).tokens[0] == alone[0]


def test_stop_tokens_and_on_token_stops(model, alone):
    engine = Engine(model, max_slots=2, max_length=64, backend="eager")
    stop = alone[0][4]
    result = engine.generate([PROMPTS[0], PROMPTS[1]], 12, stop_token_ids=[stop])
    first_stop = alone[0].index(stop)
    assert result.tokens[0] == alone[0][:first_stop + 1] and result.finish_reasons[0] == "stop"
    # A callback that says stop (a stop string, for the server) ends the request there.
    seen = []
    request = EngineRequest(PROMPTS[3], 14, on_token=lambda token, t: (seen.append(token), len(seen) == 3)[1])
    engine.submit(request)
    engine.run_until_done()
    assert request.tokens == alone[3][:3] and request.finish_reason == "stop"


def test_abort_frees_the_slot_and_others_are_unaffected(model, alone):
    """One slot, two requests: the first is aborted after two tokens; the second gets the slot
    and its tokens are its solo ones."""
    engine = Engine(model, max_slots=1, max_length=64, backend="eager")
    finished = []
    first = EngineRequest(PROMPTS[0], 12)
    first.on_token = lambda token, t: engine.abort(first) if len(first.tokens) == 2 else None
    first.on_finish = finished.append
    second = EngineRequest(PROMPTS[2], LIMITS[2])
    engine.submit(first)
    engine.submit(second)
    engine.run_until_done()
    assert first.finish_reason == "abort" and finished == ["abort"] and first.tokens == alone[0][:len(first.tokens)]
    assert len(first.tokens) <= 3
    assert second.tokens == alone[2] and second.finish_reason == "length"


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    """A request's own seed draws from its own generator: alone or beside greedy requests, the
    same tokens."""
    sampling = Sampling(temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    engine = Engine(model, max_slots=4, max_length=64, backend="eager")
    solo = EngineRequest(PROMPTS[1], 10, sampling)
    engine.submit(solo)
    engine.run_until_done()
    crowd = [EngineRequest(p, 10) for p in PROMPTS[:3]] + [EngineRequest(PROMPTS[1], 10, sampling)]
    for request in crowd:
        engine.submit(request)
    engine.run_until_done()
    assert crowd[-1].tokens == solo.tokens
    other = EngineRequest(PROMPTS[1], 10, Sampling(temperature=0.9, top_k=50, top_p=0.9, seed=99))
    engine.submit(other)
    engine.run_until_done()
    assert other.tokens != solo.tokens  # the seed matters (a 10-token draw agreeing by chance: negligible)


def test_teacher_forcing_and_kept_logits(model, alone):
    """forced_tokens feed given tokens instead of the sampled ones (parity checks compare logits
    step by step, as the GPU test does); keep_logits keeps each step's logits."""
    engine = Engine(model, max_slots=3, max_length=64, backend="eager")
    solo = EngineRequest(PROMPTS[0], 8, keep_logits=True)
    engine.submit(solo)
    engine.run_until_done()
    forced = [(t + 1) % 512 for t in solo.tokens]
    crowd = [EngineRequest(PROMPTS[0], 8, forced_tokens=forced, keep_logits=True), EngineRequest(PROMPTS[1], 5)]
    for request in crowd:
        engine.submit(request)
    engine.run_until_done()
    assert solo.tokens == alone[0][:8] and crowd[0].tokens == forced
    assert len(solo.logits) == len(crowd[0].logits) == 8
    assert [int(row.argmax()) for row in solo.logits] == solo.tokens
    torch.testing.assert_close(crowd[0].logits[0], solo.logits[0])  # the same prompt: the same first logits
    assert not torch.equal(crowd[0].logits[1], solo.logits[1])  # another token fed


def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_serves_on(model, alone, monkeypatch):
    """A step that raises (out of memory, say) ends the requests in the engine with "error" and
    what failed; the engine thread stays up, and the next request is served."""
    engine = Engine(model, max_slots=2, max_length=64, backend="eager")
    real_decode, calls = engine._decode, []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_decode(*args)

    monkeypatch.setattr(engine, "_decode", failing_once)
    engine.start()
    try:
        done = [threading.Event() for _ in range(3)]
        first = [EngineRequest(p, 10, on_finish=lambda r, e=e: e.set()) for p, e in zip(PROMPTS[:2], done)]
        for request in first:
            engine.submit(request)
        assert done[0].wait(60) and done[1].wait(60)
        assert {r.finish_reason for r in first} == {"error"} and "out of memory (simulated)" in first[0].error
        later = EngineRequest(PROMPTS[2], LIMITS[2], on_finish=lambda r: done[2].set())
        engine.submit(later)
        assert done[2].wait(60)
    finally:
        engine.stop()
    assert later.tokens == alone[2] and later.finish_reason == "length" and engine.live_slots == 0


def test_requests_from_many_threads(model, alone):
    """The engine on its own thread, requests submitted from several threads at once."""
    engine = Engine(model, max_slots=3, max_length=64, backend="eager")
    engine.start()
    try:
        done = [threading.Event() for _ in PROMPTS]
        requests = [EngineRequest(p, n, on_finish=lambda reason, e=e: e.set()) for p, n, e in zip(PROMPTS, LIMITS, done)]
        threads = [threading.Thread(target=engine.submit, args=(r,)) for r in requests]
        for thread in threads:
            thread.start()
        for event in done:
            assert event.wait(60)
    finally:
        engine.stop()
    assert [r.tokens for r in requests] == alone


@pytest.mark.parametrize("prompt, max_tokens, message", [
    ([], 4, "prompt is empty"),
    ([1, 2], 0, "max_tokens must be at least 1"),
    ([1] * 60, 8, "exceeds the context"),
    ([1, 512], 4, r"token ids must be integers in \[0, 512\)"),
    ([1, -1], 4, "token ids must be integers"),
    ([1, 2.5], 4, "token ids must be integers"),
])
def test_bad_requests_are_clear_errors(model, prompt, max_tokens, message):
    engine = Engine(model, max_slots=1, max_length=64, backend="eager")
    with pytest.raises(EngineError, match=message):
        engine.submit(EngineRequest(prompt, max_tokens))

"""`paiton serve --model tiny`, started here on a free local port, driven by the official `openai`
client and by raw HTTP: greedy outputs equal the bundled loop's for the same prompts, 16
concurrent clients each get their solo output through 4 slots with three compiled graphs,
bad input gets a clear 4xx JSON error and the server keeps serving, and a client that
disconnects mid-stream frees its slot without changing anyone else's output."""

import asyncio
import json
import os
import re
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")

from paiton.models.decode_loop import DecodeLoop  # noqa: E402
from paiton.models.qwen3 import build_qwen3  # noqa: E402
from paiton.models.server import launch  # noqa: E402
from paiton.models.tokenizer import stand_in_tokenizer  # noqa: E402

SLOTS, MAX_LEN = 4, 96


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The stand-in tokenizer is trained once here (a few seconds for 512 ids) and shared with the server."""
    path = tmp_path_factory.mktemp("paiton-cache")
    os.environ["PAITON_CACHE_DIR"] = str(path)
    yield path
    os.environ.pop("PAITON_CACHE_DIR", None)


@pytest.fixture(scope="module")
def server(cache_dir):
    """The server process (Paiton's passes on the tiny preset, the eager inner compiler) and its base URL.
    Paiton's ops run on their CPU references there (eager's operations; the kernels are tested
    on their own, and interpreting them would make this module minutes slower)."""
    process = launch(["--model", "tiny", "--max-slots", str(SLOTS), "--max-model-len", str(MAX_LEN),
                      "--max-prefill-tokens", "64", "--inner", "eager", "--no-warmup"],
                     env={"TRITON_INTERPRET": "0"}, timeout_s=180)
    assert process.model_name == "tiny" and "stand-in" in process.tokenizer
    yield process.url
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def solo(cache_dir):
    """What the bundled (static) loop gives a prompt alone: greedy, eager, the same weights
    (the tiny preset, seed 0) and the same tokenizer as the server."""
    model = build_qwen3("tiny", dtype=torch.float32)
    loop = DecodeLoop(model, max_batch_size=1, max_length=MAX_LEN, backend="eager")
    tokenizer, _ = stand_in_tokenizer(model.config.vocab_size)
    return lambda ids, n: loop.generate([ids], n).tokens[0], tokenizer


def test_openai_client_streams_the_bundled_loops_greedy_tokens(client, solo):
    generate, tokenizer = solo
    for prompt in ("The quick brown fox", [5, 6, 7, 8, 9, 10, 11]):
        ids = prompt if isinstance(prompt, list) else tokenizer(prompt, add_special_tokens=False).input_ids
        expected = generate(ids, 12)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(ids)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
        assert whole.choices[0].token_ids == expected
        assert text == whole.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_chat_completions_use_the_chat_template(client, solo):
    generate, tokenizer = solo
    messages = [{"role": "user", "content": "Say hello"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    expected = tokenizer.decode(generate(list(ids), 8), skip_special_tokens=True)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_models_health_and_neutral_fields(client, server):
    import urllib.request

    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server + "/health") as response:
        assert json.load(response) == {"status": "ok"}
    # What common clients and benchmark tools send, at neutral values: accepted.
    reply = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=3, temperature=0, n=1, best_of=1,
                                      logprobs=None, echo=False, seed=7, user="someone", presence_penalty=0,
                                      frequency_penalty=0)
    assert reply.usage.completion_tokens <= 3


def test_sixteen_concurrent_clients_get_their_solo_outputs(client, server, solo):
    """16 requests of different prompt and output lengths at once through 4 slots: each equals
    its solo run; slots were reused; the engine compiled three graphs and no more."""
    import urllib.request

    generate, _ = solo
    prompts = [[(11 * i + 3 * j) % 500 + 1 for j in range(2 + (7 * i) % 23)] for i in range(16)]
    lengths = [1 + (5 * i) % 17 for i in range(16)]
    results = [None] * 16

    def ask(i):
        reply = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                          stream=i % 2 == 0, extra_body={"ignore_eos": True, "return_token_ids": True})
        results[i] = reply if i % 2 else "".join(c.choices[0].text for c in reply if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    _, tokenizer = solo
    for i in range(16):
        expected = generate(prompts[i], lengths[i])
        if i % 2:
            assert results[i].choices[0].token_ids == expected, i
        else:
            assert results[i] == tokenizer.decode(expected, skip_special_tokens=True), i
    with urllib.request.urlopen(server + "/stats") as response:
        stats = json.load(response)
    assert stats["slots"] == SLOTS and stats["live_slots"] == 0
    assert stats["steps"]["prefill"] >= 16 // SLOTS  # more requests than slots: slots were reused
    assert stats["compiled_graphs"] <= 3, stats


def test_a_requests_prompts_share_one_prefill(client, server, solo):
    """A completion of three prompts: each choice is its prompt's solo output, and the three
    entered the engine together (one prefill step, then one decode step for all)."""
    import urllib.request

    def steps():
        with urllib.request.urlopen(server + "/stats") as response:
            return json.load(response)["steps"]

    generate, _ = solo
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    before = steps()
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=2, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    after = steps()
    assert [c.token_ids for c in sorted(reply.choices, key=lambda c: c.index)] == [generate(p, 2) for p in prompts]
    assert {kind: after[kind] - before[kind] for kind in after} == {"prefill": 1, "decode": 1}


BAD_REQUESTS = [
    ({"model": "no-such-model", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": [1] * (MAX_LEN - 3), "max_tokens": 8}, 400, "exceeds the context"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"model": "tiny", "prompt": [1, "two", 3]}, 400, "token ids must be integers, got \"two\""),
    ({"model": "tiny", "prompt": {"text": "hi"}}, 400, "prompt must be a string, a list of token ids"),
    ({"model": "tiny", "prompt": [1, 2.5, 3]}, 400, "token ids must be integers"),
    ({"model": "tiny", "prompt": [1, 512]}, 400, r"outside the vocabulary \[0, 512\)"),
    ({"model": "tiny", "prompt": [1, -4]}, 400, "outside the vocabulary"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, 400, "n must be 1"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 3}, 400, "logprobs are not returned"),
    ({"model": "tiny", "prompt": "hi", "best_of": 3}, 400, "best_of must be 1"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, r"temperature must be in \[0.0, 2.0\]"),
    ({"model": "tiny"}, 400, "prompt is required"),
    ({"model": "tiny", "prompt": ""}, 400, "the prompt is empty"),
]


def _post(url, body: bytes):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_input_is_a_clear_json_error_and_the_server_keeps_serving(server, body, status, message):
    code, answer = _post(server, json.dumps(body).encode())
    assert code == status and re.search(message, answer["error"]["message"]), answer
    code, answer = _post(server, json.dumps({"model": "tiny", "prompt": [1, 2], "max_tokens": 2}).encode())
    assert code == 200 and answer["usage"]["completion_tokens"] >= 1


def test_malformed_json_is_a_400(server):
    code, answer = _post(server, b'{"model": "tiny", "prompt": ')
    assert code == 400 and "not valid JSON" in answer["error"]["message"]
    code, answer = _post(server, b"[1, 2]")
    assert code == 400 and "must be a JSON object" in answer["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, solo):
    """Four long streams fill the four slots; one client goes away after two chunks; a fifth
    request then gets a slot, and the three other streams give their solo tokens."""
    generate, tokenizer = solo
    prompts = [[20 + i, 30 + i, 40 + i] for i in range(5)]

    async def stream(session, prompt, max_tokens, leave_after=None):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        texts = []
        async with session.post(server + "/v1/completions", json=body) as response:
            async for line in response.content:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                texts.append(json.loads(line[6:])["choices"][0]["text"])
                if leave_after is not None and len(texts) >= leave_after:
                    return None  # leaving the block closes the connection
        return "".join(texts)

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            long = [asyncio.create_task(stream(session, p, 60)) for p in prompts[1:4]]
            await stream(session, prompts[0], 60, leave_after=2)
            fifth = await stream(session, prompts[4], 5)  # needs the freed slot: the others run 60 tokens
            # It got the slot the client left, not one of a finished long stream.
            assert not any(task.done() for task in long)
            return fifth, await asyncio.gather(*long)

    fifth, others = asyncio.run(scenario())
    assert fifth == tokenizer.decode(generate(prompts[4], 5), skip_special_tokens=True)
    for prompt, text in zip(prompts[1:4], others):
        assert text == tokenizer.decode(generate(prompt, 60), skip_special_tokens=True)
    import urllib.request

    for _ in range(50):  # the aborted request's slot is free once the engine has stepped past it
        with urllib.request.urlopen(server + "/stats") as response:
            if json.load(response)["live_slots"] == 0:
                break
        time.sleep(0.1)
    else:
        pytest.fail("a slot stayed taken after every client finished or left")


def test_serving_a_checkpoint_with_its_own_tokenizer(tmp_path, cache_dir, solo):
    """`paiton serve --checkpoint DIR`: the directory's weights and tokenizer (here the tiny
    preset and the stand-in, saved as a checkpoint would hold them); text in, the loop's tokens out."""
    model = build_qwen3("tiny", dtype=torch.float32, seed=5)
    model.save_pretrained(tmp_path)
    generate, tokenizer = solo
    tokenizer.save_pretrained(tmp_path)
    server = launch(["--checkpoint", str(tmp_path), "--backend", "eager", "--max-slots", "2", "--max-model-len", "64",
                     "--no-warmup"], timeout_s=120)
    try:
        name, url = server.model_name, server.url
        assert name == tmp_path.name and "checkpoint" in server.tokenizer
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(model=name, prompt="Hello there", max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
        loop = DecodeLoop(model, max_batch_size=1, max_length=64, backend="eager")
        expected = loop.generate([tokenizer("Hello there", add_special_tokens=False).input_ids], 6).tokens[0]
        assert reply.choices[0].token_ids == expected
    finally:
        server.stop()


@pytest.mark.parametrize("flag", ["--fp8", "--fp8-lm-head"])
def test_serving_fp8_weights(cache_dir, flag):
    """`paiton serve --fp8`: the preset quantized (every decoder linear per channel in e4m3); its
    greedy tokens are the FP8 model's own through the bundled loop. `--fp8-lm-head`: the lm_head
    too (its tokens are those of that model, and the start says so)."""
    from paiton.models.fp8 import quantize_fp8

    server = launch(["--model", "tiny", flag, "--backend", "eager", "--max-slots", "2", "--max-model-len", "64",
                     "--no-warmup"], env={"TRITON_INTERPRET": "0"}, timeout_s=120)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(model="tiny", prompt=[3, 1, 4, 1, 5], max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    finally:
        server.stop()
    model = quantize_fp8(build_qwen3("tiny", dtype=torch.float32), include_lm_head=flag == "--fp8-lm-head")
    expected = DecodeLoop(model, max_batch_size=1, max_length=64, backend="eager").generate([[3, 1, 4, 1, 5]], 6).tokens[0]
    assert reply.choices[0].token_ids == expected
    assert any("FP8 weights" in line and ("lm_head too" in line) == (flag == "--fp8-lm-head") for line in server.lines)


def test_warm_up_reporting_prints_choices_as_made_and_stacks_of_a_long_warm_up(capfd):
    """A 32B warm-up takes minutes and one on the H200 never ended, silently: while a warm-up
    runs, each timed kernel choice is printed as it is made and, asked for, every thread's stack
    at an interval; afterwards neither."""
    import logging
    import time

    from paiton.models.server import warm_up_reporting

    choices = logging.getLogger("paiton.fusion.fp8_paths")
    with warm_up_reporting(stack_dump_s=0.2):
        choices.info("paiton fp8: %d rows x [%d x %d]: %s", 16, 10240, 5120, "fp8_gemm")
        time.sleep(0.7)
    during_out, during_err = capfd.readouterr()
    choices.info("after the warm-up")
    time.sleep(0.5)
    after_out, after_err = capfd.readouterr()
    assert re.search(r"\[paiton\] choice at 0\.\d s: paiton fp8: 16 rows x \[10240 x 5120\]: fp8_gemm", during_out)
    assert "in test_warm_up_reporting_prints_choices_as_made" in during_err  # this thread's stack
    assert during_err.count("[paiton] stacks at") >= 2  # at 0.2, 0.4, 0.6 s: repeated
    assert "after the warm-up" not in after_out and "stacks at" not in after_err  # both ended with it


def test_stack_dumps_survive_threads_that_start_and_end_while_dumping(capfd):
    """The dumps read other threads' stacks under the GIL: threads coming and going, deep
    stacks changing under them, do not break a dump or the process (faulthandler's watchdog,
    which reads them without the GIL, killed two H200 servers mid-dump)."""
    import threading

    from paiton.models.server import StackDumps

    def busy(depth):
        return busy(depth - 1) if depth else sum(range(20000))

    dumps = StackDumps(0.01).start()
    for _ in range(30):
        workers = [threading.Thread(target=busy, args=(50,)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    dumps.stop()
    err = capfd.readouterr().err
    assert err.count("[paiton] stacks at") >= 2 and "Thread MainThread" in err

"""`paiton serve` under tensor parallelism on CPU (2 gloo ranks, the tiny preset): started by
torchrun on a free local port, it answers the official `openai` client with the text and tokens
of a single-process server; a follower killed mid-serve, or one that stops responding, makes
rank 0 answer the request in flight with an error and exit with status 1 (a hang: after
--tp-timeout) instead of serving on or hanging."""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

openai = pytest.importorskip("openai")

from paiton.models.server import launch, serve_command  # noqa: E402
from paiton.models.tokenizer import stand_in_tokenizer  # noqa: E402

# Paiton's passes with the eager inner compiler, its ops on their CPU references (as in test_server.py).
SERVE = ["--model", "tiny", "--max-slots", "2", "--max-model-len", "64", "--max-prefill-tokens", "32", "--inner",
         "eager", "--no-warmup"]
ENV = {"TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
PROMPTS = ["The quick brown fox", "Once upon a time there was", "Hello"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The stand-in tokenizer, trained once here, so the servers only load it."""
    path = tmp_path_factory.mktemp("paiton-cache")
    os.environ["PAITON_CACHE_DIR"] = str(path)
    stand_in_tokenizer(512)
    yield path
    os.environ.pop("PAITON_CACHE_DIR", None)


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def completions(server) -> list[tuple[str, list[int]]]:
    """Three prompts in one request (so three requests through two slots), greedy, then one streamed."""
    answer = client(server).completions.create(model="tiny", prompt=PROMPTS, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
    found = [(c.text, c.token_ids) for c in sorted(answer.choices, key=lambda c: c.index)]
    chunks = client(server).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    return found + [("".join(c.choices[0].text for c in chunks if c.choices), [])]


def test_served_under_torchrun_answers_as_one_process_does(cache_dir):
    servers = {}

    def start(name, tensor_parallel):
        servers[name] = launch(SERVE, env=ENV, timeout_s=150, tensor_parallel=tensor_parallel)

    threads = [threading.Thread(target=start, args=(name, tp)) for name, tp in (("one", 1), ("tp2", 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert set(servers) == {"one", "tp2"}, "a server did not start (its error is above)"
        expected, found = completions(servers["one"]), completions(servers["tp2"])
        assert found == expected
        assert all(len(tokens) == 10 for _, tokens in found[:3]) and all(text for text, _ in found)
        assert sum("rank 1" in line for line in servers["tp2"].lines) >= 1  # a second rank did run
    finally:
        for server in servers.values():
            server.stop()
    servers["tp2"].process.wait(60)  # torchrun passes SIGTERM on to both ranks (and itself exits with 1)
    assert "step failed" not in "".join(servers["tp2"].lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(tp_timeout: float):
    """Rank 1 and rank 0 of `paiton serve --tensor-parallel 2` started by hand with torchrun's
    environment (no torchrun agent, which would itself stop rank 0 when rank 1 ends: rank 0
    must notice on its own here)."""
    port = free_port()
    arguments = [*SERVE, "--tensor-parallel", "2", "--tp-timeout", str(tp_timeout)]

    def env(rank):
        return {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}

    follower = subprocess.Popen(serve_command([*arguments, "--port", "0"]), env={**os.environ, **env(1)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        leader = launch(arguments, env=env(0), timeout_s=150)
    except BaseException:
        follower.kill()
        raise
    return leader, follower


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_follower_lost_mid_serve_ends_rank_0_with_an_error(cache_dir, how):
    """Killed: rank 0's next step fails at once (its peer's sockets closed). Stopped (SIGSTOP:
    alive, never answering): the step's collective times out after --tp-timeout (5 s). Either
    way the request in flight gets an error, and rank 0 exits with status 1 saying why."""
    leader, follower = two_ranks(tp_timeout=5)
    try:
        first = client(leader).completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
        assert first.choices[0].finish_reason == "length"
        if how == "killed":
            follower.kill()
            follower.wait(10)
        else:
            follower.send_signal(signal.SIGSTOP)
        start = time.perf_counter()
        with pytest.raises((openai.InternalServerError, openai.APIConnectionError)):
            client(leader).completions.create(model="tiny", prompt="Hello again", max_tokens=4, temperature=0)
        status = leader.process.wait(40)
        seconds = time.perf_counter() - start
    finally:
        leader.process.kill()
        follower.kill()
        follower.wait(10)
    output = "".join(leader.lines)
    assert status == 1, output[-3000:]
    assert "a tensor-parallel step failed" in output, output[-3000:]
    if how == "stopped":
        assert "Timed out" in output or "timed out" in output, output[-3000:]
        assert 4.5 <= seconds < 35, seconds
    else:
        assert seconds < 20, seconds

"""The serving benchmark's HTTP client (bench/serving.py --base-url / --serve): requests sent to an
OpenAI-compatible `/v1/completions` as vLLM's benchmark_serving.py sends them, timed on the client.

Arrivals: with `request_rate` inf every request is ready at once; otherwise the gaps between
arrivals are exponential (a Poisson process) with that mean rate, seeded. `max_concurrency`
caps the requests in flight (a semaphore: a request is sent once one before it has finished,
and its clock starts when it is sent). Each request: the prompt as token ids, `max_tokens` its
output length, greedy, `ignore_eos`, streamed with `include_usage`. Timed per request: TTFT
(send to the first chunk with text), each chunk's time (ITL = the gaps), E2E (send to the
last chunk), and the server's token count (usage) for TPOT and throughput.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from serving_metrics import RequestTiming


@dataclass
class HttpResult:
    timings: list[RequestTiming]
    texts: list[str]
    duration_s: float
    failures: list[str]


async def _one(session, url, model, request, semaphore, timings, texts, failures, index):
    body = {"model": model, "prompt": list(request.prompt), "max_tokens": request.output_len, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with semaphore:
        start = time.perf_counter()
        chunk_times, parts, usage = [], [], None
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    failures.append(f"request {index}: HTTP {response.status}: {(await response.text())[:300]}")
                    return
                async for raw in response.content:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    payload = json.loads(data)
                    if payload.get("usage"):
                        usage = payload["usage"]
                    for choice in payload.get("choices") or ():
                        if choice.get("text"):
                            chunk_times.append(time.perf_counter() - start)
                            parts.append(choice["text"])
        except Exception as error:  # noqa: BLE001  (recorded: the run reports failed requests)
            failures.append(f"request {index}: {type(error).__name__}: {error}")
            return
        if not chunk_times:
            failures.append(f"request {index}: no text came back")
            return
        tokens = usage["completion_tokens"] if usage else None
        timings[index] = RequestTiming(len(request.prompt), chunk_times, tokens)
        texts[index] = "".join(parts)


async def _run(base_url, model, requests, max_concurrency, request_rate, seed):
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    semaphore = asyncio.Semaphore(max_concurrency)
    timings, texts, failures = [None] * len(requests), [None] * len(requests), []
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)  # the semaphore limits, not the pool
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=6 * 3600)) as session:
        start = time.perf_counter()
        tasks = []
        for index, request in enumerate(requests):
            tasks.append(asyncio.create_task(_one(session, url, model, request, semaphore, timings, texts, failures, index)))
            if request_rate != float("inf") and index + 1 < len(requests):
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    done = [i for i, t in enumerate(timings) if t is not None]
    return HttpResult([timings[i] for i in done], [texts[i] for i in done], duration, failures)


def run_http(base_url: str, model: str, requests, max_concurrency: int, request_rate: float = float("inf"),
             seed: int = 0) -> HttpResult:
    """Send `requests` (serving_workload.Request) and time them; see the module's docstring."""
    return asyncio.run(_run(base_url, model, requests, max_concurrency, request_rate, seed))



"""Serving metrics with vLLM's benchmark_serving.py definitions (issue 5).

Per request: TTFT = first token time - request start; E2E latency = last token time - start;
TPOT = (E2E - TTFT) / (output tokens - 1), for requests with more than one output token;
ITL = the gaps between consecutive tokens, pooled over all requests. Over the run:
request throughput = completed requests / duration, output throughput = output tokens /
duration, total token throughput = (input + output tokens) / duration. Latencies are
reported in ms as mean, median and p99 (numpy's linear percentile, as vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestTiming:
    prompt_len: int
    token_times: list[float]  # seconds from the request's start to each output token


def summarize(timings: list[RequestTiming], duration_s: float) -> dict[str, float]:
    if not timings or duration_s <= 0:
        raise ValueError("summarize needs at least one request and a positive duration")
    output_tokens = [len(t.token_times) for t in timings]
    ttft = [t.token_times[0] for t in timings]
    e2e = [t.token_times[-1] for t in timings]
    tpot = [(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1) for t in timings if len(t.token_times) > 1]
    itl = [b - a for t in timings for a, b in zip(t.token_times, t.token_times[1:])]
    result = dict(
        completed=len(timings),
        total_input_tokens=sum(t.prompt_len for t in timings),
        total_output_tokens=sum(output_tokens),
        duration_s=duration_s,
        request_throughput=len(timings) / duration_s,
        output_throughput=sum(output_tokens) / duration_s,
        total_token_throughput=(sum(output_tokens) + sum(t.prompt_len for t in timings)) / duration_s,
    )
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        values_ms = np.asarray(values or [0.0]) * 1e3
        result[f"mean_{name}_ms"] = float(values_ms.mean())
        result[f"median_{name}_ms"] = float(np.median(values_ms))
        result[f"p99_{name}_ms"] = float(np.percentile(values_ms, 99))
    return result

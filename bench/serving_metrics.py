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
    token_times: list[float]  # seconds from the request's start to each output token (over HTTP: each chunk)
    output_tokens: int | None = None  # the server's count (usage), where chunks and tokens differ

    @property
    def output_len(self) -> int:
        return self.output_tokens if self.output_tokens is not None else len(self.token_times)


def summarize(timings: list[RequestTiming], duration_s: float) -> dict[str, float]:
    """Over HTTP, as vLLM's client: ITLs are the gaps between chunks, TPOT divides by the
    server's token count."""
    if not timings or duration_s <= 0:
        raise ValueError("summarize needs at least one request and a positive duration")
    output_tokens = [t.output_len for t in timings]
    ttft = [t.token_times[0] for t in timings]
    e2e = [t.token_times[-1] for t in timings]
    tpot = [(t.token_times[-1] - t.token_times[0]) / (t.output_len - 1) for t in timings if t.output_len > 1]
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


def cost_per_million_tokens(tokens_per_s: float, gpu_hourly_cost: float) -> float:
    """Dollars per million tokens for a GPU rented at `gpu_hourly_cost` dollars an hour that
    produces `tokens_per_s` (the public Paiton comparison argues from this)."""
    if tokens_per_s <= 0:
        raise ValueError("tokens_per_s must be positive")
    return gpu_hourly_cost / 3600.0 / tokens_per_s * 1e6


def decode_step_bytes(config, batch: int, context_len: int, dtype_bytes: int = 2, linear_bytes: float | None = None,
                      lm_head_bytes: float | None = None) -> int:
    """Bytes one decode step must read at least: every weight once (the embedding table only
    for the batch's rows; with tied embeddings the table is read as the lm_head) and, per
    sequence, K and V of the `context_len` cached positions in every layer. `linear_bytes`: the
    bytes of a decoder linear's weight element where they differ (1 for FP8 weights);
    `lm_head_bytes` likewise for the lm_head's (1 when it is FP8 too: the FP8 copy is what is read)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linears = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config.intermediate_size
    norms = 2 * hidden + 2 * head_dim
    lm_head = config.vocab_size * hidden
    embedding_rows = batch * hidden if not getattr(config, "tie_word_embeddings", False) else 0
    others = layers * norms + embedding_rows + hidden
    kv_cache = batch * layers * 2 * kv * context_len
    linear_bytes = dtype_bytes if linear_bytes is None else linear_bytes
    lm_head_bytes = dtype_bytes if lm_head_bytes is None else lm_head_bytes
    return int(layers * linears * linear_bytes + lm_head * lm_head_bytes + (others + kv_cache) * dtype_bytes)


def bandwidth_fraction(bytes_per_step: int, tpot_s: float, copy_rate_bytes_per_s: float) -> float:
    """The share of the measured copy rate (read + write bytes per second of a large device
    copy) that a decode step achieves: bytes it must read / TPOT / copy rate."""
    return bytes_per_step / tpot_s / copy_rate_bytes_per_s

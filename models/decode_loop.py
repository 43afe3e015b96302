"""Paiton's bundled decode loop: prefill, then decode steps over a static KV cache.

    loop = DecodeLoop(model, max_batch_size=8, max_length=1024)            # backend="paiton"
    result = loop.generate([[151644, 872], [9707]], max_new_tokens=64,
                           sampling=Sampling(temperature=0.7, top_p=0.9, seed=0),
                           stop_token_ids=[151645], on_token=print)
    result.tokens, result.ttft_s, result.tpot_s

How it works, in the order a step runs:
* **Static cache.** transformers' StaticCache, [batch, kv_heads, max_length, head_dim] per
  layer, allocated before the first compiled call (a cache allocated inside a CUDA graph
  would live in the graph's memory pool).
* **Ragged prompts** are left-padded to a common length. Every sequence keeps its own
  positions (`position_ids` count only its real tokens), and the loop passes the attention
  mask itself, 4-D and boolean: key j is visible to a query at cache slot s of sequence b iff
  j <= s and slot j holds a real token of b (a padding query sees only itself). Padding never
  reaches a real token's attention, so each row gives the tokens it would give alone. (Paiton's decode-attention kernel applies such a mask
  as given.)
* **Compiled once per shape.** One `torch.compile` of the model (backend "paiton" by default,
  any backend, or "eager" for none) with static shapes: Dynamo compiles one decode graph per
  batch size and one prefill graph per prompt-length bucket, then reuses them. On a GPU the
  default mode is "reduce-overhead" (CUDA graphs). Prompt lengths are bucketed (powers of two
  from 16) rather than dynamic: a static shape keeps CUDA graphs and Paiton's shape-specific
  kernels, and bucketing bounds the number of prefill compiles by log2(max_length).
* **Sampling** on the device: greedy (temperature 0), or temperature with top-k and top-p,
  from a seeded generator, so a seed reproduces a run.
* **Stopping.** Each sequence stops at its own stop token or at max_new_tokens. A finished
  sequence keeps its row (a CUDA graph has a fixed batch) but its outputs are dropped; the
  loop ends as soon as every sequence has finished.
* **Streaming and timing.** `on_token(sequence, token, seconds)` is called for each new
  token, and every token's time since the start of `generate` is kept, from which TTFT,
  TPOT, ITL and end-to-end latency follow (`Generation` has them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self}")


@dataclass
class Generation:
    tokens: list[list[int]]  # generated tokens per sequence (its stop token included)
    token_times: list[list[float]]  # seconds from the start of generate() to each token
    finish_reasons: list[str]  # "stop" or "length"
    prompt_lengths: list[int] = field(default_factory=list)

    @property
    def ttft_s(self) -> list[float]:
        return [times[0] for times in self.token_times]

    @property
    def e2e_s(self) -> list[float]:
        return [times[-1] for times in self.token_times]

    @property
    def itl_s(self) -> list[list[float]]:
        """Gaps between consecutive tokens of each sequence."""
        return [[b - a for a, b in zip(times, times[1:])] for times in self.token_times]

    @property
    def tpot_s(self) -> list[float]:
        """Per sequence: (E2E - TTFT) / (tokens - 1), as vLLM's benchmark defines it."""
        return [(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0 for t in self.token_times]


def prompt_bucket(length: int, max_length: int) -> int:
    """The padded prompt length: the next power of two from 16, capped at max_length."""
    bucket = 16
    while bucket < length:
        bucket *= 2
    return min(bucket, max_length)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of `logits` [B, vocab] (float32), on the device."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the ones before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class DecodeLoop:
    def __init__(self, model, *, max_batch_size: int, max_length: int, backend: str = "paiton",
                 mode: str | None = "auto", options: dict | None = None, pad_token_id: int = 0):
        """`mode` "auto": "reduce-overhead" on a GPU, the backend's default on CPU."""
        self.model = model
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_length, self.pad_token_id = max_batch_size, max_length, pad_token_id
        if backend == "eager":
            self.forward = model
        else:
            if mode == "auto":
                mode = "reduce-overhead" if self.device.type == "cuda" else None
            kwargs = {"options": options} if options else {}
            self.forward = torch.compile(model, backend=backend, mode=mode, fullgraph=True, dynamic=False, **kwargs)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_token_ids: Sequence[int] = (), on_token: Callable[[int, int, float], None] | None = None) -> Generation:
        from transformers import StaticCache

        start = time.perf_counter()
        batch = len(prompts)
        lengths = [len(p) for p in prompts]
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"batch of {batch} prompts; this loop takes 1 to {self.max_batch_size}")
        if min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        # The bucket, shortened to what the cache leaves room for (a max_length that is not a
        # power of two must still take every request that fits it).
        padded = max(min(prompt_bucket(max(lengths), self.max_length), self.max_length - max_new_tokens), max(lengths))
        if padded + max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({max(lengths)} tokens, padded to {padded}) + {max_new_tokens} new tokens "
                             f"exceed max_length {self.max_length}")

        device, config = self.device, self.model.config
        ids = torch.full((batch, padded), self.pad_token_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, padded - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        pads = torch.tensor([padded - n for n in lengths], device=device)
        # Slots holding a real token of each sequence: its prompt, then everything generated.
        real_slot = torch.arange(self.max_length, device=device)[None, :] >= pads[:, None]  # [B, L]
        cache = StaticCache(config=config, max_cache_len=self.max_length)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache.early_initialization(batch, config.num_key_value_heads, head_dim, self.model.dtype, device)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        stop = torch.tensor(list(stop_token_ids) or [-1], device=device)

        def step(input_ids, slots):
            positions = (slots[None, :] - pads[:, None]).clamp_min(0)  # each sequence counts its own tokens
            keys = torch.arange(self.max_length, device=device)[None, :]
            visible = (keys <= slots[:, None])[None] & real_slot[:, None, :]
            # A padding query sees only its own slot: a row with no visible key would give NaN,
            # written into the cache at a slot that real queries then mask out but still
            # multiply (0 * NaN). Real queries see their own slot anyway.
            visible = visible | (keys == slots[:, None])[None]
            out = self.forward(input_ids=input_ids, attention_mask=visible[:, None], past_key_values=cache,
                               cache_position=slots, position_ids=positions, use_cache=True)
            return sample(out.logits[:, -1].float(), sampling, generator)

        tokens: list[list[int]] = [[] for _ in range(batch)]
        times: list[list[float]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        finished = [False] * batch
        next_token = step(ids.to(device), torch.arange(padded, device=device))
        for i in range(max_new_tokens):
            is_stop = torch.isin(next_token, stop)
            values, stops = next_token.tolist(), is_stop.tolist()  # one sync per step
            now = time.perf_counter() - start
            for b in range(batch):
                if finished[b]:
                    continue
                tokens[b].append(values[b])
                times[b].append(now)
                if on_token is not None:
                    on_token(b, values[b], now)
                if stops[b]:
                    finished[b], reasons[b] = True, "stop"
            if all(finished) or i == max_new_tokens - 1:
                break
            next_token = step(next_token[:, None], torch.tensor([padded + i], device=device))
        return Generation(tokens=tokens, token_times=times, finish_reasons=reasons, prompt_lengths=lengths)

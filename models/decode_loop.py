"""Paiton's bundled decode loop: prefill, then decode steps over a static KV cache.

    loop = DecodeLoop(model, max_batch_size=8, max_length=1024)            # backend="paiton"
    result = loop.generate([[151644, 872], [9707]], max_new_tokens=64,
                           sampling=Sampling(temperature=0.7, top_p=0.9, seed=0),
                           stop_token_ids=[151645], on_token=print)
    result.tokens, result.ttft_s, result.tpot_s

How it works, in the order a step runs:
* **Static cache.** One KV buffer per layer, [max_batch_size, kv_heads, max_length, head_dim],
  allocated at the first `generate` (before any compiled call: a buffer allocated inside a
  CUDA graph would live in the graph's memory pool). Each batch size gets a transformers
  StaticCache whose layers are views of the first rows of those buffers, made once and reused,
  so the compiled graphs see the same addresses on every call (no CUDA-graph re-recording)
  and batch sizes share memory instead of each holding its own cache.
* **Ragged prompts** are left-padded to a common length. Every sequence keeps its own
  positions (`position_ids` count only its real tokens), and the loop passes the attention
  mask itself, 4-D and boolean: key j is visible to a query at cache slot s of sequence b iff
  j <= s and slot j holds a real token of b (a padding query sees only itself). Padding never
  reaches a real token's attention, so each row gives the tokens it would give alone.
  (Paiton's decode-attention kernel applies such a mask as given.) Prefill computes the
  logits of the last position only (`logits_to_keep=1`): all of them would be
  batch x prompt x vocab, tens of GB at batch 128.
* **Compiled for few shapes.** One `torch.compile` of the model (backend "paiton" by default,
  any backend, or "eager" for none). The loop marks the batch dimension dynamic for batches of
  2 or more and the prompt length dynamic in prefill, so Dynamo compiles four graphs in all
  (Dynamo specializes a size of 1: batch 1 gets its own graphs, as does a decode step's one
  query): decode at batch 1, decode at any other batch size, and the same two for prefill.
  Compiling is the expensive part (about a minute per graph for Qwen3-8B on an H100); a
  graph per batch size and prompt length would be dozens. On a GPU the default mode is
  "reduce-overhead": CUDA graphs are recorded per shape, which is cheap, and prompt lengths
  are bucketed (powers of two from 16) to bound how many are recorded.
* **Sampling** on the device: greedy (temperature 0), or temperature with top-k and top-p,
  from a seeded generator, so a seed reproduces a run.
* **Stopping.** Each sequence stops at its own stop token or at its own max_new_tokens. Once
  half the rows or more have finished, the live sequences move to a smaller batch (their
  cache rows gathered into the first rows of the buffers), a power of two filled up with
  finished rows, so finished sequences stop costing work without a new compile (the batch is
  dynamic); only the CUDA graph of a new batch shape is recorded. The loop ends as soon as
  every sequence has finished. (A batch of 2 keeps both rows to the end.)
* **One step ahead.** The step that makes token i+1 is enqueued before the loop waits for
  token i (the next step's input is token i still on the device), so the host's work per
  step (Dynamo's guards, the CUDA graph's launch) overlaps the device's instead of adding to
  it; the loop waits for the device once per step. A sequence that stops on a stop token has
  one step computed past it, and that token is dropped.
* **Streaming and timing.** `on_token(sequence, token, seconds)` is called for each new
  token, and every token's time since the start of `generate` (when it reached the host) is
  kept, from which TTFT, TPOT, ITL and end-to-end latency follow (`Generation` has them).
* **Tensor parallel.** The device work is three methods: `_cache` (a batch's cache, emptied),
  `_forward` (one prefill or decode forward) and `_shrink` (gathering the live rows). Under
  tensor parallelism (models/tp_runtime.py) rank 0 runs `generate`, its `step_hook` sends
  each of these calls' inputs to the other ranks, and they make the same calls on their own
  loop (their shard of the model and cache); sampling is rank 0's. One process: no hook.
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
    # With generate(keep_logits=n): for each of the first n steps (prefill first), the
    # [batch, vocab] float32 logits its tokens were drawn from.
    logits: list = field(default_factory=list)

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


def power_of_two_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two times `floor` (a power of two) that is >= n."""
    bucket = floor
    while bucket < n:
        bucket *= 2
    return bucket


def prompt_bucket(length: int, max_length: int) -> int:
    """The padded prompt length: the next power of two from 16, capped at max_length."""
    return min(power_of_two_at_least(length, 16), max_length)


def zeroed_kv_buffers(config, rows: int, max_length: int, dtype: torch.dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) per layer, [rows, kv_heads, max_length, head_dim], zeroed: masked-out slots are
    still multiplied by a zero weight, and 0 * NaN from uninitialized memory would be NaN."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (rows, config.num_key_value_heads, max_length, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


def copy_to_host(tensor: torch.Tensor) -> Callable[[], list]:
    """Queue the copy of `tensor` to pinned host memory now (it runs before whatever is launched
    after it, and the host does not wait); call the result to wait for it and get its values."""
    if tensor.device.type != "cuda":
        return tensor.tolist
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), host.tolist())[1]


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
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the ones before it already reach top_p (the first always stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= sampling.top_p
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
        self.compiled = backend != "eager"
        self._kv_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._caches: dict = {}  # batch size -> StaticCache over the first rows of _kv_buffers
        self._all_slots: torch.Tensor | None = None  # 0..max_length-1 on the device
        # Tensor parallelism (models/tp_runtime.py) sets this on rank 0: called as
        # `step_hook(kind, *inputs)` before each device step ("cache", "forward", "shrink": the
        # inputs of `_cache`, `_forward` and `_shrink` but the cache), which it broadcasts.
        self.step_hook: Callable[..., None] | None = None
        if backend == "eager":
            self.forward = model
        else:
            if mode == "auto":
                mode = "reduce-overhead" if self.device.type == "cuda" else None
            kwargs = {"options": options} if options else {}
            self.forward = torch.compile(model, backend=backend, mode=mode, fullgraph=True, dynamic=False, **kwargs)

    def _cache(self, batch: int):
        """The StaticCache for `batch` sequences, emptied (its writes start at slot 0 again)."""
        from transformers import StaticCache

        config = self.model.config
        if not self._kv_buffers:
            self._kv_buffers = zeroed_kv_buffers(config, self.max_batch_size, self.max_length, self.model.dtype, self.device)
            self._all_slots = torch.arange(self.max_length, device=self.device)
        cache = self._caches.get(batch)
        if cache is None:
            cache = StaticCache(config=config, max_cache_len=self.max_length)
            for layer, (keys, values) in zip(cache.layers, self._kv_buffers, strict=True):
                # Let transformers set the layer up (its bookkeeping differs between versions),
                # then point it at views of the shared buffers. The probe has no token, so the
                # layer's own allocation is one layer's worth, freed at once.
                probe = keys[:batch, :, :0]
                layer.lazy_initialization(probe, probe)
                layer.keys, layer.values = keys[:batch], values[:batch]
                for tensor in (layer.keys, layer.values):
                    torch._dynamo.mark_static_address(tensor)
                    if batch > 1 and self.compiled:
                        torch._dynamo.mark_dynamic(tensor, 0)
            self._caches[batch] = cache
        for layer in cache.layers:
            if hasattr(layer, "cumulative_length"):  # where transformers writes at this counter (5.2x)
                layer.cumulative_length.zero_()
        return cache

    def _shrink(self, cache, kept_rows: Sequence[int] | torch.Tensor):
        """The cache of a batch of len(kept_rows) sequences holding what rows `kept_rows` of
        `cache` hold (both are views of the same buffers; the rows are gathered first)."""
        smaller = self._cache(len(kept_rows))
        index = torch.as_tensor(kept_rows, device=self.device)
        for old, new in zip(cache.layers, smaller.layers, strict=True):
            for old_tensor, new_tensor in ((old.keys, new.keys), (old.values, new.values)):
                new_tensor.copy_(old_tensor.index_select(0, index))
            if hasattr(old, "cumulative_length"):
                new.cumulative_length.copy_(old.cumulative_length)
        return smaller

    def _forward(self, cache, input_ids: torch.Tensor, slots: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
        """One forward over `cache`: `input_ids` [B, S] written at cache slots `slots` [S], for
        sequences left-padded by `pads` [B] tokens. Returns the last position's logits [B, vocab], float32."""
        batch = input_ids.shape[0]
        keys = self._all_slots[None, :]
        # Slots holding a real token of each sequence: its prompt, then everything generated.
        real_slot = keys >= pads[:, None]  # [B, L]
        positions = (slots[None, :] - pads[:, None]).clamp_min(0)  # each sequence counts its own tokens
        visible = (keys <= slots[:, None])[None] & real_slot[:, None, :]
        # A padding query sees only its own slot: a row with no visible key would give NaN,
        # written into the cache at a slot that real queries then mask out but still
        # multiply (0 * NaN). Real queries see their own slot anyway.
        visible = (visible | (keys == slots[:, None])[None])[:, None]
        if self.compiled:
            # Shapes that vary between calls are dynamic (see the module's docstring); a
            # size of 1 stays static.
            if batch > 1:
                for tensor in (input_ids, visible, positions):
                    torch._dynamo.mark_dynamic(tensor, 0)
            if len(slots) > 1:
                for tensor, dim in ((input_ids, 1), (visible, 2), (positions, 1), (slots, 0)):
                    torch._dynamo.mark_dynamic(tensor, dim)
        out = self.forward(input_ids=input_ids, attention_mask=visible, past_key_values=cache,
                           cache_position=slots, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: Sampling = Sampling(), stop_token_ids: Sequence[int] = (),
                 on_token: Callable[[int, int, float], None] | None = None, keep_logits: int = 0) -> Generation:
        """`max_new_tokens`: one limit for all, or one per prompt. `keep_logits`: also return the
        logits of the first `keep_logits` steps (prefill is the first), float32 on the CPU, for
        parity checks (rows in prompt order while no sequence has left the batch)."""
        start = time.perf_counter()
        batch = len(prompts)
        lengths = [len(p) for p in prompts]
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"batch of {batch} prompts; this loop takes 1 to {self.max_batch_size}")
        if min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != batch:
            raise ValueError(f"{len(limits)} max_new_tokens for {batch} prompts")
        if min(limits) < 1:
            raise ValueError("max_new_tokens must be at least 1")
        max_new_tokens = max(limits)
        # The bucket, shortened to what the cache leaves room for (a max_length that is not a
        # power of two must still take every request that fits it).
        padded = max(min(prompt_bucket(max(lengths), self.max_length), self.max_length - max_new_tokens), max(lengths))
        if padded + max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({max(lengths)} tokens, padded to {padded}) + {max_new_tokens} new tokens "
                             f"exceed max_length {self.max_length}")

        device = self.device
        ids = torch.full((batch, padded), self.pad_token_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, padded - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        pads = torch.tensor([padded - n for n in lengths], device=device)
        if self.step_hook is not None:
            self.step_hook("cache", batch)
        cache = self._cache(batch)
        all_slots = self._all_slots
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        stop = torch.tensor(list(stop_token_ids) or [-1], device=device)
        kept_logits: list[torch.Tensor] = []

        def step(input_ids, slots):
            if self.step_hook is not None:
                self.step_hook("forward", input_ids, slots, pads)
            logits = self._forward(cache, input_ids, slots, pads)
            if len(kept_logits) < keep_logits:
                kept_logits.append(logits.clone())  # to the CPU at the end: no sync per step
            return sample(logits, sampling, generator)

        tokens: list[list[int]] = [[] for _ in range(batch)]
        times: list[list[float]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        finished = [False] * batch
        sequence_of_row = list(range(batch))  # rows leave the batch as their sequences finish

        def to_host(tokens):
            """Queue the copy of the tokens and their stop flags to the host now, so that it
            runs before whatever is launched next; call the result to wait for it."""
            return copy_to_host(torch.stack([tokens, torch.isin(tokens, stop).to(tokens.dtype)]))

        pending = step(ids.to(device), torch.arange(padded, device=device))  # token 0, on the device
        for i in range(max_new_tokens):
            # Enqueue the step that makes token i+1 before waiting for token i: the host's
            # share of a step (guards, CUDA graph launch: about a millisecond for Qwen3-8B)
            # then overlaps the device's work instead of adding to it. Token i's copy to the
            # host is queued first: anything queued after the step would wait for it. The
            # price: a sequence that stops at token i has one extra step computed, whose token
            # is dropped.
            fetch = to_host(pending)
            more = any(not finished[b] and len(tokens[b]) + 1 < limits[b] for b in sequence_of_row)
            upcoming = step(pending[:, None], all_slots[padded + i:padded + i + 1]) if more else None
            values, stops = fetch()  # waits for token i only
            now = time.perf_counter() - start
            for row, b in enumerate(sequence_of_row):
                if finished[b]:
                    continue
                tokens[b].append(values[row])
                times[b].append(now)
                if on_token is not None:
                    on_token(b, values[row], now)
                if stops[row]:
                    finished[b], reasons[b] = True, "stop"
                elif len(tokens[b]) == limits[b]:
                    finished[b] = True
            if all(finished) or upcoming is None:
                break
            live_rows = [row for row, b in enumerate(sequence_of_row) if not finished[b]]
            if 2 < batch and len(live_rows) <= batch // 2:
                # Half the rows or more are done: carry on with the live ones only. The new
                # batch is a power of two (finished rows fill it up), so a long run meets
                # log2(max_batch_size) batch shapes, and never 1 (batch 1 has its own graphs,
                # which a batch that started larger may never have compiled). The step already
                # enqueued ran at the old batch; its cache writes are in the rows gathered here.
                new_batch = max(2, 1 << (len(live_rows) - 1).bit_length())
                kept = live_rows + [row for row in range(batch) if row not in live_rows][:new_batch - len(live_rows)]
                keep = torch.tensor(kept, device=device)
                if self.step_hook is not None:
                    self.step_hook("shrink", keep)
                cache = self._shrink(cache, keep)
                pads, upcoming = pads[keep], upcoming[keep]
                sequence_of_row = [sequence_of_row[row] for row in kept]
                batch = new_batch
            pending = upcoming
        return Generation(tokens=tokens, token_times=times, finish_reasons=reasons, prompt_lengths=lengths,
                          logits=[logits.cpu() for logits in kept_logits])

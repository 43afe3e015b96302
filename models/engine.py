"""Continuous batching over one static KV cache: the serving engine behind `paiton serve`.

    engine = Engine(model, max_slots=32, max_length=2048)          # backend="paiton"
    result = engine.generate([[151644, 872], [9707]], max_new_tokens=[64, 16])
    # or, from many threads at once (the server):
    request = engine.submit(EngineRequest(prompt, max_tokens=64, on_token=..., on_finish=...))
    engine.abort(request)

The bundled loop (decode_loop.py) runs static batches: a batch starts together and its rows
only leave it. Here a fixed number of slots (the maximum concurrency) share one static cache;
a finished sequence frees its slot and the next waiting request is prefilled into it while
the others keep decoding. How a step runs:

* **The cache.** One K and one V buffer per layer, [max_slots + 1, kv_heads, max_length,
  head_dim]. Row r holds the sequence in slot r at cache slots 0..len-1, so each row has its
  own length (per-slot positions, not one shared position). The last row is scratch: the
  padding tokens of a prefill write there. The model's attention layers call
  `SlotCache.update`, which writes this step's keys and values at `cache[row, :, position]`.
* **Decode** runs rows 0..B-1, B the smallest power of two above the highest live slot
  (slots are handed out lowest first, and a live row from the upper half moves down when the
  lower half has room, so a draining batch shrinks). Every row feeds its last token at its
  own position; the causal mask `key slot <= position` is built inside the compiled graph, so
  Paiton's decode-attention kernel reads each row only up to its own length. A row that is
  not live computes a throwaway token at position 0 of its own row.
* **Prefill** packs waiting prompts into one row of tokens ([1, T], T a power of two, up to
  `max_prefill_tokens`; first fit in arrival order, the oldest always in; as many prefills as
  the free slots take before the next decode step): each token
  carries its cache row and its position, attention is causal within a prompt only (the
  mask is built in the graph from rows and positions: a fresh request has nothing in the
  cache to attend to, so prefill attends over the new tokens alone), and the logits are
  those of each prompt's last token.
* **Few graphs.** Decode at batch 1 (Dynamo specializes a size of 1; there the one-row GEMV
  fusions apply), decode at any other batch (dynamic), and prefill (dynamic T and prompt
  count): three graphs whatever the requests. On a GPU the default mode is
  "reduce-overhead": CUDA graphs are recorded per shape, and the shapes are bucketed (powers
  of two) so few are.
* **One step ahead**, as in the bundled loop: each step's tokens are copied to the host while
  the next step is already queued, so the host's work overlaps the GPU's. A request that stops
  at token i has one more step computed in its row, whose token is dropped.
* **Sampling** per request (temperature, top-k, top-p; a request's own seed draws from its own
  generator), greedy by argmax when every row is greedy.

Requests come in from any thread (`submit`, `abort`); the engine thread (`start()`, or the
caller of `generate`) does all the GPU work, CUDA graphs included (they belong to the thread
that records them).

The device work of a step is one of three methods taking only tensors and ints: `_run_prefill`,
`_run_decode` and `_move_row` (compaction's copy of a cache row). Under tensor parallelism
(models/tp_runtime.py) rank 0 schedules, its `step_hook` sends each of these calls' inputs to
the other ranks, and they make the same call on their own engine (their shard of the model and
of the cache), so the collectives inside the model line up. In one process there is no hook.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from paiton.models.decode_loop import (Generation, Sampling, copy_to_host, power_of_two_at_least, sample,
                                       zeroed_kv_buffers)

log = logging.getLogger(__name__)

MIN_PREFILL_TOKENS = 16  # the smallest prefill bucket
PREFILL_LOOKAHEAD = 64  # the most waiting requests one prefill passes over looking for prompts that fit


def logit_rows_bucket(prompts: int) -> int:
    """The logit rows a prefill of `prompts` packed prompts computes: 2, 8, 32, 128, ... (the
    last prompt's row repeats). A size of 1 would be another graph, and each bucket is another
    CUDA graph per token bucket, so the buckets are few."""
    rows = 2
    while rows < prompts:
        rows *= 4
    return rows


class EngineError(ValueError):
    """A request the engine cannot take (its message says why); the server answers 400."""


@dataclass(eq=False)
class EngineRequest:
    """One generation. `on_token(token, seconds)` is called on the engine thread for each new
    token (seconds since the request was submitted) and may return True to finish the request
    there (a stop string, found by whoever detokenizes); `on_finish(reason)` once at the end:
    "stop" (a stop token, or on_token's say), "length" (max_tokens), "abort", or "error" (a step
    failed; `error` says how)."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop_token_ids: frozenset[int] = frozenset()
    on_token: Callable[[int, float], bool | None] | None = None
    on_finish: Callable[[str], None] | None = None
    # For parity checks: feed these tokens instead of the sampled ones (teacher forcing), and
    # keep each step's logits (float32 [vocab], on the CPU at the end) in `logits`.
    forced_tokens: Sequence[int] | None = None
    keep_logits: bool = False
    logits: list = field(default_factory=list)
    # Filled in by the engine:
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # with finish_reason "error": what failed
    submitted_at: float = 0.0  # perf_counter() at submit
    admitted_at: float | None = None  # when its prefill was queued (it got a slot)
    id: int = -1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SlotCache:
    """The cache object the model's attention layers see (transformers calls
    `cache.update(keys, values, layer_idx, ...)`; nothing else of it is used when the caller
    passes positions and a prepared mask). `layers[i]` = (K, V) of layer i, [rows, kv_heads,
    max_length, head_dim]. Set `positions` ([B, S]: each token's cache slot, which is its
    position) before each call, and for prefill `rows` ([B, S]: each token's cache row)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], prefill: bool):
        self.layers, self.prefill = layers, prefill
        self.positions: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.layers[layer_idx]
        if self.prefill:
            rows = self.rows
        else:  # decode: sequence b is row b
            rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
        keys[rows, :, self.positions] = key_states.transpose(1, 2)
        values[rows, :, self.positions] = value_states.transpose(1, 2)
        if self.prefill:  # attention over the prompt's own tokens (nothing before them)
            return key_states, value_states
        return keys, values


def cache_keyword(model) -> str:
    """The name the model's forward takes its cache by: transformers 5.2x renamed
    `past_key_values` (the GPU image's 5.17) to `cache`, warning on the old name."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class DecodeForward(torch.nn.Module):
    """One decode step: `input_ids` [B, 1] at `positions` [B, 1], each row attending to its own
    cache row up to its position. Returns the logits [B, vocab] (float32)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cache_keyword = model, cache_keyword(model)

    def forward(self, input_ids, positions, cache: SlotCache):
        cache_len = cache.layers[0][0].shape[2]
        keys = torch.arange(cache_len, device=input_ids.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, 1, L]
        out = self.model(input_ids=input_ids, attention_mask={"full_attention": mask}, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_keyword: cache})
        return out.logits[:, -1].float()


class PrefillForward(torch.nn.Module):
    """Packed prompts: `input_ids`, `positions`, `rows` [1, T]; a token attends to the tokens of
    its own row (its prompt) at or before its position. Returns the logits of the tokens at
    `last_index` [n] (each prompt's last), [n, vocab] float32."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cache_keyword = model, cache_keyword(model)

    def forward(self, input_ids, positions, rows, last_index, cache: SlotCache):
        same_prompt = rows[:, None, :, None] == rows[:, None, None, :]
        causal = positions[:, None, None, :] <= positions[:, None, :, None]
        out = self.model(input_ids=input_ids, attention_mask={"full_attention": same_prompt & causal},
                         position_ids=positions, use_cache=True, logits_to_keep=last_index, **{self.cache_keyword: cache})
        return out.logits[0].float()


@dataclass
class _Pending:
    """A queued step whose tokens are on their way to the host."""

    fetch: Callable[[], list[int]]
    requests: list[EngineRequest | None]  # the request of each output row when the step was queued


class Engine:
    def __init__(self, model, *, max_slots: int, max_length: int, backend: str = "paiton", mode: str | None = "auto",
                 options: dict | None = None, max_prefill_tokens: int = 2048, prefill_cudagraphs: bool = True):
        """`max_slots`: the most sequences decoded at once. `max_length`: a sequence's prompt +
        output limit. `backend`, `mode`, `options` as for torch.compile ("eager": no compile;
        `mode` "auto": "reduce-overhead" on a GPU). `max_prefill_tokens`: the most prompt
        tokens one prefill step packs (a longer prompt is prefilled alone)."""
        if max_slots < 1 or max_length < 2:
            raise ValueError(f"the engine needs max_slots >= 1 and max_length >= 2; got {max_slots}, {max_length}")
        self.model, self.max_slots, self.max_length = model, max_slots, max_length
        self.max_prefill_tokens = max(MIN_PREFILL_TOKENS, power_of_two_at_least(max_prefill_tokens))
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.compiled = backend != "eager"
        decode, prefill = DecodeForward(model).eval(), PrefillForward(model).eval()
        if not self.compiled:
            self._decode, self._prefill = decode, prefill
        else:
            if mode == "auto":
                mode = "reduce-overhead" if self.device.type == "cuda" else None
            if backend == "inductor" and options and mode is not None:
                # torch.compile takes a mode or options for Inductor, not both: CUDA graphs as an option.
                if mode != "reduce-overhead":
                    raise ValueError(f"Inductor takes a mode or options, not both; got mode {mode!r} and {options}")
                options, mode = {**options, "triton.cudagraphs": True}, None
            kwargs = {"options": options} if options else {}
            self._decode = torch.compile(decode, backend=backend, mode=mode, fullgraph=True, dynamic=False, **kwargs)
            prefill_mode = mode if prefill_cudagraphs else None
            self._prefill = torch.compile(prefill, backend=backend, mode=prefill_mode, fullgraph=True, dynamic=False, **kwargs)
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._decode_caches: dict[int, SlotCache] = {}
        self._prefill_cache: SlotCache | None = None
        # Host state, touched by the engine thread only.
        self._slot_request: list[EngineRequest | None] = [None] * max_slots
        self._lengths = [0] * max_slots  # tokens in each row's cache (its next position)
        self._scheduled = [0] * max_slots  # tokens whose step is queued, per row (first from prefill)
        self._waiting: deque[EngineRequest] = deque()
        self._pending: deque[_Pending] = deque()
        self._last_tokens: torch.Tensor | None = None  # [max_slots + 1] on the device: each row's input
        self._sampling_rows: list[Sampling] = [Sampling()] * max_slots
        self._generators: dict[int, torch.Generator] = {}
        # Between threads.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = {"decode": 0, "prefill": 0}
        self._concurrency = max_slots
        # Tensor parallelism (models/tp_runtime.py) sets these on rank 0: `step_hook(kind, *inputs)`
        # before each device step ("prefill", "decode", "move_row": the inputs of `_run_<kind>`
        # / `_move_row`), which broadcasts it; `on_step_error(error)` after a failed step has
        # ended its requests (the ranks may be out of step then: the server is ended there).
        self.step_hook: Callable[..., None] | None = None
        self.on_step_error: Callable[[BaseException], None] | None = None

    @property
    def concurrency(self) -> int:
        """How many of the slots new requests may take (a benchmark's maximum concurrency); max_slots by default."""
        return self._concurrency

    @concurrency.setter
    def concurrency(self, value: int) -> None:
        if not 1 <= value <= self.max_slots:
            raise ValueError(f"concurrency must be in 1..{self.max_slots}, got {value}")
        self._concurrency = value

    # -- requests, from any thread --------------------------------------------------------
    def check(self, request: EngineRequest) -> None:
        """Raise EngineError if the engine cannot run `request` (the server's 400s)."""
        n = len(request.prompt)
        if n == 0:
            raise EngineError("the prompt is empty: it needs at least one token")
        if request.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if n + request.max_tokens > self.max_length:
            raise EngineError(f"the prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                              f"context this engine holds per sequence ({self.max_length} tokens)")
        bad = [t for t in request.prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"token ids must be integers in [0, {self.vocab_size}); got {bad[0]!r}")

    def submit(self, request: EngineRequest) -> EngineRequest:
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[EngineRequest]) -> list[EngineRequest]:
        """Submit `requests` together: the engine takes them in at one step, so a prefill packs
        them as it would a burst that is all waiting (warm_up counts on it for its shapes)."""
        for request in requests:
            self.check(request)
        now = time.perf_counter()
        for request in requests:
            request.id, request.submitted_at = next(self._ids), now
        self._inbox.put(("submit", list(requests)))
        self._wake.set()
        return list(requests)

    def abort(self, request: EngineRequest) -> None:
        """Finish `request` early ("abort"): its slot frees at the engine's next step."""
        self._inbox.put(("abort", request))
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------
    def start(self) -> None:
        """Run the engine on a thread of its own until `stop()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="paiton-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while not self._stopping:
            try:
                busy = self.step()
            except Exception as error:  # noqa: BLE001  (a failed step must not stop the server)
                self.fail_all(error)
                if self.on_step_error is not None:
                    self.on_step_error(error)
                continue
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def fail_all(self, error: BaseException) -> None:
        """After a step raised (out of memory, a compile error): every request in the engine
        finishes with reason "error" (`EngineRequest.error` says why), the slots and steps in
        flight are dropped, and the engine takes new requests again."""
        log.exception("paiton engine: a step failed; %d requests end with an error", len(self._in_engine()))
        for request in self._in_engine():
            request.error = f"{type(error).__name__}: {error}"
            self._finish(request, "error")
        self._waiting.clear()
        self._pending.clear()
        self._generators.clear()

    def _in_engine(self) -> list[EngineRequest]:
        requests = [r for r in self._slot_request if r is not None] + list(self._waiting)
        requests += [r for p in self._pending for r in p.requests if r is not None]
        unique = {id(r): r for r in requests if not r.finished}
        return list(unique.values())

    def run_until_done(self) -> None:
        """Step until every submitted request has finished (on the calling thread)."""
        while self.step() or not self._inbox.empty():
            pass

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: Sampling = Sampling(), stop_token_ids: Sequence[int] = (),
                 on_token: Callable[[int, int, float], None] | None = None) -> Generation:
        """Run `prompts` through the continuous batch (more prompts than slots is fine: the
        rest wait for a slot) and return them as the bundled loop does; token times count
        from each request's submission (all at once, here)."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts")
        requests = []
        for index, (prompt, limit) in enumerate(zip(prompts, limits)):
            callback = None if on_token is None else (lambda token, t, index=index: on_token(index, token, t))
            requests.append(EngineRequest(list(prompt), limit, sampling, frozenset(stop_token_ids), on_token=callback))
        for request in requests:
            self.submit(request)
        self.run_until_done()
        return Generation(tokens=[r.tokens for r in requests], token_times=[r.token_times for r in requests],
                          finish_reasons=[r.finish_reason for r in requests],
                          prompt_lengths=[len(r.prompt) for r in requests])

    @torch.no_grad()
    def step(self) -> bool:
        """One round: take in submissions and aborts, prefill waiting requests into free slots,
        queue a decode step, hand out the tokens that have reached the host. False when there
        was nothing to do."""
        self._take_inbox()
        busy = False
        # Prefill first: every waiting request that has a free slot goes in (several prefills
        # when the token budget is short) before the next decode step. A burst then decodes
        # together from its last prompt on: one decode step between two prefills of a burst
        # would delay the burst's last request by a step, and each request takes as many
        # decode steps whenever it starts (issue 20's batch 32 at output 256: the run lasts its
        # last request's first token plus 255 steps).
        while self._waiting and self.live_slots < self._concurrency and self._prefill_waiting():
            busy = True
        self._compact()
        if any(r is not None and self._scheduled[s] < r.max_tokens for s, r in enumerate(self._slot_request)):
            self._decode_step()
            busy = True
        # Keep one step in flight: wait for the older ones only.
        while len(self._pending) > (1 if busy else 0):
            self._deliver(self._pending.popleft())
            busy = True
        return busy or bool(self._waiting)

    def _take_inbox(self) -> None:
        while True:
            try:
                verb, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if verb == "submit":  # a list of requests, taken in together
                self._waiting.extend(item)
            elif not item.finished:  # "abort": one request
                if item in self._waiting:
                    self._waiting.remove(item)
                self._finish(item, "abort")

    def _buffers(self) -> None:
        if self._layers:
            return
        # Rows that are not live are still read (times a zero weight): zeroed buffers.
        self._layers = zeroed_kv_buffers(self.model.config, self.max_slots + 1, self.max_length, self.model.dtype,
                                         self.device)
        for pair in self._layers:
            for tensor in pair:
                torch._dynamo.mark_static_address(tensor)
        self._last_tokens = torch.zeros(self.max_slots + 1, dtype=torch.long, device=self.device)
        self._prefill_cache = SlotCache(self._layers, prefill=True)

    def _decode_cache(self, batch: int) -> SlotCache:
        """The cache of a decode step over rows 0..batch-1: views of the first rows of the
        buffers, made once per batch size so the compiled graphs see the same addresses."""
        cache = self._decode_caches.get(batch)
        if cache is None:
            layers = [(keys[:batch], values[:batch]) for keys, values in self._layers]
            for pair in layers:
                for tensor in pair:
                    torch._dynamo.mark_static_address(tensor)
                    if batch > 1 and self.compiled:
                        torch._dynamo.mark_dynamic(tensor, 0)
            cache = self._decode_caches[batch] = SlotCache(layers, prefill=False)
        return cache

    def _prefill_waiting(self) -> bool:
        """Pack waiting requests (as many as there are free slots and prefill tokens for) into
        one prefill step; their first tokens go to their rows of `_last_tokens`."""
        self._buffers()
        free = [slot for slot, r in enumerate(self._slot_request) if r is None]
        free = free[:max(0, self._concurrency - (self.max_slots - len(free)))]
        # First fit in arrival order: the oldest waiting request always goes in; one that would
        # overflow the token budget waits for the next prefill (still ahead of those behind it)
        # while shorter ones behind it fill the room. A burst then packs into fewer, fuller
        # buckets: issue 20's first 32 ShareGPT prompts take 2048 + 2048 + 1024 padded tokens,
        # not 3 x 2048.
        chosen, total, passed_over = [], 0, []
        while self._waiting and len(chosen) < len(free) and total < self.max_prefill_tokens:
            request = self._waiting.popleft()
            if chosen and total + len(request.prompt) > self.max_prefill_tokens:
                passed_over.append(request)
                if len(passed_over) == PREFILL_LOOKAHEAD:
                    break
                continue
            chosen.append(request)
            total += len(request.prompt)
        self._waiting.extendleft(reversed(passed_over))
        if not chosen:
            return False
        scratch = self.max_slots
        tokens = power_of_two_at_least(total, MIN_PREFILL_TOKENS)
        ids, positions, rows, last = [], [], [], []
        for request, slot in zip(chosen, free):
            n = len(request.prompt)
            ids += list(request.prompt)
            positions += range(n)
            rows += [slot] * n
            last.append(len(ids) - 1)
            self._slot_request[slot], self._lengths[slot], self._scheduled[slot] = request, n, 1
            request.admitted_at = time.perf_counter()
            self._sampling_rows[slot] = request.sampling
            if request.sampling.seed is not None and request.sampling.temperature > 0:
                self._generators[request.id] = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        pad = tokens - total
        ids += [0] * pad
        # Slots of the scratch row (wrapping when the bucket is longer than the cache: a pad then
        # shares a slot with another pad, harmlessly; each still sees itself, so no empty softmax).
        positions += [i % self.max_length for i in range(pad)]
        rows += [scratch] * pad
        last += [last[-1]] * (logit_rows_bucket(len(last)) - len(last))

        input_ids, positions_t, rows_t, last_t = (self._upload(v) for v in (ids, positions, rows, last))
        input_ids, positions_t, rows_t = input_ids[None], positions_t[None], rows_t[None]
        if self.step_hook is not None:
            self.step_hook("prefill", input_ids, positions_t, rows_t, last_t)
        logits = self._run_prefill(input_ids, positions_t, rows_t, last_t)[:len(chosen)]
        slots = free[:len(chosen)]
        first = self._sample(logits, [self._sampling_rows[s] for s in slots], chosen, [0] * len(chosen))
        self._last_tokens[self._upload(slots)] = first
        self._pending.append(_Pending(copy_to_host(first), list(chosen)))
        self.steps["prefill"] += 1
        return True

    def _run_prefill(self, input_ids, positions, rows, last_index) -> torch.Tensor:
        """The prefill forward over packed prompts ([1, T] each; `last_index` [n]): logits [n, vocab]."""
        self._buffers()
        if self.compiled:
            for tensor in (input_ids, positions, rows):
                torch._dynamo.mark_dynamic(tensor, 1)
            torch._dynamo.mark_dynamic(last_index, 0)
        cache = self._prefill_cache
        cache.positions, cache.rows = positions, rows
        return self._prefill(input_ids, positions, rows, last_index, cache)

    def _decode_step(self) -> None:
        live = [s for s, r in enumerate(self._slot_request) if r is not None]
        batch = power_of_two_at_least(max(live) + 1)
        owners: list[EngineRequest | None] = [None] * batch
        positions, steps = [0] * batch, [0] * batch
        for slot in live:
            request = self._slot_request[slot]
            if self._scheduled[slot] < request.max_tokens:
                owners[slot], positions[slot], steps[slot] = request, self._lengths[slot], self._scheduled[slot]
                self._lengths[slot] += 1
                self._scheduled[slot] += 1
        positions_t = self._upload(positions)[:, None]
        input_ids = self._last_tokens[:batch, None]
        if self.step_hook is not None:
            self.step_hook("decode", input_ids, positions_t)
        logits = self._run_decode(input_ids, positions_t)
        tokens = self._sample(logits, self._sampling_rows[:batch], owners, steps)
        self._last_tokens[:batch] = tokens
        self._pending.append(_Pending(copy_to_host(tokens), owners))
        self.steps["decode"] += 1

    def _run_decode(self, input_ids, positions) -> torch.Tensor:
        """The decode forward over rows 0..B-1 (`input_ids`, `positions` [B, 1]): logits [B, vocab]."""
        self._buffers()
        batch = input_ids.shape[0]
        if self.compiled and batch > 1:
            for tensor in (input_ids, positions):
                torch._dynamo.mark_dynamic(tensor, 0)
        cache = self._decode_cache(batch)
        cache.positions = positions
        return self._decode(input_ids, positions, cache)

    def _sample(self, logits, samplings: list[Sampling], owners: list[EngineRequest | None],
                steps: list[int] | None = None) -> torch.Tensor:
        """Each row's token by its own sampling settings: greedy rows by argmax, others by
        `sample` (one call per distinct setting; a seeded request draws from its generator).
        `steps[row]`: which of its tokens the row's request draws now (for teacher forcing)."""
        forced_rows, forced = [], []
        for row, owner in enumerate(owners):
            if owner is None:
                continue
            if owner.keep_logits:
                owner.logits.append(logits[row].clone())
            if owner.forced_tokens is not None and steps is not None and steps[row] < len(owner.forced_tokens):
                forced_rows.append(row)
                forced.append(owner.forced_tokens[steps[row]])
        tokens = self._sample_free(logits, samplings, owners)
        if forced_rows:
            tokens[self._upload(forced_rows)] = self._upload(forced)
        return tokens

    def _sample_free(self, logits, samplings: list[Sampling], owners: list[EngineRequest | None]) -> torch.Tensor:
        tokens = logits.argmax(-1)
        groups: dict[tuple, list[int]] = {}
        for row, (sampling, owner) in enumerate(zip(samplings, owners)):
            if owner is None or sampling.temperature == 0:
                continue
            key = (sampling.temperature, sampling.top_k, sampling.top_p,
                   owner.id if owner.id in self._generators else None)
            groups.setdefault(key, []).append(row)
        for (_, _, _, seeded), rows in groups.items():
            index = self._upload(rows)
            drawn = sample(logits[index], samplings[rows[0]], self._generators.get(seeded))
            tokens[index] = drawn
        return tokens

    def _upload(self, values: list[int]) -> torch.Tensor:
        """An int64 tensor of `values` on the device, copied from pinned memory without waiting:
        a plain torch.tensor(..., device="cuda") copy from pageable memory waits for the
        stream, which would make the host wait for the step in flight."""
        tensor = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _deliver(self, pending: _Pending) -> None:
        values = pending.fetch()
        now = time.perf_counter()
        for request, token in zip(pending.requests, values):
            if request is None or request.finished:
                continue  # a row that was not live, or a request that stopped a step ago
            request.tokens.append(token)
            request.token_times.append(now - request.submitted_at)
            said_stop = request.on_token(token, now - request.submitted_at) if request.on_token else None
            if said_stop or token in request.stop_token_ids:
                self._finish(request, "stop")
            elif len(request.tokens) >= request.max_tokens:
                self._finish(request, "length")

    def _finish(self, request: EngineRequest, reason: str) -> None:
        request.finish_reason = reason
        if request.keep_logits:  # (one step ahead: a step past the end may have added one)
            request.logits = [row.float().cpu() for row in request.logits[:len(request.tokens)]]
        self._generators.pop(request.id, None)
        for slot, owner in enumerate(self._slot_request):
            if owner is request:
                self._slot_request[slot] = None
                self._lengths[slot] = self._scheduled[slot] = 0
        if request.on_finish is not None:
            request.on_finish(reason)

    def _compact(self) -> None:
        """Move live rows from the upper half of the decode batch into free rows of the lower
        half, so a draining batch runs at a smaller size (its cache rows, the filled part, and
        its input token move with it)."""
        live = [s for s, r in enumerate(self._slot_request) if r is not None]
        if not live:
            return
        batch = power_of_two_at_least(max(live) + 1)
        half = batch // 2
        if batch < 2 or len(live) > half:
            return
        free_low = [s for s in range(half) if self._slot_request[s] is None]
        for source in [s for s in live if s >= half]:
            target = free_low.pop(0)
            length = self._lengths[source]
            if self.step_hook is not None:
                self.step_hook("move_row", source, target, length)
            self._move_row(source, target, length)
            self._last_tokens[target] = self._last_tokens[source]
            for table in (self._slot_request, self._lengths, self._scheduled, self._sampling_rows):
                table[target], table[source] = table[source], table[target]
        # The step in flight still names the old rows for its tokens: _Pending keeps its own list.

    def _move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cache slots of row `source` to row `target`, in every layer."""
        for keys, values in self._layers:
            keys[target, :, :length].copy_(keys[source, :, :length])
            values[target, :, :length].copy_(values[source, :, :length])

    def warm_up(self, prompt_lengths: Sequence[int] | None = None, batch_sizes: Sequence[int] | None = None,
                timeout_s: float = 3600.0, progress: Callable[[str, float], None] | None = None,
                logit_rows: Sequence[int] | None = None) -> float:
        """Compile the engine's graphs and record the CUDA graphs of the shapes a run meets:
        a prefill of one prompt of each length (default: each prefill bucket, 16 to
        max_prefill_tokens, that one prompt fits in, so a lone request's prefill never records
        during a run); packed prefills, each token bucket (of those lengths; default: each up
        to max_prefill_tokens) with each count of logit rows (`logit_rows`, default: every
        bucket that `concurrency` prompts allow), so a burst's prefills never record either;
        and decode at each batch size (default: every power of two up to max_slots; each runs
        a few steps). CUDA graph trees record a shape at its second call, so each shape is
        called twice. Runs on the engine thread if it is started (the CUDA graphs belong to
        it), else here.
        `progress(what, seconds)` hears of each shape as it is ready, with the seconds since the
        start (a 32B warm-up takes minutes: where they go). Returns the seconds it took."""
        start = time.perf_counter()
        batch_sizes = batch_sizes or [1 << i for i in range(self.max_slots.bit_length()) if 1 << i <= self.max_slots]
        if prompt_lengths is None:
            token_buckets = [n for n in (MIN_PREFILL_TOKENS << i for i in range(16)) if n <= self.max_prefill_tokens]
            prompt_lengths = [n for n in token_buckets if n <= self.max_length - 3] or [1]
        else:
            token_buckets = sorted({power_of_two_at_least(n, MIN_PREFILL_TOKENS) for n in prompt_lengths})
        if logit_rows is None:
            logit_rows = sorted({logit_rows_bucket(n) for n in range(1, self._concurrency + 1)})
        rounds = []  # (what it readies, requests)
        for length in sorted(set(prompt_lengths)):
            for call in range(2):  # recorded at the second call
                what = f"prefill of {length} tokens" if call else None
                if not rounds:  # the very first request compiles both forwards: most of a warm-up's time
                    what = f"first prefill ({length} tokens) and decode steps (the compiles)"
                rounds.append((what, [EngineRequest([1] * length, 3)]))
        # A burst's prefills: several prompts in a bucket, with more logit rows than a lone
        # prompt's 2, or in a bucket longer than one prompt may be (a server's 2048-token prefills
        # over a 1472-token context). Left out of the warm-up, each such shape was first called
        # and then recorded by served requests, at their cost (H100, Qwen3-8B, a burst of 32
        # ShareGPT prompts: 199 and 344 ms, then 122 ms; bench/results/NOTES.md, 2026-12-07).
        alone = {(power_of_two_at_least(n, MIN_PREFILL_TOKENS), 2) for n in prompt_lengths}
        for tokens in token_buckets:
            for rows in sorted(set(logit_rows)):
                lengths = self._packed_prompt_lengths(tokens, rows)
                if (tokens, rows) in alone or lengths is None:
                    continue
                for call in range(2):
                    what = f"prefill of {tokens} tokens in {len(lengths)} prompts ({rows} logit rows)" if call else None
                    rounds.append((what, [EngineRequest([1] * n, 1) for n in lengths]))
        for batch in sorted(set(batch_sizes)):
            # A batch fills (one packed prefill), then runs 4 steps at that size.
            rounds.append((f"decode at batch {batch}", [EngineRequest([1] * 4, 5) for _ in range(batch)]))
        for what, requests in rounds:
            done = threading.Semaphore(0)
            for request in requests:
                request.on_finish = lambda reason: done.release()
            self.submit_all(requests)  # one packed prefill: taken in at one step
            if self._thread is None:
                self.run_until_done()
            for _ in requests:
                if not done.acquire(timeout=timeout_s):
                    raise TimeoutError(f"the engine's warm-up did not finish ({what or 'a prefill'})")
            if progress is not None and what is not None:
                progress(what, time.perf_counter() - start)
        return time.perf_counter() - start

    def _packed_prompt_lengths(self, tokens: int, rows: int) -> list[int] | None:
        """Prompt lengths that pack into one prefill of `tokens` tokens (a bucket: a power of two)
        with `rows` logit rows: as many prompts as the rows, the slots requests may take
        (`concurrency`) and the tokens allow, sharing the tokens evenly; None if no prompt
        count gives `rows` or the prompts would not fit a sequence (with their one token)."""
        count = min(rows, self._concurrency, tokens)
        lengths = [tokens // count + (i < tokens % count) for i in range(count)]
        if logit_rows_bucket(count) != rows or tokens > self.max_prefill_tokens or lengths[0] > self.max_length - 1:
            return None
        return lengths

    # -- introspection --------------------------------------------------------------------
    def compiled_graphs(self) -> int:
        """How many graphs Dynamo compiled for the engine's two forwards (the bound the tests
        assert: 3, whatever the requests)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return sum(len(_debug_get_cache_entry_list(cls.forward.__code__)) for cls in (DecodeForward, PrefillForward))

    @property
    def live_slots(self) -> int:
        return sum(r is not None for r in self._slot_request)

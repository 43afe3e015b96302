"""`paiton serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    paiton serve --model tiny --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'

Endpoints: `POST /v1/completions` (prompt as text, token ids, or a list of either),
`POST /v1/chat/completions` (the tokenizer's chat template), `GET /v1/models`, `GET /health`,
and `GET /stats` (the engine's slots, steps and compiled graphs). `stream: true` answers with
server-sent events, one chunk per token that completes text, ending in `data: [DONE]`;
`stream_options.include_usage` adds a last chunk with the token counts. Fields that common
clients and benchmark tools send are accepted at their neutral values (`n` 1, `best_of` 1,
`logprobs` null, `echo` false, `seed`, `user`, `presence_penalty`/`frequency_penalty` 0, `logit_bias`
null, `suffix` null); other values of those, and bad input, get an OpenAI-style JSON error
(400, or 404 for an unknown model) and the server keeps serving. vLLM's extensions `top_k`,
`ignore_eos`, `min_tokens` 0 and `return_token_ids` (each choice then carries its `token_ids`)
are taken too.

The HTTP side is aiohttp (server and client stacks both well kept; on the GPU image too, which
lacks FastAPI/uvicorn). Requests from all connections go into the one continuous batch; the
engine runs on its own thread, and tokens come back to the event loop through
`call_soon_threadsafe`. Text is detokenized incrementally on the event loop (models/tokenizer.py);
stop strings are found there, and the request is then aborted in the engine (reported as
"stop"). A client that disconnects aborts its requests: their slots free at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import sys
import time
import uuid
from dataclasses import dataclass, field

from paiton.models.decode_loop import Sampling
from paiton.models.engine import Engine, EngineError, EngineRequest
from paiton.models.tokenizer import IncrementalDetokenizer, TokenizerInfo, stop_token_ids

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# Fields accepted only at these values: (field, allowed values, what to say otherwise).
NEUTRAL_FIELDS = (
    ("n", (None, 1), "n must be 1: one completion per prompt"),
    ("best_of", (None, 1), "best_of must be 1"),
    ("logprobs", (None, False, 0), "logprobs are not returned by this server"),
    ("top_logprobs", (None, 0), "logprobs are not returned by this server"),
    ("echo", (None, False), "echo is not supported"),
    ("presence_penalty", (None, 0, 0.0), "presence_penalty is not supported (only 0)"),
    ("frequency_penalty", (None, 0, 0.0), "frequency_penalty is not supported (only 0)"),
    ("repetition_penalty", (None, 1, 1.0), "repetition_penalty is not supported (only 1)"),
    ("logit_bias", (None, {}), "logit_bias is not supported"),
    ("suffix", (None, ""), "suffix is not supported"),
    ("min_tokens", (None, 0), "min_tokens is not supported (only 0)"),
)


def _number(body, name, default, low=None, high=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(f"{name} must be {bounds}, got {value}", param=name)
    return value


@dataclass
class Params:
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    ignore_eos: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool


def parse_params(body: dict, max_tokens_key: str = "max_tokens") -> Params:
    """The generation settings of a completions or chat request; ApiError for what cannot be honoured."""
    for name, allowed, message in NEUTRAL_FIELDS:
        if name in body and body[name] not in allowed:
            raise ApiError(f"{message}; got {name}={json.dumps(body[name])}", param=name)
    max_tokens = body.get(max_tokens_key, body.get("max_completion_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, integer=True)
    if max_tokens < 1:
        raise ApiError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError("top_p must be in (0, 1]", param="top_p")
    top_k = _number(body, "top_k", 0, -1, integer=True)
    seed = _number(body, "seed", None, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS}", param="stop")
    for name in ("stream", "ignore_eos", "return_token_ids"):
        if not isinstance(body.get(name, False), bool):
            raise ApiError(f"{name} must be true or false", param=name)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError("stream_options must be an object with a boolean include_usage", param="stream_options")
    sampling = Sampling(temperature=float(temperature), top_k=max(0, top_k), top_p=float(top_p), seed=seed)
    return Params(max_tokens, sampling, stop, body.get("ignore_eos", False), body.get("stream", False),
                  options.get("include_usage", False), body.get("return_token_ids", False))


@dataclass
class Choice:
    """One prompt's generation as the client sees it: text sent so far, stop strings, counts."""

    index: int
    prompt: list[int]
    detokenizer: IncrementalDetokenizer
    stop: list[str]
    request: EngineRequest | None = None
    sent: int = 0  # characters of the text already sent
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, token: int) -> str:
        """New text to send for `token` (held back while it could be the start of a stop string)."""
        self.tokens.append(token)
        self.detokenizer.add(token)
        return self._advance(final=False)

    def finish(self, reason: str) -> str:
        if self.finish_reason is None:
            self.detokenizer.flush()
            self.finish_reason = reason
        return self._advance(final=True)

    @property
    def text(self) -> str:
        text = self.detokenizer.text
        if self.finish_reason == "stop" and self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
            text = text[:cut]
        return text

    def _advance(self, final: bool) -> str:
        text = self.detokenizer.text
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits and self.finish_reason is None:
            self.finish_reason = "stop"  # found here: the engine is told to abort
            final = True
        if self.finish_reason == "stop" and hits:
            end = min(hits)
        elif final or not self.stop:
            end = len(text)
        else:  # a stop string may still complete: keep its length - 1 characters back
            end = max(self.sent, len(text) - max(len(s) for s in self.stop) + 1)
        new = text[self.sent:end]
        self.sent = max(self.sent, end)
        return new


class CompletionServer:
    """The aiohttp application around an engine (started on the app's startup, stopped at its cleanup)."""

    def __init__(self, engine: Engine, tokenizer, tokenizer_info: TokenizerInfo, model_name: str):
        self.engine, self.tokenizer, self.tokenizer_info, self.model_name = engine, tokenizer, tokenizer_info, model_name
        self.eos_ids = stop_token_ids(tokenizer)
        self.created = int(time.time())
        self.finished_requests = 0

    def app(self):
        from aiohttp import web

        @web.middleware
        async def errors(request, handler):
            try:
                return await handler(request)
            except ApiError as error:
                return web.json_response(error.body(), status=error.status)
            except web.HTTPException as error:  # unknown route, wrong method: the same JSON shape
                if error.status < 400:
                    raise
                headers = {k: v for k, v in error.headers.items() if k.lower() == "allow"}
                return web.json_response(ApiError(error.reason, error.status).body(), status=error.status, headers=headers)

        app = web.Application(client_max_size=64 * 2**20, middlewares=[errors])
        app.add_routes([web.get("/health", self.health), web.get("/v1/models", self.models), web.get("/stats", self.stats),
                        web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat)])
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app):
        self.engine.start()

    async def _stop(self, app):
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    def _json(self, body, status=200):
        from aiohttp import web

        return web.json_response(body, status=status)

    async def health(self, request):
        return self._json({"status": "ok"})

    async def models(self, request):
        return self._json({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "paiton",
            "max_model_len": self.engine.max_length}]})

    async def stats(self, request):
        engine = self.engine
        return self._json({"slots": engine.max_slots, "live_slots": engine.live_slots, "steps": dict(engine.steps),
                           "compiled_graphs": engine.compiled_graphs() if engine.compiled else 0,
                           "finished_requests": self.finished_requests, "tokenizer": self.tokenizer_info.name,
                           "max_model_len": engine.max_length})

    async def _body(self, request) -> dict:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           status=404, param="model", kind="NotFoundError")
        return body

    def _prompts(self, prompt) -> list[list[int]]:
        """The token ids of each prompt: a string, a list of ids, or a list of either."""
        if isinstance(prompt, str):
            return [self._encode(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [self._encode(p) for p in prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            return [self._token_ids(p) for p in prompt]
        if isinstance(prompt, list):
            return [self._token_ids(prompt)]
        raise ApiError("prompt must be a string, a list of token ids, or a list of either", param="prompt")

    def _encode(self, text: str) -> list[int]:
        if not text:
            raise ApiError("the prompt is empty", param="prompt")
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _token_ids(self, ids) -> list[int]:
        if not ids:
            raise ApiError("the prompt is empty", param="prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            bad = next(t for t in ids if not isinstance(t, int) or isinstance(t, bool))
            raise ApiError(f"token ids must be integers, got {json.dumps(bad)}", param="prompt")
        vocab = self.engine.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ApiError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        return list(ids)

    async def completions(self, request):
        body = await self._body(request)
        if "prompt" not in body:
            raise ApiError("prompt is required", param="prompt")
        params = parse_params(body)
        return await self._generate(request, self._prompts(body["prompt"]), params, chat=False)

    async def chat(self, request):
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages must be a non-empty list", param="messages")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ApiError("each message needs a string role and content", param="messages")
            content = message.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                           for part in content):
                    raise ApiError("only text content parts are supported", param="messages")
                message["content"] = "".join(part["text"] for part in content)
            elif not isinstance(content, str):
                raise ApiError("each message needs a string role and content", param="messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError("this model's tokenizer has no chat template: use /v1/completions", param="messages")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5.2x returns a BatchEncoding
            ids = ids["input_ids"]
        params = parse_params(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
        return await self._generate(request, [list(ids)], params, chat=True)

    async def _generate(self, request, prompts: list[list[int]], params: Params, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        choices = [Choice(i, p, IncrementalDetokenizer(self.tokenizer), params.stop) for i, p in enumerate(prompts)]
        stops = frozenset() if params.ignore_eos else self.eos_ids
        try:
            for choice in choices:
                def on_token(token, seconds, index=choice.index):  # on the engine thread; None: no stop from here
                    loop.call_soon_threadsafe(events.put_nowait, (index, "token", token))

                def on_finish(reason, index=choice.index):
                    loop.call_soon_threadsafe(events.put_nowait, (index, "finish", reason))

                choice.request = EngineRequest(choice.prompt, params.max_tokens, params.sampling, stops,
                                               on_token=on_token, on_finish=on_finish)
                self.engine.check(choice.request)
        except EngineError as error:
            raise ApiError(str(error), param="prompt") from None
        # One request's choices (a list of prompts, or n of one) enter the engine together: one prefill.
        self.engine.submit_all([choice.request for choice in choices])
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            if params.stream:
                return await self._stream(request, choices, events, params, ident, chat)
            await self._collect(choices, events)
        finally:  # also when the client went away (a write failed, or the handler was cancelled)
            for choice in choices:
                if not choice.request.finished:
                    self.engine.abort(choice.request)
        if failed := [c for c in choices if c.finish_reason == "error"]:
            raise ApiError(f"the engine failed while generating: {failed[0].request.error}", status=500, kind="server_error")
        return self._json(self._response(choices, params, ident, chat))

    async def _updates(self, choices, events):
        """(choice, new text, finish reason or None) as the engine's events arrive, until every
        choice has finished: text as each token completes it, a stop string's "stop" when it is
        found (the request is then aborted in the engine, and its later "abort" not reported
        again), the engine's own finish ("length", "stop", "error") with the text still held."""
        finished = 0
        while finished < len(choices):
            index, kind, value = await events.get()
            choice = choices[index]
            if kind == "token":
                if choice.finish_reason is not None:
                    continue
                text = choice.add(value)
                if choice.finish_reason == "stop":  # a stop string; the engine's finish comes later
                    self.engine.abort(choice.request)
                    yield choice, text, "stop"
                elif text:
                    yield choice, text, None
                continue
            finished += 1
            self.finished_requests += 1
            if choice.finish_reason == "stop" and value == "abort":
                continue  # reported when the stop string was found
            text = choice.finish(value)
            yield choice, text, choice.finish_reason

    async def _collect(self, choices, events):
        async for _ in self._updates(choices, events):
            pass

    def _usage(self, choices) -> dict:
        prompt = sum(len(c.prompt) for c in choices)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _response(self, choices, params, ident, chat) -> dict:
        out = []
        for c in choices:
            entry = {"index": c.index, "finish_reason": c.finish_reason, "logprobs": None}
            if chat:
                entry["message"] = {"role": "assistant", "content": c.text}
            else:
                entry["text"] = c.text
            if params.return_token_ids:
                entry["token_ids"] = c.tokens
            out.append(entry)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": out, "usage": self._usage(choices)}

    async def _stream(self, request, choices, events, params, ident, chat):
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        async def send(payload):
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        def chunk(choice, text, finish_reason, first=False):
            entry = {"index": choice.index, "logprobs": None, "finish_reason": finish_reason}
            if chat:
                entry["delta"] = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
            else:
                entry["text"] = text
            return {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [entry]}

        if chat:
            for choice in choices:
                await send(chunk(choice, "", None, first=True))
        async for choice, text, finish_reason in self._updates(choices, events):
            if finish_reason == "error":  # the stream has begun: an error event, as OpenAI's API sends one
                await send(ApiError(f"the engine failed while generating: {choice.request.error}", 500,
                                    kind="server_error").body())
            else:
                await send(chunk(choice, text, finish_reason))
        if params.include_usage:
            await send({"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [],
                        "usage": self._usage(choices)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _timed_choices() -> list[str]:
    """What the warm-up timed, one line a product: the launches of the one-row GEMVs (bf16 ones
    from the card's table or timed; FP8 ones timed), of the few-rows products at batch 2-64, and
    the FP8 paths of several rows."""
    from paiton.fusion import few_rows_gemm, fp8_paths, gemv

    return ([f"one-row product: {line}" for line in gemv.describe_choices()]
            + [f"few-rows product: {line}" for line in few_rows_gemm.describe_choices()]
            + [f"FP8 product: {line}" for line in fp8_paths.describe_choices()])


class StackDumps:
    """Every thread's Python stack printed to `file` each `interval_s` seconds, by a daemon
    thread of its own, until `stop()`. It reads the stacks through sys._current_frames while
    holding the GIL, so each stack is whole; faulthandler's dump_traceback_later (used here
    before) reads them from its watchdog without the GIL, and on the H200 at a8e08e6 that killed
    both Paiton servers in the middle of a dump ("File ???", then the process gone). A thread
    stuck in C code that holds the GIL delays the next dump until it lets go."""

    def __init__(self, interval_s: float, file=None, what: str = "the warm-up"):
        import threading

        self.interval_s, self.file, self.what = interval_s, file, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paiton-stack-dumps", daemon=True)
        self._began = time.perf_counter()

    def start(self) -> "StackDumps":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.dump()

    def dump(self) -> None:
        import threading
        import traceback

        names = {thread.ident: thread.name for thread in threading.enumerate()}
        lines = [f"[paiton] stacks at {time.perf_counter() - self._began:.1f} s of {self.what}:\n"]
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue  # this one's: always here
            lines.append(f"Thread {names.get(ident, ident)} (most recent call last):\n")
            lines += traceback.format_stack(frame)
        file = self.file or sys.stderr
        file.write("".join(lines))
        file.flush()


@contextlib.contextmanager
def warm_up_reporting(stack_dump_s: float = 0.0):
    """While a warm-up runs: each timed choice printed as it is made (the kernels' loggers at
    INFO: a 32B warm-up takes minutes, and a stall shows as the last choice before it), and, with
    `stack_dump_s`, every thread's Python stack printed each `stack_dump_s` seconds (StackDumps:
    where a compile or a kernel choice spends them)."""
    import logging

    from paiton.fusion import few_rows_gemm, fp8_paths, gemv

    loggers = [module.log for module in (gemv, few_rows_gemm, fp8_paths)]  # the loggers whose INFO lines are the choices
    began = time.perf_counter()

    class SinceWarmUp(logging.Formatter):  # each choice with its time into the warm-up: where the minutes go
        def format(self, record):
            return f"[paiton] choice at {time.perf_counter() - began:.1f} s: {record.getMessage()}"

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(SinceWarmUp())
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    dumps = StackDumps(stack_dump_s).start() if stack_dump_s > 0 else None
    try:
        yield
    finally:
        if dumps is not None:
            dumps.stop()
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def run_server(engine: Engine, tokenizer, tokenizer_info: TokenizerInfo, model_name: str, host: str, port: int,
               warmup: bool = False, after_warmup=None, stack_dump_s: float = 0.0) -> int:
    """Serve until interrupted. The engine starts first (and warms up, if asked, then calls
    `after_warmup`, whose line it prints: `paiton serve` saves the compile cache there), then
    the port opens; the address taken is printed (port 0: any free one). `stack_dump_s`: see
    warm_up_reporting."""
    import signal

    from aiohttp import web

    server = CompletionServer(engine, tokenizer, tokenizer_info, model_name)

    async def main():
        app = server.app()
        try:
            runner = web.AppRunner(app, handler_cancellation=True)  # a disconnect cancels its handler
        except TypeError:  # aiohttp before 3.9
            runner = web.AppRunner(app)
        engine.start()
        if warmup:
            from paiton.fusion.timing import describe_spent

            def progress(what: str, seconds: float) -> None:  # with what the kernel choices' timings took so far
                print(f"[paiton] warm-up: {what} ready at {seconds:.1f} s (choices: {describe_spent()})", flush=True)

            with warm_up_reporting(stack_dump_s):
                seconds = await asyncio.get_running_loop().run_in_executor(None, functools.partial(engine.warm_up,
                                                                                                   progress=progress))
            print(f"[paiton] warmed up in {seconds:.1f} s", flush=True)
            for line in _timed_choices():
                print(f"[paiton] {line}", flush=True)
            if after_warmup is not None:
                print(f"[paiton] {await asyncio.get_running_loop().run_in_executor(None, after_warmup)}", flush=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
        print(f"[paiton] serving {model_name} on http://{host}:{bound}/v1 (tokenizer: {tokenizer_info.name})", flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                asyncio.get_running_loop().add_signal_handler(signum, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())
    return 0


SERVING_LINE = re.compile(r"\[paiton\] serving (\S+) on (http://[\d.]+:\d+)/v1 \(tokenizer: (.*)\)")


@dataclass
class ServerProcess:
    """A `paiton serve` started by `launch`: the process, its base URL, the model name it
    serves, the tokenizer it says it uses, and every line it printed so far."""

    process: object
    url: str
    model_name: str
    tokenizer: str
    lines: list[str]

    def stop(self, timeout_s: float = 60.0) -> None:
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()


def serve_command(arguments: list[str], tensor_parallel: int = 1) -> list[str]:
    """The command line of `paiton serve ARGUMENTS`; with `tensor_parallel` N > 1, under torchrun
    with N local processes (a free rendezvous port: --standalone)."""
    import sys

    if tensor_parallel == 1:
        return [sys.executable, "-m", "paiton", "serve", *arguments]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tensor_parallel}",
            "-m", "paiton", "serve", *arguments, "--tensor-parallel", str(tensor_parallel)]


def launch(arguments: list[str], env: dict | None = None, timeout_s: float = 3600.0, log_path: str | None = None,
           tensor_parallel: int = 1) -> ServerProcess:
    """Start `python -m paiton serve ARGUMENTS --port 0` (with `tensor_parallel` N > 1: under
    torchrun, N ranks, rank 0 serving) and wait until it prints its address (after its warm-up,
    if any); its output goes on being read (into `lines`, and `log_path`). Tests and the
    benchmark's HTTP mode start servers this way, on a free local port."""
    import os
    import subprocess
    import threading

    command = serve_command([*arguments, "--port", "0"], tensor_parallel)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines, found = [], threading.Event()
    match = []
    log = open(log_path, "a") if log_path else None

    def read():
        for line in process.stdout:
            lines.append(line)
            if log:
                log.write(line)
                log.flush()
            if not found.is_set() and (hit := SERVING_LINE.search(line)):
                match.append(hit)
                found.set()
        found.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout_s)
    if not match:
        process.kill()
        raise RuntimeError("paiton serve did not start:\n" + "".join(lines[-40:]))
    name, url, tokenizer = match[0].groups()
    return ServerProcess(process, url, name, tokenizer, lines)

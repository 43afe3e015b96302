"""Tensor parallelism at run time: one process per GPU, rank 0 owning the scheduler.

    rank, world = init_tensor_parallel()                   # under torchrun (models/tensor_parallel.py)
    model = shard_qwen3(build_qwen3("qwen3-32b", ...))     # the same weights on every rank, then its shard
    engine = Engine(model, max_slots=32, max_length=2048)  # built alike on every rank
    channel = StepChannel(engine.device)
    if rank == 0:
        with channel.leading(engine):                      # each device step is broadcast, then run
            engine.generate(prompts, 64)                   # (or run_server over the engine)
    else:
        channel.follow(engine)                             # rank 0's steps, until it stops

Why this shape: the sharded model's forward holds collectives (the row-parallel all-reduces,
the vocab-parallel head's all-gather), so every rank must run the same compiled forward, on
inputs of the same shapes, in the same order. Rank 0 alone decides what runs (which requests,
which slots, how prompts are packed, which tokens are sampled). The Engine and the DecodeLoop
hand each device step (a forward, or a move of cache rows) to their `step_hook` before running
it; on rank 0 that is `StepChannel.send`, and the other ranks run the same step of their own
Engine or DecodeLoop (their shard of the model and of the KV cache) on the inputs received.

A step goes out as two broadcasts from rank 0:
* a header, a fixed-size int64 tensor: the step's kind, then per input either an int (its
  value) or a tensor (its rank and sizes). It goes over a gloo group on the CPU, so a follower
  reads it without waiting on its GPU. A follower waits for it as long as the server idles
  (IDLE_TIMEOUT_S, the group's timeout: waiting is not a failure there), while rank 0 waits
  for its delivery no longer than the collectives' timeout (`timeout_s`);
* then the tensor inputs (token ids, positions, cache rows and slots: int64), flattened into
  one tensor and broadcast over the model's group on the device (NCCL on GPUs, gloo on CPU):
  one collective whatever the number of inputs, enqueued without a host sync on rank 0.
Sampling runs on rank 0 only: the vocab-parallel head all-gathers the logits, so rank 0 has
all of them (the followers drop theirs). In one process there is no hook and nothing is sent.

Failures. A rank that dies closes its sockets: the others' next broadcast or collective raises
at once ("Connection closed by peer"). One that hangs makes the model's collectives time out
after init_tensor_parallel's `timeout_s` (NCCL's watchdog then ends the process). A follower
exits with the error (TensorParallelError); rank 0 ends what it runs: `generate` raises, and
`paiton serve` answers the requests in flight with an error and exits with status 1
(`end_server_on_step_error`), since after a failed step the ranks may be out of step.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Every kind of step the Engine and the DecodeLoop send (their step_hook's first argument), and
# the two that end a follower's loop. A header carries the index.
STEP_KINDS = ("stop", "abort", "prefill", "decode", "move_row", "cache", "forward", "shrink")
HEADER_SIZE = 64  # int64s; the largest step (prefill: 4 tensors of rank <= 2) needs 14
INT_TAG = -1  # in a header: an int input follows (a tensor input's tag is its rank, >= 0)
# How long a follower waits for rank 0's next step. Waiting is what a follower does while the
# server has no requests, so this is not the failure timeout (a dead rank 0 ends the wait at
# once: its sockets close); it only bounds a rank 0 that hangs between steps.
IDLE_TIMEOUT_S = 7 * 24 * 3600.0


class TensorParallelError(RuntimeError):
    """A tensor-parallel step could not be sent, received or run; the message says which rank saw what."""


class StepChannel:
    """Rank 0's steps to the other ranks of `group` (default: the world), with the tensors on
    `device`. `timeout_s`: how long rank 0 waits for a header to reach the others (a follower
    that hangs between steps fails rank 0 after it); give init_tensor_parallel's timeout_s."""

    def __init__(self, device, group=None, timeout_s: float = 300.0, idle_timeout_s: float = IDLE_TIMEOUT_S):
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.ranks = dist.get_rank(self.group), dist.get_world_size(self.group)
        members = dist.get_process_group_ranks(self.group)
        self._root = members[0]  # the group's rank 0, as a global rank (broadcast takes those)
        # Every member creates the header group, in the same order (new_group is collective).
        self._headers = dist.new_group(members, backend="gloo", timeout=datetime.timedelta(seconds=idle_timeout_s))
        self.sent: Counter[str] = Counter()  # steps sent (rank 0) or run (a follower), per kind
        self.failure: BaseException | None = None

    # -- rank 0 ---------------------------------------------------------------------------
    def send(self, kind: str, *inputs: int | torch.Tensor) -> None:
        """Broadcast one step (`kind`, from STEP_KINDS, and its inputs: ints, and int64 tensors
        on this channel's device) to the other ranks. The step's hook on rank 0."""
        if self.failure is not None:  # a peer is gone or out of step: no step can run any more
            raise TensorParallelError(f"tensor parallel: an earlier step failed ({self.failure})") from self.failure
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        if bad := [t.dtype for t in tensors if t.dtype != torch.int64]:
            raise TypeError(f"step inputs are int64 tensors (ids, positions, rows); got {bad[0]} in a {kind} step")
        header = [STEP_KINDS.index(kind), len(inputs)]
        for x in inputs:
            header += [x.dim(), *x.shape] if isinstance(x, torch.Tensor) else [INT_TAG, int(x)]
        if len(header) > HEADER_SIZE:
            raise ValueError(f"a {kind} step's header needs {len(header)} int64s; HEADER_SIZE is {HEADER_SIZE}")
        try:
            self._send_header(header, self.timeout)
            if tensors:
                payload = torch.cat([t.reshape(-1).to(self.device) for t in tensors])
                dist.broadcast(payload, self._root, group=self.group)
        except Exception as error:  # noqa: BLE001  (a dead or stuck peer; said once, clearly)
            self.failure = error
            raise TensorParallelError(f"tensor parallel: sending a {kind} step to the other ranks failed "
                                      f"(a rank died or hangs?): {error}") from error
        self.sent[kind] += 1

    def stop(self) -> bool:
        """End the followers' loops: "stop" after a clean run, "abort" once a step failed (they
        then exit with an error). Best effort: False (and a warning) when a follower could not be
        told, which means it is gone already (torchrun stops all ranks at once, for one)."""
        kind = "abort" if self.failure is not None else "stop"
        try:  # after a failure a follower may hang: wait a few seconds at most before giving up on it
            self._send_header([STEP_KINDS.index(kind), 0],
                              min(self.timeout, datetime.timedelta(seconds=5)) if self.failure else self.timeout)
        except Exception as error:  # noqa: BLE001
            log.warning("tensor parallel: could not tell the other ranks to %s (gone already?): %s", kind, error)
            return False
        return True

    def _send_header(self, values: list[int], timeout: datetime.timedelta) -> None:
        # Gloo's send completes once the receiver has taken it: a follower that hangs would hold
        # rank 0 here for the header group's (idle) timeout, so rank 0 waits `timeout` instead.
        header = torch.tensor(values + [0] * (HEADER_SIZE - len(values)))
        dist.broadcast(header, self._root, group=self._headers, async_op=True).wait(timeout)

    def fail(self, error: BaseException) -> None:
        """Record that a step failed on this rank: later sends raise, and `stop` sends "abort"."""
        if self.failure is None:
            self.failure = error

    @contextlib.contextmanager
    def leading(self, target):
        """Within the block, every device step of `target` (an Engine or a DecodeLoop) is sent
        to the other ranks before it runs here; at the end they are told to stop (or, after an
        exception, to abort)."""
        target.step_hook = self.send
        try:
            yield self
        except BaseException as error:
            self.fail(error)
            raise
        finally:
            target.step_hook = None
            self.stop()

    # -- the other ranks --------------------------------------------------------------------
    def receive(self) -> tuple[str, list]:
        """The next step from rank 0: (kind, inputs), the tensors on this channel's device."""
        header = torch.empty(HEADER_SIZE, dtype=torch.long)
        dist.broadcast(header, self._root, group=self._headers)
        values = header.tolist()
        kind, count, at = STEP_KINDS[values[0]], values[1], 2
        layout = []  # per input: an int, or a tensor's shape
        for _ in range(count):
            tag = values[at]
            if tag == INT_TAG:
                layout.append(values[at + 1])
                at += 2
            else:
                layout.append(torch.Size(values[at + 1:at + 1 + tag]))
                at += 1 + tag
        shapes = [x for x in layout if isinstance(x, torch.Size)]
        if not shapes:
            return kind, layout
        payload = torch.empty(sum(s.numel() for s in shapes), dtype=torch.long, device=self.device)
        dist.broadcast(payload, self._root, group=self.group)
        pieces = iter(payload.split([s.numel() for s in shapes]))
        return kind, [next(pieces).view(x) if isinstance(x, torch.Size) else x for x in layout]

    def follow(self, target) -> None:
        """Run rank 0's steps on `target` (this rank's Engine or DecodeLoop, built as rank 0
        built its own) until rank 0 says stop. Raises TensorParallelError when rank 0 aborts,
        is gone, or a step fails here."""
        steps = follower_steps(target)
        while True:
            try:
                kind, inputs = self.receive()
            except Exception as error:  # noqa: BLE001
                raise TensorParallelError(f"tensor parallel rank {self.rank}: waiting for rank 0's next step "
                                          f"failed (rank 0 died?): {error}") from error
            if kind == "stop":
                return
            if kind == "abort":
                raise TensorParallelError(f"tensor parallel rank {self.rank}: rank 0 stopped after a failed step")
            try:
                with torch.no_grad():
                    steps[kind](*inputs)
            except Exception as error:  # noqa: BLE001
                raise TensorParallelError(f"tensor parallel rank {self.rank}: the {kind} step failed "
                                          f"(a rank died or hangs?): {error}") from error
            self.sent[kind] += 1


def follower_steps(target) -> dict[str, Callable]:
    """What each step kind runs on a follower's `target`: the methods whose inputs rank 0's
    Engine or DecodeLoop hands its step_hook (a DecodeLoop's steps share its current cache)."""
    from paiton.models.decode_loop import DecodeLoop
    from paiton.models.engine import Engine

    if isinstance(target, Engine):
        return {"prefill": target._run_prefill, "decode": target._run_decode, "move_row": target._move_row}
    if isinstance(target, DecodeLoop):
        current = {}

        def cache(batch):
            current["cache"] = target._cache(batch)

        def forward(input_ids, slots, pads):
            target._forward(current["cache"], input_ids, slots, pads)

        def shrink(kept_rows):
            current["cache"] = target._shrink(current["cache"], kept_rows)

        return {"cache": cache, "forward": forward, "shrink": shrink}
    raise TypeError(f"a tensor-parallel follower runs an Engine or a DecodeLoop, not {type(target).__name__}")


def end_server_on_step_error(engine, channel: StepChannel) -> Callable[[], BaseException | None]:
    """On rank 0 of `paiton serve`: when an engine step fails (the engine has then ended the
    requests in it with an error), say so and stop the server (SIGTERM to this process, which
    run_server stops on) instead of serving on with ranks that may be out of step. Returns a
    function giving the error that ended it (None: none did)."""
    failures: list[BaseException] = []

    def on_step_error(error: BaseException) -> None:
        channel.fail(error)
        if not failures:
            failures.append(error)
            log.error("paiton serve: a tensor-parallel step failed, so the server stops: %s: %s",
                      type(error).__name__, error)
            os.kill(os.getpid(), signal.SIGTERM)

    engine.on_step_error = on_step_error
    return lambda: failures[0] if failures else None

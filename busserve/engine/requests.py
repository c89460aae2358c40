"""What the compute thread keeps per request beside the scheduler's Sequence, and the commands it accepts.

A sequence carries one of two contexts: :class:`GenerateCtx` (it samples and streams to a client) or
:class:`SendCtx` (the sender side of remote_send). ``gen_ctx`` / ``send_ctx`` return them typed.

Commands come from the bus side (asyncio) through the engine's inbox; replies go back through the ``reply``
callable each action carries (it resolves a future on the event loop). Nothing here touches NATS.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from busserve.bus.codec import ContentType
from busserve.engine.detokenizer import Detokenizer
from busserve.engine.logits_processing import LogitsSettings
from busserve.engine.sampler import SamplingState
from busserve.engine.sequence import Sequence
from busserve.kv.transfer.base import KVWriter
from busserve.messages import Abort, Migrate, PrepRecv, Probe, RemoteSend, Renew, SamplingParams, StartGenerate

Reply = Callable[[Any], None]


@dataclass
class Outbound:
    """A message for the bus side to publish, in order. ``supervised``: an event of a request a router supervises
    (while the engine fences itself, the publisher drops those: their routers are taking them over)."""

    subject: str
    msg: Any
    content_type: ContentType = "msgpack"
    supervised: bool = False


@dataclass
class GenerateCtx:
    """A request that samples: where its tokens go and how they are chosen and stopped."""

    stream_subject: str
    content_type: ContentType
    include_usage: bool
    sampling: SamplingState
    logits: LogitsSettings  # penalties, logit_bias, min_tokens (logits_processing)
    logprobs: int | None  # alternatives to report with each token's log-probability; None: no log-probabilities
    max_tokens: int  # output tokens in all, resumed ones included
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    detok: Detokenizer
    label: str  # the id stream events carry (the client's)
    # Routed requests are supervised by a router that resumes them elsewhere if this engine is lost; a direct
    # request (engine.<id>.generate) has nobody else and ends here whatever happens.
    supervisor: str = ""
    grammar: Any = None  # the structured output's llguidance matcher (None: free text)
    output_offset: int = 0  # output tokens streamed before this engine took over (resumption)
    ended: bool = False  # its terminal event is out (outputs.StreamWriter.end)
    cached_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    trace: Any = None  # the OpenTelemetry context the request arrived with (parent of the engine's spans)
    # Wall-clock stamps (ns) for spans built when the request ends; plain ints, so tracing costs the step nothing.
    t_arrival_ns: int = field(default_factory=time.time_ns)
    t_scheduled_ns: int = 0
    t_first_token_ns: int = 0

    @property
    def supervised(self) -> bool:
        return bool(self.supervisor)


@dataclass
class SendCtx:
    """The sender side of remote_send: what to write where, and how far it got."""

    writer: KVWriter | None
    begin: int
    end: int
    next_pos: int
    reply: Reply
    request_id: str
    started: float = field(default_factory=time.monotonic)
    computed_at: float = 0.0  # when the last KV of [0, end) was in our pool
    finishing: bool = False
    aborted: bool = False
    trace: Any = None
    t_start_ns: int = field(default_factory=time.time_ns)
    t_scheduled_ns: int = 0
    t_computed_ns: int = 0


def gen_ctx(seq: Sequence) -> GenerateCtx:
    ctx = seq.ctx
    assert isinstance(ctx, GenerateCtx), f"{seq.request_id} is not a generating sequence"
    return ctx


def send_ctx(seq: Sequence) -> SendCtx:
    ctx = seq.ctx
    assert isinstance(ctx, SendCtx), f"{seq.request_id} is not a sending sequence"
    return ctx


class Memory:
    """A bounded memory of request ids with a note each (oldest forgotten first)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._notes: OrderedDict[str, str] = OrderedDict()

    def add(self, request_id: str, note: str = "") -> None:
        self._notes[request_id] = note
        self._notes.move_to_end(request_id)
        while len(self._notes) > self.limit:
            self._notes.popitem(last=False)

    def get(self, request_id: str) -> str | None:
        return self._notes.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._notes


# ------------------------------------------------------------------ commands


@dataclass
class GenerateCmd:
    """The direct data-parallel path: a whole request on this engine (no router supervises it)."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    stream_subject: str
    content_type: ContentType = "msgpack"
    include_usage: bool = True
    trace: Any = None


@dataclass
class CancelCmd:
    """A client's cancel: names the client's id (a direct request's id, or a routed request's label)."""

    request_id: str
    reason: str = ""


@dataclass
class ActionCmd:
    msg: PrepRecv | StartGenerate | RemoteSend | Abort | Renew | Probe | Migrate
    reply: Reply
    content_type: ContentType = "msgpack"
    trace: Any = None
    received_ns: int = field(default_factory=time.time_ns)


@dataclass
class SendDoneCmd:
    request_id: str
    error: Exception | None
    nbytes: int


@dataclass
class WritesOverCmd:
    """A sender says it writes no more into this engine's pool for a request (shm: the writes are invisible here)."""

    request_id: str


@dataclass
class MigrationCmd:
    """From the transfer thread: a migration round (or, ``final``, the whole migration) has landed."""

    request_id: str
    final: bool
    error: Exception | None = None


@dataclass
class FenceCmd:
    """This engine lost touch with the bus for longer than routers wait before taking its requests over: drop every
    supervised request without a stream event (their routers resume them elsewhere)."""

    reason: str


@dataclass
class CallCmd:
    """Run a function on the compute thread (tests and status snapshots), reply with its result."""

    fn: Callable[[], Any]
    reply: Reply


Command = GenerateCmd | CancelCmd | ActionCmd | SendDoneCmd | WritesOverCmd | MigrationCmd | FenceCmd | CallCmd

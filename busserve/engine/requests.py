"""What the compute thread keeps per request beside the scheduler's Sequence, and the commands it accepts.

Commands come from the bus side (asyncio) through the engine's inbox; replies go back through the ``reply``
callable each action carries (it resolves a future on the event loop). Nothing here touches NATS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from busserve.bus.codec import ContentType
from busserve.engine.detokenizer import Detokenizer
from busserve.engine.sampler import SamplingState
from busserve.kv.transfer.base import KVWriter
from busserve.messages import Abort, PrepRecv, RemoteSend, SamplingParams, StartGenerate

Reply = Callable[[Any], None]


@dataclass
class Outbound:
    """A message for the bus side to publish, in order."""

    subject: str
    msg: Any
    content_type: ContentType = "msgpack"


@dataclass
class GenerateCtx:
    """A request that samples: where its tokens go and how they are chosen and stopped."""

    stream_subject: str
    content_type: ContentType
    include_usage: bool
    sampling: SamplingState
    max_tokens: int
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    detok: Detokenizer
    cached_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    trace: Any = None  # the OpenTelemetry context the request arrived with (parent of the engine's spans)
    # Wall-clock stamps (ns) for spans built when the request ends; plain ints, so tracing costs the step nothing.
    t_arrival_ns: int = field(default_factory=time.time_ns)
    t_scheduled_ns: int = 0
    t_first_token_ns: int = 0


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


# ------------------------------------------------------------------ commands


@dataclass
class GenerateCmd:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    stream_subject: str
    content_type: ContentType = "msgpack"
    include_usage: bool = True
    trace: Any = None


@dataclass
class CancelCmd:
    request_id: str
    reason: str = ""


@dataclass
class ActionCmd:
    msg: PrepRecv | StartGenerate | RemoteSend | Abort
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
class CallCmd:
    """Run a function on the compute thread (tests and status snapshots), reply with its result."""

    fn: Callable[[], Any]
    reply: Reply


Command = GenerateCmd | CancelCmd | ActionCmd | SendDoneCmd | CallCmd

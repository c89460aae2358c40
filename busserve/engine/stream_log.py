"""What an engine published on each stream lately, so that it can publish it again (``ResendStream``).

NATS delivers at most once: events in flight through a server that dies are lost, and a client then sees a gap in
``TokenChunk.index`` (or, if the tail was lost, silence). The client asks for the events again from the index it
expects (``Resend``, through a router, which knows the request's stream subject); the engine that ran the request
answers from this log. Memory is bounded: a stream's events are kept while it runs and ``RETAIN_S`` after its
terminal event, and at most ``MAX_EVENTS`` events in all (the oldest streams go first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from busserve.bus.codec import ContentType
from busserve.messages import Error, Final, TokenChunk

RETAIN_S = 60.0
MAX_EVENTS = 200_000

StreamEventOut = TokenChunk | Final | Error


@dataclass
class _Stream:
    content_type: ContentType
    events: list[StreamEventOut] = field(default_factory=list)
    ended_at: float | None = None


class StreamLog:
    def __init__(self, retain_s: float = RETAIN_S, max_events: int = MAX_EVENTS) -> None:
        self.retain_s = retain_s
        self.max_events = max_events
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._count = 0
        self._trimmed_at = 0.0

    def record(self, subject: str, event: object, content_type: ContentType) -> None:
        if not isinstance(event, (TokenChunk, Final, Error)):
            return
        stream = self._streams.get(subject)
        if stream is None:
            stream = self._streams[subject] = _Stream(content_type)
        stream.events.append(event)
        self._count += 1
        if isinstance(event, (Final, Error)):
            stream.ended_at = time.monotonic()
            self._streams.move_to_end(subject)  # ended streams in the order they ended, behind the running ones
        if self._count > self.max_events or time.monotonic() - self._trimmed_at > 1.0:
            self._trim()

    def since(self, subject: str, from_index: int) -> tuple[list[StreamEventOut], ContentType]:
        """The events of ``subject`` a reader expecting ``from_index`` still needs: the chunks that reach past it,
        and the terminal event if there was one."""
        self._trim()
        stream = self._streams.get(subject)
        if stream is None:
            return [], "msgpack"
        out = [e for e in stream.events
               if not isinstance(e, TokenChunk) or e.index + len(e.token_ids) > from_index]
        return out, stream.content_type

    def _trim(self) -> None:
        now = self._trimmed_at = time.monotonic()
        for subject, stream in list(self._streams.items()):
            expired = stream.ended_at is not None and now - stream.ended_at > self.retain_s
            if expired or self._count > self.max_events:  # over the bound: the oldest go, running or not
                self._count -= len(stream.events)
                del self._streams[subject]
            elif stream.ended_at is not None:
                break  # ended later than this one: not expired either

    def __len__(self) -> int:
        return self._count

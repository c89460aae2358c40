"""What every fault test checks, and the means to check it on the wire.

``Wire`` subscribes once to a private inbox prefix and files every message a request's stream receives, with its
arrival time — what any client of the bus would see, not what busserve's own client library makes of it. After the
fault, ``check`` asserts the promises of DESIGN.md for each stream: exactly one terminal event, nothing after it,
token indices contiguous from 0 with no repeat. ``shm_segments_of`` lists the KV segments an engine left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.messages import Error, Final, GenerateRequest, SamplingParams, StreamEvent, StreamStatus, TokenChunk


@dataclass
class Stream:
    label: str
    sent_at: float
    events: list[tuple[float, Any]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for _, e in self.events if isinstance(e, TokenChunk) for t in e.token_ids]

    @property
    def terminals(self) -> list[Final | Error]:
        return [e for _, e in self.events if isinstance(e, (Final, Error))]

    @property
    def terminal(self) -> Final | Error | None:
        t = self.terminals
        return t[0] if t else None

    def token_times(self) -> list[float]:
        return [at for at, e in self.events if isinstance(e, TokenChunk)]

    def check(self) -> None:
        """One terminal, nothing after it, indices 0, 1, 2, … with no gap and no repeat."""
        body = [e for _, e in self.events if not isinstance(e, StreamStatus)]
        terminals = self.terminals
        assert len(terminals) == 1, f"{self.label}: {len(terminals)} terminal events: {terminals}"
        assert body and body[-1] is terminals[0], f"{self.label}: events after the terminal: {body[-3:]}"
        expected = 0
        for e in body:
            if isinstance(e, TokenChunk):
                assert e.index == expected, f"{self.label}: token index {e.index} where {expected} was due"
                expected += len(e.token_ids)


class Wire:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.prefix = f"_INBOX.faults.{uuid.uuid4().hex[:8]}"
        self.streams: dict[str, Stream] = {}
        self._sub: Any = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Wire:
        self._sub = await self.bus.nc.subscribe(f"{self.prefix}.>", cb=self._on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        label = msg.subject.rsplit(".", 1)[-1]
        event: StreamEvent = codec.decode(msg.data, StreamEvent, msg.headers)
        self.streams[label].events.append((time.monotonic(), event))
        self._changed.set()

    async def send(self, label: str, prompt: list[int], max_tokens: int, **sampling: Any) -> Stream:
        stream = self.streams[label] = Stream(label, time.monotonic())
        req = GenerateRequest(request_id=label, prompt_token_ids=prompt, sampling=SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling))
        await self.bus.publish(self.bus.subjects.generate(), req, reply=f"{self.prefix}.{label}")
        return stream

    async def wait(self, predicate: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out after {timeout_s}s waiting for {what}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.5))

    async def all_ended(self, timeout_s: float, linger_s: float = 1.5) -> None:
        """Every stream has a terminal event; then listen ``linger_s`` more for anything arriving after it."""
        await self.wait(lambda: all(s.terminal is not None for s in self.streams.values()), timeout_s,
                        f"terminal events ({sum(s.terminal is None for s in self.streams.values())} missing)")
        await asyncio.sleep(linger_s)

    def check_all(self) -> None:
        for s in self.streams.values():
            s.check()


async def reference(bus: Bus, engine_id: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The uninterrupted greedy answers, from one engine (the direct path, no router)."""

    async def one(p: list[int]) -> list[int]:
        req = GenerateRequest(prompt_token_ids=p, sampling=SamplingParams(max_tokens=n, temperature=0.0,
                                                                          ignore_eos=True))
        events = [e async for e in bus.generate(req, subject=bus.subjects.engine_action(engine_id, "generate"))]
        assert isinstance(events[-1], Final), events[-1]
        return [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids]

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def shm_segments_of(engine_id: str, pid: int | None = None) -> list[str]:
    names = [n for n in os.listdir("/dev/shm") if n.startswith(f"busserve-kv-{engine_id}-")]
    return [n for n in names if pid is None or n.startswith(f"busserve-kv-{engine_id}-{pid}-")]


async def engine_pid(bus: Bus, engine_id: str, timeout_s: float = 10.0) -> int:
    from busserve.messages import EngineStatus

    sub = await bus.nc.subscribe(bus.subjects.engines_status())
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = codec.decode((await sub.next_msg(timeout=timeout_s)).data, EngineStatus)
            if st.engine_id == engine_id:
                return st.pid
        raise AssertionError(f"no heartbeat from {engine_id}")
    finally:
        await sub.unsubscribe()


def per_engine(streams: list[Stream]) -> dict[str, list[Stream]]:
    out: dict[str, list[Stream]] = defaultdict(list)
    for s in streams:
        final = s.terminal
        out[final.engine_id if isinstance(final, Final) else "?"].append(s)
    return out

"""What the fault tests share beside ``busserve.testing.Wire`` (every stream's events as the bus delivers them, and
the checks of DESIGN.md on them): uninterrupted reference answers, an engine's pid, the KV segments it left."""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.messages import Final, GenerateRequest, SamplingParams, TokenChunk
from busserve.testing import Stream


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

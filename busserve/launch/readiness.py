"""Waiting until processes serve: every named engine (and some routers) heard heartbeating on the bus."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.errors import NoResponders, RequestTimeout
from busserve.messages import EngineStatus, Probe, ProbeReply, RouterStatus


async def wait_for_engines(config: BusConfig, ids: set[str], timeout_s: float,
                           alive: Callable[[], bool], routers: int = 0) -> dict[str, EngineStatus]:
    """Wait until every engine in ``ids`` (and ``routers`` routers) heartbeat; fail early if a child dies."""
    bus = await Bus.connect(config, name="busserve-up")
    seen: dict[str, EngineStatus] = {}
    routers_seen: set[str] = set()
    try:
        sub = await bus.nc.subscribe(bus.subjects.engines_status())
        rsub = await bus.nc.subscribe(bus.subjects.routers_status())
        deadline = time.monotonic() + timeout_s
        while not (ids <= set(seen) and len(routers_seen) >= routers):
            if time.monotonic() > deadline:
                missing = sorted(ids - set(seen)) + (["router"] if len(routers_seen) < routers else [])
                raise TimeoutError(f"{', '.join(missing)} did not come up within {timeout_s:.0f}s")
            if not alive():
                raise RuntimeError("a child process exited during start-up")
            for s, handle in ((sub, "engine"), (rsub, "router")):
                with contextlib.suppress(Exception):
                    msg = await s.next_msg(timeout=0.25)
                    if handle == "engine":
                        st = codec.decode(msg.data, EngineStatus, msg.headers)
                        if st.state == "serving":
                            seen[st.engine_id] = st
                    else:
                        routers_seen.add(codec.decode(msg.data, RouterStatus, msg.headers).router_id)
        await sub.unsubscribe()
        await rsub.unsubscribe()
    finally:
        await bus.close()
    return seen


async def wait_for_engine_probes(configs: dict[str, BusConfig], timeout_s: float, alive: Callable[[], bool]) -> None:
    """Wait until every engine answers a probe on its own subject, each asked under the engine's own identity
    (``configs``: engine id → its connection) — for a host whose identities may not read the cluster's
    heartbeats."""
    deadline = time.monotonic() + timeout_s
    for engine_id, config in configs.items():
        bus = await Bus.connect(config, name=f"busserve-up-{engine_id}")
        try:
            while True:
                try:
                    await bus.request(bus.subjects.engine_action(engine_id, "probe"), Probe(request_id="-"),
                                      ProbeReply, timeout_s=2.0)
                    break
                except (NoResponders, RequestTimeout):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{engine_id} did not come up within {timeout_s:.0f}s")
                if not alive():
                    raise RuntimeError("a child process exited during start-up")
                await asyncio.sleep(0.5)
        finally:
            await bus.close()

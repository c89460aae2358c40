"""Moving a router's running requests between engines: evacuating a draining engine, and rebalancing.

**Evacuation.** An engine that drains (SIGTERM, ``busserve strategy drain``) says ``draining`` in its heartbeat.
Each router then moves the requests it supervises off it until the engine holds none or stops:

* a request that decodes there migrates live to another engine (``router/migration.py``);
* one still queued there (nothing computed yet) is aborted there and resumed elsewhere at once;
* one still prefilling is tried again a moment later (it decodes soon);
* when no other engine can take it, it stays and finishes there within the engine's grace period — what is left
  when the engine stops is resumed by recompute (supervision).

**Rebalancing** (while the active strategy has ``rebalance=1``): once a second ``rebalance.plan_moves`` says which
requests to move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from busserve.errors import BusserveError
from busserve.messages import EngineStatus
from busserve.router.cluster import ClusterView, Engine
from busserve.router.lifecycle import Flight, State
from busserve.router.migration import Moved, can_migrate, migrate, pick_target
from busserve.router.rebalance import RebalanceConfig, plan_moves
from busserve.router.supervision import Supervisor

log = logging.getLogger(__name__)

EVACUATE_POLL_S = 0.2
MAX_PARALLEL = 4  # migrations at once from one draining engine (each copies a whole context)


class Mover:
    def __init__(self, view: ClusterView, supervisor: Supervisor, flights: Callable[[], Iterable[Flight]],
                 spawn: Callable[[Any], Any], rebalance: RebalanceConfig | None = None,
                 on_moved: Callable[[Moved, str], None] | None = None,
                 enabled: Callable[[], bool] = lambda: False) -> None:
        self.view = view
        self.supervisor = supervisor
        self.flights = flights
        self.spawn = spawn
        self.rebalance = rebalance or RebalanceConfig()
        self.enabled = enabled  # rebalancing on? (the active strategy's ``rebalance`` parameter)
        self.on_moved = on_moved
        self.evacuating: set[str] = set()
        self.last_moved: dict[str, float] = {}  # base request id -> when it last moved
        self.moved = 0

    def on_status(self, st: EngineStatus) -> None:
        if st.state == "draining" and st.engine_id not in self.evacuating:
            self.evacuating.add(st.engine_id)
            self.spawn(self.evacuate(st.engine_id))

    async def move(self, flight: Flight, target: Engine, reason: str) -> Moved:
        self.last_moved[flight.req.base_id] = time.monotonic()
        moved = await migrate(self.view, flight, target, reason=reason)
        self.moved += moved.ok
        if self.on_moved is not None:
            self.on_moved(moved, reason)
        return moved

    # ------------------------------------------------------------------ evacuation

    def _draining(self, eid: str) -> bool:
        status = self.view.status_of(eid)
        return status is not None and status.state == "draining" and not self.view.is_gone(eid)

    async def evacuate(self, eid: str) -> None:
        log.info("engine %s is draining: moving its requests", eid)
        sem = asyncio.Semaphore(MAX_PARALLEL)
        busy: set[str] = set()

        async def one(flight: Flight) -> None:
            async with sem:
                try:
                    await self._evacuate_one(flight, eid)
                finally:
                    busy.discard(flight.req.base_id)

        try:
            while self._draining(eid):
                for flight in list(self.flights()):
                    if flight.req.started_on == eid and flight.req.base_id not in busy and can_migrate(flight):
                        busy.add(flight.req.base_id)
                        self.spawn(one(flight))
                await asyncio.sleep(EVACUATE_POLL_S)
        finally:
            self.evacuating.discard(eid)

    async def _evacuate_one(self, flight: Flight, eid: str) -> None:
        target = pick_target(self.view, flight, {eid})
        if target is None:
            return  # nowhere to go: it finishes here within the engine's grace period
        source = self.view.get(eid)
        if source is None:
            return
        with contextlib.suppress(BusserveError):
            if (await source.probe(flight.req)).state == "waiting":
                await self._resume_elsewhere(flight, source)
                return
        moved = await self.move(flight, target, "drain")
        if not moved.ok:
            await asyncio.sleep(0.5)  # prefilling, or a transient failure: the next poll tries again

    async def _resume_elsewhere(self, flight: Flight, source: Engine) -> None:
        """A request queued on the draining engine has nothing worth copying: start it again elsewhere."""
        if not can_migrate(flight):
            return
        flight.migrating = True  # keeps supervision out of the way, as for a migration
        try:
            reply = await source.abort(flight.req, reason="engine draining")
            if reply.terminated:
                flight.accept_engine_ended(None)
                return
            await self.supervisor.resume(flight, {source.id})
        except BusserveError as exc:
            log.warning("could not move queued request %s off %s: %s", flight.req.label, source.id, exc)
        finally:
            flight.migrating = False

    # ------------------------------------------------------------------ rebalancing

    async def rebalance_forever(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not self.enabled():
                continue
            engines = self.view.engines(role="decode")
            running = [f for f in self.flights() if f.state is State.RUNNING]
            for flight, target, reason in plan_moves(engines, running, self.rebalance, self.last_moved):
                with contextlib.suppress(Exception):
                    await self.move(flight, target, reason)

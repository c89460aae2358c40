"""The live configuration, in a NATS JetStream key-value bucket: the active strategy and each engine's roles.

Every router replica — and a router started later — reads the same values and watches them, so a switch made
through any router (or the CLI) reaches all of them, without a restart. Keys::

    strategy          StrategyState (name, params, revision)
    roles.<engine>    RolesState
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.js.errors
from nats.js.kv import KeyValue

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.errors import MalformedMessage
from busserve.messages import Role, RolesState, StrategyState

log = logging.getLogger(__name__)

T = TypeVar("T")
STRATEGY_KEY = "strategy"


def roles_key(engine_id: str) -> str:
    return f"roles.{engine_id}"


class ConfigUnavailable(Exception):
    pass


CLUSTER_JETSTREAM_WAIT_S = 30.0
# How often a watched key is also read, in case its watch died unseen (with the NATS node that held it).
RECONCILE_S = 2.0


def config_replicas(bus: Bus) -> int:
    """Replicas of the config bucket: 3 on a NATS cluster (one node's loss keeps the strategy readable and
    writable everywhere, so routers never fall back to a local choice and diverge), 1 on a single server.
    ``BUSSERVE_CONFIG_REPLICAS`` overrides."""
    explicit = os.environ.get("BUSSERVE_CONFIG_REPLICAS")
    if explicit:
        return int(explicit)
    info = getattr(bus.nc, "_server_info", {}) or {}
    return 3 if info.get("cluster") else 1


class ConfigStore:
    def __init__(self, bus: Bus, kv: KeyValue) -> None:
        self.bus = bus
        self.kv = kv
        self._watchers: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, bus: Bus) -> ConfigStore:
        js = bus.nc.jetstream(timeout=5)
        bucket = bus.subjects.config_bucket()
        replicas = config_replicas(bus)
        # A cluster that has just started elects its JetStream leader within seconds: wait for it there, rather
        # than serve without the shared configuration. A single server without JetStream says so at once.
        deadline = time.monotonic() + (CLUSTER_JETSTREAM_WAIT_S if replicas > 1 else 0.0)
        while True:
            try:
                kv = await js.create_key_value(bucket=bucket, history=8, description="busserve live configuration",
                                               replicas=replicas)
                break
            except nats.js.errors.BadRequestError:
                kv = await js.key_value(bucket)  # exists with another config: use it as it is
                break
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError,
                    nats.errors.TimeoutError) as exc:
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    continue
                raise ConfigUnavailable(f"JetStream is not available on this NATS server ({exc}); "
                                        "run nats-server with -js (busserve up does)") from exc
        return cls(bus, kv)

    async def _get(self, key: str, tp: type[T]) -> tuple[T, int] | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        try:
            return codec.decode(entry.value, tp), int(entry.revision or 0)
        except MalformedMessage as exc:
            log.warning("ignoring unreadable %s in the config bucket: %s", key, exc)
            return None

    async def get_strategy(self) -> StrategyState | None:
        found = await self._get(STRATEGY_KEY, StrategyState)
        if found is None:
            return None
        state, rev = found
        state.revision = rev
        return state

    async def put_strategy(self, state: StrategyState) -> int:
        return int(await self.kv.put(STRATEGY_KEY, codec.encode(state)))

    async def get_roles(self, engine_id: str) -> list[Role] | None:
        found = await self._get(roles_key(engine_id), RolesState)
        return list(found[0].roles) if found else None

    async def put_roles(self, engine_id: str, roles: list[Role]) -> int:
        return int(await self.kv.put(roles_key(engine_id), codec.encode(RolesState(engine_id=engine_id, roles=roles))))

    async def watch(self, key: str, tp: type[T], on_change: Callable[[T, int], Awaitable[None] | None]) -> None:
        """Call ``on_change(value, revision)`` for the current value and every later one, until ``close``.

        The watch is a JetStream consumer, and a consumer can die with the NATS node that held it without a word.
        So every ``RECONCILE_S`` the key is also read: a revision newer than the watch delivered is applied at once
        and the watch is made again — a switch reaches every watcher within seconds, whatever node went down."""
        last = [0]

        async def deliver(value: T, revision: int) -> None:
            if revision <= last[0]:
                return
            last[0] = revision
            result = on_change(value, revision)
            if asyncio.iscoroutine(result):
                await result

        async def pump(watcher: Any) -> None:
            async for entry in watcher:
                if entry is None or entry.value is None or entry.operation in ("DEL", "PURGE"):
                    continue
                try:
                    value = codec.decode(entry.value, tp)
                except MalformedMessage as exc:
                    log.warning("ignoring unreadable %s in the config bucket: %s", key, exc)
                    continue
                await deliver(value, int(entry.revision or 0))

        async def start() -> tuple[Any, asyncio.Task[None]]:
            watcher = await self.kv.watch(key)
            self._watchers.append(watcher)
            task = asyncio.create_task(pump(watcher), name=f"config-watch-{key}")
            self._tasks.append(task)
            return watcher, task

        current = [await start()]

        async def reconcile() -> None:
            while True:
                await asyncio.sleep(RECONCILE_S)
                try:
                    found = await self._get(key, tp)
                    if found is None or found[1] <= last[0]:
                        continue
                    log.warning("the watch of %s missed revision %d (a NATS node lost?); applying it and watching "
                                "again", key, found[1])
                    await deliver(*found)
                    watcher, task = current[0]
                    task.cancel()
                    with contextlib.suppress(Exception):
                        await watcher.stop()
                    current[0] = await start()
                except Exception as exc:  # the bucket unreachable for now: try again next time
                    log.debug("reconciling %s: %s", key, exc)

        self._tasks.append(asyncio.create_task(reconcile(), name=f"config-reconcile-{key}"))

    async def close(self) -> None:
        for w in self._watchers:
            with contextlib.suppress(Exception):
                await w.stop()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

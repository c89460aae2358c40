"""``busserve status``: a live view of the cluster, read from the bus (engine and router heartbeats, and the
active strategy from the config bucket). ``--once`` prints one snapshot."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

from nats.aio.msg import Msg

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.cli.options import add_bus_args, bus_config
from busserve.config_store import ConfigStore, ConfigUnavailable
from busserve.errors import MalformedMessage
from busserve.messages import EngineStatus, RouterStatus, StrategyState

STALE_S = 3.5


class Snapshot:
    def __init__(self) -> None:
        self.engines: dict[str, tuple[float, EngineStatus]] = {}
        self.routers: dict[str, tuple[float, RouterStatus]] = {}
        self.strategy: StrategyState | None = None

    async def on_engine(self, msg: Msg) -> None:
        with contextlib.suppress(MalformedMessage):
            st = codec.decode(msg.data, EngineStatus, msg.headers)
            self.engines[st.engine_id] = (time.monotonic(), st)

    async def on_router(self, msg: Msg) -> None:
        with contextlib.suppress(MalformedMessage):
            st = codec.decode(msg.data, RouterStatus, msg.headers)
            self.routers[st.router_id] = (time.monotonic(), st)

    def render(self) -> str:
        now = time.monotonic()
        lines = []
        strat = self.strategy
        lines.append("strategy: " + (f"{strat.name} {strat.params or ''} (revision {strat.revision})" if strat
                                     else "(none stored)"))
        lines.append("")
        head = f"{'engine':<12}{'model':<24}{'roles':<16}{'run':>5}{'wait':>6}{'park':>6}{'KV used':>9}" \
               f"{'cached':>8}{'hit':>7}  {'host':<14}transports"
        lines.append(head)
        for eid, (seen, st) in sorted(self.engines.items()):
            used = 1 - st.free_pages / st.total_pages if st.total_pages else 0.0
            flag = "" if now - seen < STALE_S else "  (silent)"
            lines.append(f"{eid:<12}{st.model[:23]:<24}{','.join(st.roles):<16}{st.running:>5}{st.waiting:>6}"
                         f"{st.parked:>6}{used:>8.0%} {st.cached_pages:>7}{st.prefix_hit_rate:>7.0%}  "
                         f"{st.host[:13]:<14}{','.join(st.transports)}{flag}")
        if not self.engines:
            lines.append("(no engine heard from)")
        lines.append("")
        lines.append(f"{'router':<20}{'strategy':<16}{'in flight':>10}{'done':>8}{'failed':>8}")
        for rid, (seen, rt) in sorted(self.routers.items()):
            flag = "" if now - seen < STALE_S else "  (silent)"
            lines.append(f"{rid:<20}{rt.strategy:<16}{rt.in_flight:>10}{rt.completed:>8}{rt.failed:>8}{flag}")
        if not self.routers:
            lines.append("(no router heard from)")
        return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="live view of engines, routers and the active strategy")
    add_bus_args(p)
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0)
    p.set_defaults(func=run)


async def _main(args: argparse.Namespace) -> int:
    cfg = bus_config(args, role="operator")
    cfg.max_reconnect_attempts = 0
    bus = await Bus.connect(cfg, name="busserve-status")
    snap = Snapshot()
    try:
        await bus.subscribe(bus.subjects.engines_status(), snap.on_engine)
        await bus.subscribe(bus.subjects.routers_status(), snap.on_router)
        store = None
        with contextlib.suppress(ConfigUnavailable):
            store = await ConfigStore.open(bus)
        while True:
            await asyncio.sleep(max(args.interval, 0.2) * (1.5 if args.once else 1.0))
            if store is not None:
                snap.strategy = await store.get_strategy()
            if args.once:
                print(snap.render())
                return 0
            sys.stdout.write("\x1b[2J\x1b[H" + snap.render() + "\n\n(Ctrl-C to quit)\n")
            sys.stdout.flush()
    finally:
        await bus.close()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 0
    except ConnectionError as exc:
        print(f"busserve status: {exc}", file=sys.stderr)
        return 1

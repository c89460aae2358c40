"""``busserve strategy set|show|serve|roles|drain``: live control of routing, and strategies as processes.

``set_strategy`` (also used by ``busserve bench``) lives in ``busserve.router.control``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from busserve.bus.client import Bus
from busserve.bus.runner import run_bounded
from busserve.cli.options import add_bus_args, bus_config
from busserve.config_store import ConfigStore, ConfigUnavailable
from busserve.errors import BusserveError, NoResponders
from busserve.messages import Drain, EngineStatus, Probe, ProbeReply, Role, RolesState, SetRoles
from busserve.router.control import set_strategy
from busserve.router.registry import load_strategy
from busserve.router.strategy import parse_param_args


def add_parser(sub: Any) -> None:
    p = sub.add_parser("strategy", help="show, switch or serve routing strategies")
    ss = p.add_subparsers(dest="strategy_command", required=True)
    s1 = ss.add_parser("set", help="switch the active strategy for new requests")
    s1.add_argument("name")
    s1.add_argument("--param", action="append", default=[], metavar="K=V")
    s2 = ss.add_parser("show", help="print the active strategy")
    s3 = ss.add_parser("serve", help="run a strategy function as its own process")
    s3.add_argument("target", metavar="MODULE:FUNCTION")
    s3.add_argument("--name", required=True, help="strategy name to serve under")
    s4 = ss.add_parser("roles", help="change an engine's roles while serving")
    s4.add_argument("engine_id")
    s4.add_argument("roles", help="comma-separated: prefill,decode")
    s5 = ss.add_parser("drain", help="drain an engine: its running requests move to other engines, then it stops")
    s5.add_argument("engine_id")
    s5.add_argument("--grace-s", type=float, default=60.0,
                    help="stop after this long even if some requests could not move (they resume elsewhere)")
    s5.add_argument("--wait", action="store_true", help="return once the engine has stopped")
    for sp in (s1, s2, s3, s4, s5):
        add_bus_args(sp)
    p.set_defaults(func=run)


async def _main(args: argparse.Namespace) -> int:
    cfg = bus_config(args, role="strategy" if args.strategy_command == "serve" else "operator")
    cfg.max_reconnect_attempts = 0
    if args.strategy_command == "serve":
        return await _serve(args, cfg)
    bus = await Bus.connect(cfg, name="busserve-strategy-cli")
    try:
        if args.strategy_command == "set":
            state = await set_strategy(bus, args.name, parse_param_args(args.param))
            print(f"strategy {state.name} {state.params or ''} (revision {state.revision})")
        elif args.strategy_command == "show":
            stored = await (await ConfigStore.open(bus)).get_strategy()
            print("no strategy stored yet" if stored is None else
                  f"strategy {stored.name} {stored.params or ''} (revision {stored.revision}, by {stored.updated_by})")
        elif args.strategy_command == "roles":
            roles: list[Role] = [r.strip() for r in args.roles.split(",") if r.strip()]  # type: ignore[misc]
            bad = [r for r in roles if r not in ("prefill", "decode")]
            if bad or not roles:
                print(f"roles must be prefill and/or decode, got {args.roles!r}", file=sys.stderr)
                return 2
            await (await ConfigStore.open(bus)).put_roles(args.engine_id, roles)
            try:  # immediate effect on a running engine (the stored value covers restarts)
                state = await bus.request(bus.subjects.engine_action(args.engine_id, "set_roles"),
                                          SetRoles(engine_id=args.engine_id, roles=roles), RolesState, timeout_s=5)
                print(f"engine {state.engine_id} roles: {','.join(state.roles)}")
            except NoResponders:
                print(f"engine {args.engine_id} is not running; it takes roles {','.join(roles)} when it starts")
        elif args.strategy_command == "drain":
            return await _drain(bus, args.engine_id, args.grace_s, args.wait)
        return 0
    except (BusserveError, ValueError, ConfigUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await bus.close()


async def _drain(bus: Bus, engine_id: str, grace_s: float, wait: bool) -> int:
    try:
        status = await bus.request(bus.subjects.engine_action(engine_id, "drain"), Drain(grace_s=grace_s),
                                   EngineStatus, timeout_s=5)
    except NoResponders:
        print(f"engine {engine_id} is not running", file=sys.stderr)
        return 1
    print(f"engine {engine_id} {status.state}: {status.running} running, {status.waiting} waiting", flush=True)
    if not wait:
        return 0
    deadline = asyncio.get_running_loop().time() + grace_s + 30
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.5)
        try:
            await bus.request(bus.subjects.engine_action(engine_id, "probe"), Probe(request_id="-"), ProbeReply,
                              timeout_s=2)
        except NoResponders:
            print(f"engine {engine_id} stopped")
            return 0
        except BusserveError:
            continue
    print(f"engine {engine_id} still running after {grace_s:g}s", file=sys.stderr)
    return 1


async def _serve(args: argparse.Namespace, cfg) -> int:  # type: ignore[no-untyped-def]
    from busserve.router.strategy_process import StrategyProcess

    try:
        fn = load_strategy(args.target)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg.max_reconnect_attempts = -1
    bus = await Bus.connect(cfg, name=f"busserve-strategy-{args.name}")
    proc = StrategyProcess(bus, args.name, fn)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await proc.start()
        print(f"strategy {args.name} ({args.target}) serving on {bus.subjects.strategy(args.name)}", flush=True)
        await stop.wait()
    finally:
        await proc.stop()
        await bus.close()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return run_bounded(_main(args), what="busserve strategy")
    except ConnectionError as exc:
        print(f"busserve strategy: {exc}", file=sys.stderr)
        return 1

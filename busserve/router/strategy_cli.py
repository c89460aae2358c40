"""``busserve strategy set|show|serve|roles``: live control of routing, and strategies as processes."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from busserve.bus.client import Bus
from busserve.config_store import ConfigStore, ConfigUnavailable
from busserve.errors import BusserveError, NoResponders
from busserve.messages import Role, RolesState, SetRoles, SetStrategy, StrategyState
from busserve.router.strategy import coerce_params, load_strategy, parse_param_args


async def set_strategy(bus: Bus, name: str, params: dict) -> StrategyState:  # type: ignore[type-arg]
    """Ask a router to switch (it validates and stores it for every router); with no router up, validate a
    built-in here and store it, so routers started later use it."""
    try:
        return await bus.request(bus.subjects.control_strategy(), SetStrategy(name=name, params=params),
                                 StrategyState, timeout_s=10)
    except NoResponders:
        fn = load_strategy(name)  # only a built-in can be checked without a router (ValueError otherwise)
        state = StrategyState(name=name, params=coerce_params(fn, params), updated_by="cli")
        store = await ConfigStore.open(bus)
        state.revision = await store.put_strategy(state)
        return state


async def _main(args: argparse.Namespace) -> int:
    from busserve.cli import bus_config

    cfg = bus_config(args)
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
        return 0
    except (BusserveError, ValueError, ConfigUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await bus.close()


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


def run_strategy_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except ConnectionError as exc:
        print(f"busserve strategy: {exc}", file=sys.stderr)
        return 1

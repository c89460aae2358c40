"""``busserve router``: a router (and, with ``--http-port``, the OpenAI-compatible front beside it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.engine.model_loader import resolve_model_dir
from busserve.router.dispatcher import Router, RouterConfig
from busserve.router.openai_front import Front, metrics_route, serve_http
from busserve.router.strategy import parse_param_args
from busserve.telemetry import setup as telemetry
from busserve.tokenization import load_tokenizer

log = logging.getLogger(__name__)


async def serve(bus_config: BusConfig, config: RouterConfig, tokenizer_source: str | None, http_host: str,
                http_port: int, stop: asyncio.Event) -> None:
    tel = telemetry.configure("busserve-router", config.router_id, serve_metrics=http_port > 0)
    folder, _ = resolve_model_dir(tokenizer_source)
    tokenizer = await asyncio.get_running_loop().run_in_executor(None, load_tokenizer, folder)
    bus = await Bus.connect(bus_config, name=f"busserve-{config.router_id}")
    router = Router(bus, tokenizer, config)
    front_bus = server = None
    try:
        await router.start()
        if http_port:
            # The front is one more bus client, with its own connection.
            front_bus = await Bus.connect(bus_config, name=f"busserve-front-{config.router_id}")
            front = Front(front_bus)
            await front.start()
            server = await serve_http(front, http_host, http_port,
                                      extra_routes=[metrics_route(tel.prometheus_registry)])
            print(f"OpenAI-compatible API on http://{http_host}:{http_port}/v1", flush=True)
        print(f"router {config.router_id} ready (strategy {router.active.name})", flush=True)
        await stop.wait()
    finally:
        if server is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.task, timeout=10)
        await router.stop()
        if front_bus is not None:
            await front_bus.close()
        await bus.close()
        tel.shutdown()


def run_router_command(args: argparse.Namespace, cfg: BusConfig) -> int:
    try:
        params = parse_param_args(getattr(args, "param", []) or [])
    except ValueError as exc:
        print(f"busserve router: {exc}", flush=True)
        return 2
    config = RouterConfig(initial_strategy=args.strategy or "least_loaded", initial_params=params)
    if args.id:
        config.router_id = args.id
    config.timeouts.lease_s = args.lease_s
    config.supervision.progress_s = args.progress_s
    config.supervision.resume_limit = args.resume_limit

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, config, args.tokenizer, args.http_host, args.http_port, stop)

    try:
        asyncio.run(main())
    except (ConnectionError, OSError, ValueError) as exc:
        print(f"busserve router: {exc}", flush=True)
        return 1
    return 0

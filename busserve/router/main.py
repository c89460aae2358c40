"""``busserve router``: a router (and, with ``--http-port``, the OpenAI-compatible front beside it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field

from starlette.applications import Starlette

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.identity import IdInUse
from busserve.bus.runner import run_bounded
from busserve.engine.model_loader import resolve_model_dir
from busserve.router.dispatcher import Router, RouterConfig
from busserve.router.http_guard import Guard, Limits, load_api_keys
from busserve.router.openai_front import Front, metrics_route, serve_asgi, serve_http
from busserve.router.strategy import parse_param_args
from busserve.telemetry import setup as telemetry
from busserve.tokenization import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 0  # 0: no front
    keys_file: str | None = None
    limits: Limits = field(default_factory=Limits)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: /metrics on the front's port


async def serve(bus_config: BusConfig, config: RouterConfig, tokenizer_source: str | None, http: HttpOptions,
                stop: asyncio.Event) -> None:
    http_host, http_port = http.host, http.port
    tel = telemetry.configure("busserve-router", config.router_id,
                              serve_metrics=http_port > 0 or http.metrics_port is not None)
    # Checked before anything starts: a bad keys file stops the router with its reason.
    keys = load_api_keys(http.keys_file, os.environ.get("BUSSERVE_API_KEYS")) if http_port else {}
    folder, _ = resolve_model_dir(tokenizer_source)
    tokenizer = await asyncio.get_running_loop().run_in_executor(None, load_tokenizer, folder)
    bus = await Bus.connect(bus_config, name=f"busserve-{config.router_id}")
    router = Router(bus, tokenizer, config)
    front_bus = server = metrics_server = None
    try:
        await router.start()
        metrics = metrics_route(tel.prometheus_registry)
        if http.metrics_port is not None:
            metrics_server = await serve_asgi(Starlette(routes=[metrics]), http.metrics_host, http.metrics_port,
                                              "metrics")
        if http_port:
            # The front is one more bus client, with its own connection.
            front_bus = await Bus.connect(bus_config, name=f"busserve-front-{config.router_id}")
            front = Front(front_bus, tokenizer=tokenizer)
            await front.start()
            server = await serve_http(front, http_host, http_port,
                                      extra_routes=[metrics] if http.metrics_port is None else [],
                                      guard=lambda app: Guard(app, keys, http.limits))
            print(f"OpenAI-compatible API on http://{http_host}:{http_port}/v1"
                  + (f" ({len(keys)} API key(s))" if keys else " (no API keys: open)"), flush=True)
        print(f"router {config.router_id} ready (strategy {router.active.name})", flush=True)
        await stop.wait()
    finally:
        for srv in (server, metrics_server):
            if srv is not None:
                srv.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.task, timeout=10)
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
    http = HttpOptions(host=args.http_host, port=args.http_port, keys_file=getattr(args, "api_keys_file", None),
                       limits=Limits(max_body_bytes=getattr(args, "max_body_bytes", Limits.max_body_bytes),
                                     rate_per_s=getattr(args, "rate_limit", 0.0), burst=getattr(args, "rate_burst", 0),
                                     max_concurrent=getattr(args, "max_concurrent", 0)),
                       metrics_host=getattr(args, "metrics_host", "127.0.0.1"),
                       metrics_port=getattr(args, "metrics_port", None))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, config, args.tokenizer, http, stop)

    try:
        run_bounded(main(), what=f"router {config.router_id}")
    except IdInUse as exc:
        print(f"busserve router: {exc}", flush=True)
        return 2
    except (ConnectionError, OSError, ValueError) as exc:
        print(f"busserve router: {exc}", flush=True)
        return 1
    return 0

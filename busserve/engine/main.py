"""``busserve engine``: load the model, build the engine core and serve it on the bus until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import secrets
import signal
import socket
from dataclasses import dataclass

import torch

from busserve.bus.background import BackgroundLoop
from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.identity import IdInUse
from busserve.engine.attention_backends import unavailable_reason
from busserve.engine.engine_core import EngineConfig, EngineCore, PoolTooSmall
from busserve.engine.model_loader import LoadedModel, load_model, resolve_dtype
from busserve.engine.packed_linear import maybe_pack
from busserve.engine.runner import kv_layout_for
from busserve.engine.service import EngineService, ServiceConfig
from busserve.kv.storage import SharedMemoryError
from busserve.telemetry import setup as telemetry
from busserve.telemetry.engine_telemetry import EngineTelemetry

log = logging.getLogger(__name__)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class EngineOptions:
    engine_id: str
    model: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    page_size: int = 16
    kv_pages: int | None = None
    kv_memory: str = "1GiB"
    max_batch_tokens: int | None = None
    max_prefill_tokens: int | None = None
    max_running: int = 64
    max_model_len: int | None = None
    max_queued: int = 256
    threads: int | None = None
    transports: tuple[str, ...] = ("shm", "bus")
    roles: tuple[str, ...] = ("prefill", "decode")
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    attention: str = "auto"
    linear: str = "auto"
    quantization: str = "none"
    deterministic: bool = False
    cuda_graphs: bool = True
    drain_grace_s: float = 60.0


def build_core(opts: EngineOptions, loaded: LoadedModel | None = None) -> EngineCore:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if loaded is None:
        loaded = load_model(opts.model, dtype=resolve_dtype(opts.dtype, opts.device), device=opts.device,
                            max_model_len=opts.max_model_len, quantization=opts.quantization)
    if not opts.deterministic:  # the deterministic mode puts the layers on its own kernels instead
        maybe_pack(loaded.model, opts.linear)  # in place, also for a model passed in: products are bit-identical
    per_page = kv_layout_for(loaded, 1, opts.page_size, next(loaded.model.parameters()).dtype).nbytes
    num_pages = opts.kv_pages or max(16, parse_bytes(opts.kv_memory) // per_page)
    # CPU prefill is compute-bound: chunks of ~512 tokens keep decode steps short without losing throughput. With
    # nobody decoding, a prompt of up to 2,048 tokens goes in one step: a 1,024-token prompt then takes 460 ms on
    # one core instead of 512 in two chunks (docs/BENCHMARKS.md, "one step per prompt when nobody decodes"). A
    # budget set by hand is kept for both unless --max-prefill-tokens says otherwise.
    budget = opts.max_batch_tokens or (512 if opts.device == "cpu" else 8192)
    if opts.max_prefill_tokens is not None:
        prefill_budget = opts.max_prefill_tokens
    else:
        prefill_budget = 2048 if opts.device == "cpu" and opts.max_batch_tokens is None else budget
    config = EngineConfig(
        engine_id=opts.engine_id, page_size=opts.page_size, num_pages=num_pages, max_batch_tokens=budget,
        max_prefill_tokens=prefill_budget,
        max_running=opts.max_running, max_model_len=opts.max_model_len, max_queued=opts.max_queued,
        transports=list(opts.transports),
        shm_kv="shm" in opts.transports and opts.device == "cpu", attention=opts.attention,
        deterministic=opts.deterministic, cuda_graphs=opts.cuda_graphs,
    )
    return EngineCore(config, loaded, emit=lambda outs: None)


def run_engine_process(opts: EngineOptions, bus_config: BusConfig) -> None:
    """Serve until SIGINT/SIGTERM: compute on this (main) thread, bus I/O on a background event loop."""
    tel = telemetry.configure("busserve-engine", opts.engine_id, serve_metrics=opts.metrics_port > 0)
    io = BackgroundLoop(name=f"engine-{opts.engine_id}-bus")
    bus: Bus | None = None
    service: EngineService | None = None
    core: EngineCore | None = None
    try:
        # The configuration first (a pool that cannot hold the context is refused without any bus), then the bus;
        # the id is checked by the service before it subscribes anything under it.
        core = build_core(opts)
        bus = io.run(Bus.connect(bus_config, name=f"busserve-engine-{opts.engine_id}"))
        EngineTelemetry(core, tracing=tel.tracing)
        metrics_url = ""
        if opts.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(opts.metrics_port, addr=opts.metrics_host, registry=tel.prometheus_registry)
            host = socket.gethostname() if opts.metrics_host in ("0.0.0.0", "::") else opts.metrics_host
            metrics_url = f"http://{host}:{opts.metrics_port}/metrics"
        service = EngineService(bus, core, ServiceConfig(roles=list(opts.roles),  # type: ignore[arg-type]
                                                         metrics_url=metrics_url, drain_grace_s=opts.drain_grace_s))
        io.run(service.start(run_core=False))
        _on_signals(service, io)
        print(f"engine {opts.engine_id} ready ({core.loaded.name}, {core.allocator.num_pages} KV pages)", flush=True)
        core.run()
    finally:
        if service is not None:
            io.run(service.stop(), timeout=60)
        if bus is not None:
            io.run(bus.close(), timeout=10)
        if core is not None:
            core.stop()
        io.close()
        tel.shutdown()


def _on_signals(service: EngineService, io: BackgroundLoop) -> None:
    """SIGTERM drains (routers move the engine's requests elsewhere, then it stops); SIGINT, or a second SIGTERM,
    stops after the current step (what it holds is resumed elsewhere by recompute)."""

    def on_term(*_: object) -> None:
        if service.state == "serving":
            io.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(service.drain()))
        else:
            service.core.request_stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, lambda *_: service.core.request_stop())


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        engine_id=args.id or f"e-{secrets.token_hex(3)}", model=args.model, dtype=args.dtype, device=args.device,
        page_size=args.page_size, kv_pages=args.kv_pages, kv_memory=args.kv_memory,
        max_batch_tokens=args.max_batch_tokens, max_prefill_tokens=args.max_prefill_tokens,
        max_running=args.max_running, max_model_len=args.max_model_len, max_queued=args.max_queued,
        threads=args.threads,
        transports=tuple(args.transport or (("cuda_ipc", "bus") if args.device.startswith("cuda") else ("shm", "bus"))),
        roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()), metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        attention=args.attention, linear=args.linear, quantization=args.quantization,
        deterministic=args.deterministic, cuda_graphs=args.cuda_graphs, drain_grace_s=args.drain_grace_s,
    )


def run_engine_command(args: argparse.Namespace, cfg: BusConfig) -> int:
    opts = options_from_args(args)
    bad = [r for r in opts.roles if r not in ("prefill", "decode")]
    if bad:
        print(f"unknown role(s) {bad}; use prefill, decode", flush=True)
        return 2
    # Refuse an attention backend that cannot run here before spending seconds on loading the model.
    reason = None if opts.attention == "auto" else unavailable_reason(opts.attention, torch.device(opts.device))
    if reason is not None:
        print(f"busserve engine: --attention {opts.attention}: {reason}", flush=True)
        return 2
    try:
        run_engine_process(opts, cfg)
    except (PoolTooSmall, SharedMemoryError, IdInUse) as exc:
        print(f"busserve engine: {exc}", flush=True)
        return 2
    except ConnectionError as exc:
        print(f"busserve engine: {exc}", flush=True)
        return 1
    return 0


"""``busserve up``: the whole stack in one command, as child processes of this one.

1. the embedded nats-server (unless ``--nats`` names a running one);
2. ``--engines`` engine processes, each pinned to its share of the CPU cores (torch threads to match);
3. one router process serving the OpenAI-compatible HTTP front.

It waits until every engine heartbeats, records the bus URL in the state file (so ``busserve generate`` finds it),
and on Ctrl-C / SIGTERM stops the children, then the server. Children also die with this process (parent-death
signal), so nothing is left behind if it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig, clear_up_state, write_up_state
from busserve.bus.embedded import EmbeddedNats, _die_with_parent, free_port
from busserve.messages import EngineStatus, RouterStatus
from busserve.up import StopFlag

ENGINE_READY_TIMEOUT_S = 600.0  # a first start converts the default model (~20 s here); a big model takes longer


def core_shares(n_engines: int, cores: list[int]) -> list[list[int]]:
    """Split the cores among engines as evenly as possible (engines share cores when there are fewer)."""
    if n_engines <= len(cores):
        per = len(cores) // n_engines
        return [cores[i * per : (i + 1) * per] for i in range(n_engines)]
    return [[cores[i % len(cores)]] for i in range(n_engines)]


def _preexec(cpus: list[int] | None) -> Callable[[], None]:
    def run() -> None:
        _die_with_parent()
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)

    return run


def _common_bus_flags(args: argparse.Namespace, url: str) -> list[str]:
    flags = ["--nats", url]
    for name in ("nats_user", "nats_password", "nats_token", "nats_creds", "nats_nkey", "nats_tls_ca",
                 "nats_tls_cert", "nats_tls_key", "subject_prefix"):
        value = getattr(args, name, None)
        if value:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def engine_command(args: argparse.Namespace, url: str, engine_id: str, threads: int, roles: str) -> list[str]:
    cmd = [sys.executable, "-m", "busserve.cli", "--log-level", args.log_level, "engine", "--id", engine_id,
           "--threads", str(threads), "--roles", roles, "--metrics-port", str(free_port()), "--dtype", args.dtype, "--page-size", str(args.page_size),
           "--kv-memory", args.kv_memory, "--max-running", str(args.max_running), "--device", args.device,
           "--attention", args.attention, "--linear", args.linear,
           *_common_bus_flags(args, url)]
    for flag, value in (("--model", args.model), ("--kv-pages", args.kv_pages),
                        ("--max-batch-tokens", args.max_batch_tokens),
                        ("--max-prefill-tokens", args.max_prefill_tokens), ("--max-model-len", args.max_model_len)):
        if value is not None:
            cmd += [flag, str(value)]
    for t in args.transport or []:
        cmd += ["--transport", t]
    return cmd


def router_command(args: argparse.Namespace, url: str) -> list[str]:
    cmd = [sys.executable, "-m", "busserve.cli", "--log-level", args.log_level, "router", "--id", "router-0",
           "--strategy", args.strategy, "--http-host", args.http_host, "--http-port", str(args.http_port),
           *_common_bus_flags(args, url)]
    for p in args.param:
        cmd += ["--param", p]
    if args.model:
        cmd += ["--tokenizer", args.model]
    return cmd


async def wait_for_engines(config: BusConfig, ids: set[str], timeout_s: float,
                           alive: Callable[[], bool], routers: int = 0) -> dict[str, EngineStatus]:
    """Wait until every engine in ``ids`` (and ``routers`` routers) heartbeat; fail early if a child dies."""
    from busserve.bus import codec

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
                        seen[st.engine_id] = st
                    else:
                        routers_seen.add(codec.decode(msg.data, RouterStatus, msg.headers).router_id)
        await sub.unsubscribe()
        await rsub.unsubscribe()
    finally:
        await bus.close()
    return seen


def launch_cluster(args: argparse.Namespace) -> int:
    stop = StopFlag()
    server: EmbeddedNats | None = None
    if args.nats:
        url = args.nats[0]
    else:
        server = EmbeddedNats(port=args.nats_port).start()
        url = server.url
    print(f"bus: {url}" + (" (embedded nats-server, JetStream on)" if server else ""), flush=True)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        cores = sorted(os.sched_getaffinity(0))
        shares = core_shares(args.engines, cores)
        roles = args.roles or []
        for i in range(args.engines):
            eid = f"e{i}"
            role = roles[i] if i < len(roles) else "prefill,decode"
            cmd = engine_command(args, url, eid, len(shares[i]), role)
            proc = subprocess.Popen(cmd, preexec_fn=_preexec(shares[i]), start_new_session=True)
            children.append((eid, proc))
            print(f"engine {eid}: pid {proc.pid}, cores {shares[i]}, roles {role}", flush=True)
        router = subprocess.Popen(router_command(args, url), preexec_fn=_preexec(None), start_new_session=True)
        children.append(("router", router))
        config = BusConfig.from_env(servers=[url])
        for name in ("user", "password", "token"):
            val = getattr(args, f"nats_{name}", None)
            if val:
                setattr(config, name, val)
        statuses = asyncio.run(wait_for_engines(
            config, {eid for eid, _ in children if eid != "router"}, ENGINE_READY_TIMEOUT_S,
            alive=lambda: all(p.poll() is None for _, p in children), routers=1,
        ))
        model = next(iter(statuses.values())).model
        http = f"http://{args.http_host}:{args.http_port}/v1" if args.http_port else ""
        write_up_state({"pid": os.getpid(), "nats_url": url, "http_url": http, "model": model,
                        "started_at": time.time()})
        print(f"ready: {len(statuses)} engine(s) serving {model}" + (f"; OpenAI API at {http}" if http else ""),
              flush=True)
        scrape = [st.metrics_url for st in statuses.values() if st.metrics_url]
        if http:
            scrape.insert(0, http.removesuffix("/v1") + "/metrics")
        if scrape:
            print(f"metrics: {' '.join(scrape)}", flush=True)
        print('try:  busserve generate "What is the capital of France?"   (Ctrl-C stops everything)', flush=True)
        while not stop.wait(0.5):
            dead = [(name, p.returncode) for name, p in children if p.poll() is not None]
            if dead:
                print(f"stopping: {', '.join(f'{n} exited with {rc}' for n, rc in dead)}", flush=True)
                return 1
        return 0
    except (TimeoutError, RuntimeError, ConnectionError) as exc:
        print(f"busserve up: {exc}", flush=True)
        return 1
    finally:
        for _, p in children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in children:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        clear_up_state(os.getpid())
        if server is not None:
            server.stop()
        print("stopped", flush=True)


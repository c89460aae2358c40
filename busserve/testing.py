"""Start real busserve processes for integration tests and benchmarks — an embedded nats-server, engine processes,
routers and strategy processes, each a real ``busserve`` command, stopped in reverse order — follow their
heartbeats (``live_view``), and watch their streams on the wire: ``Wire`` files every event each request's stream receives, as any bus client sees it, and
``Stream.check`` asserts the promises (one terminal event, nothing after it, contiguous token indices)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import EmbeddedNats, _die_with_parent
from busserve.bus.subjects import Subjects
from busserve.launch.readiness import wait_for_engines
from busserve.messages import (
    EngineStatus,
    Error,
    Final,
    GenerateRequest,
    KVEventBatch,
    SamplingParams,
    StreamEvent,
    StreamStatus,
    TokenChunk,
)
from busserve.router.cluster import ClusterView, Timeouts
from busserve.security.server_config import Credentials, auth_config


def _preexec(cpus: list[int] | None) -> None:
    _die_with_parent()
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


@dataclass
class ProcessCluster:
    """A nats-server plus busserve child processes. Use as a context manager."""

    nats: EmbeddedNats = field(default_factory=EmbeddedNats)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: str | None = None
    # A secured server (busserve/security): every process started under a name with an identity here connects
    # as it (through its environment); None: an open server.
    credentials: Credentials | None = None
    # The server's users and grants; by default generated from ``credentials`` (a test may widen one user's).
    auth: str | None = None
    # The CA that signed the server's certificate, where it requires TLS (children get it in their environment).
    tls_ca: str | None = None

    def __enter__(self) -> ProcessCluster:
        if self.auth is not None:
            self.nats.extra_config = self.auth
        elif self.credentials is not None:
            self.nats.extra_config = auth_config(list(self.credentials.identities.values()), Subjects())
        self.nats.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.nats.url

    def bus_config(self, identity: str = "operator") -> BusConfig:
        """How a test connects: as ``identity`` on a secured cluster (a name, or a role's one identity)."""
        base = BusConfig(servers=[self.url], max_reconnect_attempts=2, tls_ca=self.tls_ca)
        if self.credentials is None:
            return base
        ident = self.credentials.identities.get(identity) or self.credentials.of_role(identity)  # type: ignore[arg-type]
        return ident.bus_config(base)

    def start(self, name: str, *argv: str, cpus: list[int] | None = None, env: dict[str, str] | None = None,
              launcher: list[str] | None = None) -> subprocess.Popen[bytes]:
        """``busserve <argv>`` as a child named ``name``; ``launcher`` runs it through a wrapper (that ends by
        exec-ing its arguments, e.g. ``unshare``), so the child keeps the pid this cluster stops."""
        cmd = [*(launcher or []), sys.executable, "-m", "busserve.cli", *argv]
        log = None
        if self.log_dir:
            log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")  # noqa: SIM115 - owned by the child
        ident = self.credentials.identities.get(name) if self.credentials is not None else None
        secret = ident.env() if ident is not None else {}
        if self.tls_ca:
            secret["BUSSERVE_NATS_TLS_CA"] = self.tls_ca
        proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else None,
                                env={**os.environ, **secret, **(env or {})}, start_new_session=True,
                                preexec_fn=lambda: _preexec(cpus))
        if log:
            log.close()
        self.procs[name] = proc
        return proc

    def start_engine(self, engine_id: str, *extra: str, cpus: list[int] | None = None,
                     threads: int | None = None, env: dict[str, str] | None = None,
                     launcher: list[str] | None = None) -> subprocess.Popen[bytes]:
        argv = ["engine", "--nats", self.url, "--id", engine_id, *extra]
        if threads or cpus:
            argv += ["--threads", str(threads or len(cpus or []))]
        return self.start(engine_id, *argv, cpus=cpus, env=env, launcher=launcher)

    def wait_engines(self, ids: set[str], timeout_s: float = 300.0) -> dict[str, EngineStatus]:
        alive = lambda: all(p.poll() is None for p in self.procs.values())  # noqa: E731
        return asyncio.run(wait_for_engines(self.bus_config(), ids, timeout_s, alive))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        # SIGINT: stop now (SIGTERM would make engines drain, waiting for what they hold).
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self.nats.stop()


async def live_view(bus: Bus, ids: set[str], timeouts: Timeouts | None = None, wait_s: float = 60.0) -> ClusterView:
    """A ClusterView fed by heartbeats and KV events for as long as the bus connection lives, once every engine in
    ``ids`` heartbeats."""
    view = ClusterView(bus, timeouts)

    async def on_status(msg: Msg) -> None:
        view.on_status(codec.decode(msg.data, EngineStatus, msg.headers))

    async def on_kv(msg: Msg) -> None:
        view.on_kv_events(codec.decode(msg.data, KVEventBatch, msg.headers))

    await bus.subscribe(bus.subjects.engines_status(), on_status)
    await bus.subscribe(bus.subjects.all_kv_events(), on_kv)
    deadline = time.monotonic() + wait_s
    while not all(view.is_alive(i) for i in ids):
        assert time.monotonic() < deadline, f"engines {ids} not all heartbeating"
        await asyncio.sleep(0.1)
    return view


# ------------------------------------------------------------------ streams on the wire


@dataclass
class Stream:
    label: str
    sent_at: float
    events: list[tuple[float, Any]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for _, e in self.events if isinstance(e, TokenChunk) for t in e.token_ids]

    @property
    def terminals(self) -> list[Final | Error]:
        return [e for _, e in self.events if isinstance(e, (Final, Error))]

    @property
    def terminal(self) -> Final | Error | None:
        t = self.terminals
        return t[0] if t else None

    def token_times(self) -> list[float]:
        return [at for at, e in self.events if isinstance(e, TokenChunk)]

    def check(self) -> None:
        """One terminal, nothing after it, indices 0, 1, 2, … with no gap and no repeat."""
        body = [e for _, e in self.events if not isinstance(e, StreamStatus)]
        terminals = self.terminals
        assert len(terminals) == 1, f"{self.label}: {len(terminals)} terminal events: {terminals}"
        assert body and body[-1] is terminals[0], f"{self.label}: events after the terminal: {body[-3:]}"
        expected = 0
        for e in body:
            if isinstance(e, TokenChunk):
                assert e.index == expected, f"{self.label}: token index {e.index} where {expected} was due"
                expected += len(e.token_ids)


class Wire:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.prefix = f"{bus.subjects.inbox_prefix(bus.owner)}.wire-{uuid.uuid4().hex[:8]}"
        self.streams: dict[str, Stream] = {}
        self._sub: Any = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Wire:
        self._sub = await self.bus.nc.subscribe(f"{self.prefix}.>", cb=self._on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        label = msg.subject.rsplit(".", 1)[-1]
        event: StreamEvent = codec.decode(msg.data, StreamEvent, msg.headers)
        self.streams[label].events.append((time.monotonic(), event))
        self._changed.set()

    def listen(self, label: str) -> tuple[Stream, str]:
        """A stream to be fed by whoever publishes to the returned subject (a benchmark driving engines itself)."""
        stream = self.streams[label] = Stream(label, time.monotonic())
        return stream, f"{self.prefix}.{label}"

    async def send(self, label: str, prompt: list[int], max_tokens: int, **sampling: Any) -> Stream:
        stream = self.streams[label] = Stream(label, time.monotonic())
        req = GenerateRequest(request_id=label, prompt_token_ids=prompt, sampling=SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling))
        await self.bus.publish(self.bus.subjects.generate(self.bus.owner), req, reply=f"{self.prefix}.{label}")
        return stream

    async def wait(self, predicate: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out after {timeout_s}s waiting for {what}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.5))

    async def all_ended(self, timeout_s: float, linger_s: float = 1.5) -> None:
        """Every stream has a terminal event; then listen ``linger_s`` more for anything arriving after it."""
        await self.wait(lambda: all(s.terminal is not None for s in self.streams.values()), timeout_s,
                        f"terminal events ({sum(s.terminal is None for s in self.streams.values())} missing)")
        await asyncio.sleep(linger_s)

    def check_all(self) -> None:
        for s in self.streams.values():
            s.check()

    async def closed_loop(self, prompts: list[list[int]], tokens: int, concurrency: int = 16, label: str = "m",
                          **sampling: Any) -> dict[str, float]:
        """Every prompt as a greedy request of ``tokens`` output tokens, ``concurrency`` in flight at any time,
        each stream checked and required to end in a Final: output tok/s, wall time, tokens, TTFT p50."""
        from busserve.bench.metrics import percentile

        t0 = time.monotonic()
        sent = 0

        def running() -> int:
            return sum(s.terminal is None for s in self.streams.values())

        while sent < len(prompts):
            if running() < concurrency:
                await self.send(f"{label}{sent}", prompts[sent], tokens, **sampling)
                sent += 1
            else:
                await self.wait(lambda: running() < concurrency, 600, "a free slot")
        await self.all_ended(600, linger_s=0.0)
        wall = time.monotonic() - t0
        self.check_all()
        failed = [s.terminal for s in self.streams.values() if not isinstance(s.terminal, Final)]
        assert not failed, failed[:3]
        out = sum(len(s.tokens) for s in self.streams.values())
        ttft = [s.token_times()[0] - s.sent_at for s in self.streams.values() if s.token_times()]
        return {"tok_s": out / wall, "wall_s": wall, "tokens": out, "ttft_p50_s": percentile(ttft, 50)}


async def prompt_tokens_computed(bus: Bus, ids: set[str], timeout_s: float = 10.0) -> int:
    """The prompt tokens the engines ``ids`` have computed so far, from a heartbeat of each sent after this call."""
    sub = await bus.nc.subscribe(bus.subjects.engines_status())
    seen: dict[str, int] = {}
    try:
        while set(seen) != ids:
            st = codec.decode((await sub.next_msg(timeout=timeout_s)).data, EngineStatus)
            if st.engine_id in ids:
                seen[st.engine_id] = st.prompt_tokens_computed
    finally:
        await sub.unsubscribe()
    return sum(seen.values())

"""Start real busserve processes for integration tests and benchmarks: an embedded nats-server, engine processes,
routers and strategy processes, each a real ``busserve`` command, stopped in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from busserve.bus.config import BusConfig
from busserve.bus.embedded import EmbeddedNats, _die_with_parent
from busserve.launch.readiness import wait_for_engines
from busserve.messages import EngineStatus


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

    def __enter__(self) -> ProcessCluster:
        self.nats.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.nats.url

    def bus_config(self) -> BusConfig:
        return BusConfig(servers=[self.url], max_reconnect_attempts=2)

    def start(self, name: str, *argv: str, cpus: list[int] | None = None, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "busserve.cli", *argv]
        log = None
        if self.log_dir:
            log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else None,
                                env={**os.environ, **(env or {})}, start_new_session=True,
                                preexec_fn=lambda: _preexec(cpus))
        if log:
            log.close()
        self.procs[name] = proc
        return proc

    def start_engine(self, engine_id: str, *extra: str, cpus: list[int] | None = None,
                     threads: int | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        argv = ["engine", "--nats", self.url, "--id", engine_id, *extra]
        if threads or cpus:
            argv += ["--threads", str(threads or len(cpus or []))]
        return self.start(engine_id, *argv, cpus=cpus, env=env)

    def wait_engines(self, ids: set[str], timeout_s: float = 300.0) -> dict[str, EngineStatus]:
        alive = lambda: all(p.poll() is None for p in self.procs.values())  # noqa: E731
        return asyncio.run(wait_for_engines(self.bus_config(), ids, timeout_s, alive))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self.nats.stop()


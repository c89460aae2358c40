"""The embedded nats-server starts, serves (JetStream included) and stops — also when interrupted or killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from busserve.bus.embedded import EmbeddedNats, free_port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.asyncio
async def test_starts_serves_and_stops() -> None:
    server = EmbeddedNats().start()
    data_dir = server.data_dir
    try:
        nc = await nats.connect(server.url)
        sub = await nc.subscribe("ping")
        await nc.publish("ping", b"pong")
        assert (await sub.next_msg(timeout=2)).data == b"pong"
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="probe")
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
        await nc.close()
    finally:
        server.stop()
    assert not server.running
    assert not _port_open(server.port)
    assert not data_dir.exists()  # its own temporary folder is removed


def test_given_port_and_data_dir(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedNats(port=port, data_dir=tmp_path / "store") as server:
        assert server.url.endswith(f":{port}")
        assert _port_open(port)
    assert (tmp_path / "store").exists()  # a folder the caller gave is kept


def _start_cli(port: int, state_dir: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, BUSSERVE_STATE_DIR=str(state_dir))
    proc = subprocess.Popen(
        [sys.executable, "-m", "busserve.cli", "nats", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    assert _wait(lambda: _port_open(port)), "server never came up"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_server_stops_cleanly_when_interrupted(sig: signal.Signals, tmp_path: Path) -> None:
    port = free_port()
    proc = _start_cli(port, tmp_path)
    assert _wait(lambda: (tmp_path / "up.json").exists())
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "stopped" in out
    assert not _port_open(port)
    assert not (tmp_path / "up.json").exists()  # the state file goes with it


def test_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    port = free_port()
    proc = _start_cli(port, tmp_path)
    proc.kill()  # no chance to clean up: the kernel's parent-death signal must take the server down
    proc.communicate(timeout=5)
    assert _wait(lambda: not _port_open(port), timeout=10), "orphaned nats-server still listening"

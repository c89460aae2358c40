"""The nats-server configs in ops/ are valid, and the secured one works end to end with TLS and passwords."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import free_port, nats_server_binary
from busserve.errors import NoResponders
from busserve.messages import Ack, Cancel

OPS = Path(__file__).resolve().parent.parent / "ops" / "nats"


def _check(conf: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(nats_server_binary()), "-t", "-c", str(OPS / conf)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)


def test_dev_and_cluster_configs_are_valid() -> None:
    assert _check("dev.conf").returncode == 0
    out = _check("cluster-node.conf", NODE="n1", CLIENT_PORT="4222", CLUSTER_PORT="6222")
    assert out.returncode == 0, out.stderr


def _make_certs(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=busserve-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.ext")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.asyncio
async def test_secured_config_with_tls_and_passwords(tmp_path: Path) -> None:
    _make_certs(tmp_path)
    port = free_port()
    env = {**os.environ, "PORT": str(port), "TLS_CERT": str(tmp_path / "server.pem"),
           "TLS_KEY": str(tmp_path / "server-key.pem"), "TLS_CA": str(tmp_path / "ca.pem"),
           "STORE_DIR": str(tmp_path / "js"), "ENGINE_PASSWORD": "e-secret", "ROUTER_PASSWORD": "r-secret",
           "CLIENT_PASSWORD": "c-secret"}
    proc = subprocess.Popen([str(nats_server_binary()), "-c", str(OPS / "secured.conf")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"tls://127.0.0.1:{port}"
        base = dict(servers=[url], tls_ca=str(tmp_path / "ca.pem"), max_reconnect_attempts=0)
        deadline = time.monotonic() + 10
        engine = None
        while engine is None:
            try:
                engine = await Bus.connect(BusConfig(user="engine", password="e-secret", **base), name="t-engine")
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client = await Bus.connect(BusConfig(user="client", password="c-secret", **base), name="t-client")
        # The client may send requests; nobody serves them here, which it learns at once.
        with pytest.raises(NoResponders):
            await client.request(client.subjects.cancel(), Cancel(request_id="x"), Ack, timeout_s=2)
        with pytest.raises(ConnectionError):
            await Bus.connect(BusConfig(user="client", password="wrong", **base), name="t-bad")
        with pytest.raises(ConnectionError):  # no CA: the server's certificate is not trusted
            await Bus.connect(BusConfig(servers=[url], user="client", password="c-secret", connect_timeout_s=1.0,
                                        connect_attempts=1), name="t-notls")
        await client.close()
        await engine.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)

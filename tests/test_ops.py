"""The nats-server configs in ops/ are valid, and the one `busserve security init --tls` writes works end to end
(TLS, per-identity passwords, the grants of the roles matrix)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import free_port, nats_server_binary
from busserve.config_store import ConfigStore
from busserve.errors import NoResponders
from busserve.messages import Ack, Cancel, StrategyState
from busserve.security.server_config import Credentials

OPS = Path(__file__).resolve().parent.parent / "ops" / "nats"


def _check(conf: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(nats_server_binary()), "-t", "-c", str(OPS / conf)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)


def test_dev_and_cluster_configs_are_valid() -> None:
    assert _check("dev.conf").returncode == 0
    out = _check("cluster-node.conf", NODE="n1", CLIENT_PORT="4222", CLUSTER_PORT="6222")
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.asyncio
async def test_security_init_gives_a_working_tls_deployment(tmp_path: Path) -> None:
    """`busserve security init --tls`: the server config it writes starts; a client with the CA and its password
    connects over TLS and may send requests but not read others' inboxes; a wrong password and a client that does
    not trust the CA are refused."""
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "busserve.cli", "security", "init", str(tmp_path), "--tls",
                          "--port", str(port), "--engine", "e0", "--client", "alice"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("credentials.json", "nats-server.conf", "server-key.pem", "ca-key.pem"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name
    assert _check_file(tmp_path / "nats-server.conf").returncode == 0
    creds = Credentials.load(tmp_path / "credentials.json")
    proc = subprocess.Popen([str(nats_server_binary()), "-c", str(tmp_path / "nats-server.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"tls://127.0.0.1:{port}"
        base = BusConfig(servers=[url], tls_ca=str(tmp_path / "ca.pem"), max_reconnect_attempts=0)
        deadline = time.monotonic() + 10
        engine = None
        while engine is None:
            try:
                engine = await Bus.connect(creds.identities["e0"].bus_config(base), name="t-engine")
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client = await Bus.connect(creds.identities["alice"].bus_config(base), name="t-client")
        # The client may send requests under its name; nobody serves them here, which it learns at once.
        with pytest.raises(NoResponders):
            await client.request(client.subjects.cancel("alice"), Cancel(request_id="x"), Ack, timeout_s=2)
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        client.nc._error_cb = on_error  # type: ignore[attr-defined]
        await client.nc.subscribe("_INBOX.>")
        await client.nc.flush()
        await asyncio.sleep(0.3)
        assert any("permissions violation" in e for e in errors), errors
        wrong = BusConfig(**{**base.__dict__, "user": "alice", "password": "wrong", "connect_attempts": 1})
        with pytest.raises(ConnectionError, match="refused"):
            await Bus.connect(wrong, name="t-bad")
        with pytest.raises(ConnectionError):  # no CA: the server's certificate is not trusted
            untrusting = creds.identities["alice"].bus_config(BusConfig(servers=[url], connect_timeout_s=1.0,
                                                                        connect_attempts=1))
            await Bus.connect(untrusting, name="t-notls")
        await client.close()
        await engine.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _check_file(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(nats_server_binary()), "-t", "-c", str(conf)], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.asyncio
async def test_security_init_cluster_carries_requests_across_tls_routes(tmp_path: Path) -> None:
    """`busserve security init --cluster 3 --tls`: three nodes whose routes are authenticated and TLS-verified; a
    request published by a client on node 1 reaches a router on node 3 and its answer comes back into the client's
    inbox — the grants hold across the cluster (the client still cannot read another's inbox on any node)."""
    port, cport = free_port(), free_port()
    ports = [port, port + 1, port + 2]
    out = subprocess.run([sys.executable, "-m", "busserve.cli", "security", "init", str(tmp_path), "--tls",
                          "--cluster", "3", "--port", str(port), "--cluster-port", str(cport),
                          "--router", "r0", "--client", "alice", "--client", "bob"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    creds = Credentials.load(tmp_path / "credentials.json")
    procs = [subprocess.Popen([str(nats_server_binary()), "-c", str(tmp_path / f"node-{i}.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (1, 2, 3)]
    buses: list[Bus] = []
    try:
        def at(i: int, who: str) -> BusConfig:
            return creds.identities[who].bus_config(BusConfig(servers=[f"tls://127.0.0.1:{ports[i]}"],
                                                              tls_ca=str(tmp_path / "ca.pem"), connect_attempts=1,
                                                              max_reconnect_attempts=0))

        deadline = time.monotonic() + 20
        while True:
            try:
                router = await Bus.connect(at(2, "r0"), name="t-router")
                alice = await Bus.connect(at(0, "alice"), name="t-alice")
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "the cluster did not come up"
                await asyncio.sleep(0.2)
        buses += [router, alice]

        async def answer(msg: Any) -> None:
            await router.nc.publish(msg.reply, b"routed:" + msg.subject.encode())

        await router.nc.subscribe(router.subjects.generate_any_owner(), cb=answer)
        await router.nc.flush()
        got = None
        for _ in range(100):  # until the routes carry the router's interest to node 1
            with contextlib.suppress(Exception):
                got = await alice.nc.request(alice.subjects.generate("alice"), b"{}", timeout=0.3)
                break
        assert got is not None and got.data == b"routed:busserve.v1.generate.alice"
        assert got.subject.startswith("_INBOX.alice.")
        # The live configuration: three replicas on a cluster, readable and writable with a node gone.
        operator = await Bus.connect(at(1, "operator"), name="t-operator")
        buses.append(operator)
        store = await ConfigStore.open(operator)
        info = await operator.nc.jetstream().stream_info(f"KV_{operator.subjects.config_bucket()}")
        assert info.config.num_replicas == 3
        await store.put_strategy(StrategyState(name="pd", params={}, updated_by="t"))
        await store.close()
        bob = await Bus.connect(at(1, "bob"), name="t-bob")
        buses.append(bob)
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        bob.nc._error_cb = on_error  # type: ignore[attr-defined]
        await bob.nc.subscribe("_INBOX.alice.>")
        await bob.nc.flush()
        await asyncio.sleep(0.3)
        assert any("permissions violation" in e for e in errors), errors
        procs[2].terminate()  # node 3 goes; the router's and alice's clients lose their server, the store stays
        procs[2].wait(timeout=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                store = await ConfigStore.open(operator)
                await store.put_strategy(StrategyState(name="least_loaded", params={}, updated_by="t"))
                stored = await store.get_strategy()
                break
            except Exception:  # new JetStream and stream leaders are elected within seconds
                assert time.monotonic() < deadline, "the config bucket did not survive one node"
                await asyncio.sleep(0.3)
        assert stored is not None and stored.name == "least_loaded"
        await store.close()
    finally:
        for b in buses:
            await b.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


@pytest.mark.parametrize("method", ["password", "nkey", "jwt",
                                    pytest.param("mtls", marks=pytest.mark.skipif(shutil.which("openssl") is None,
                                                                                  reason="needs openssl"))])
def test_security_init_writes_every_auth_method_with_tenants(tmp_path: Path, method: str) -> None:
    """`busserve security init --auth METHOD` with two tenants: a config nats-server accepts, every identity with
    the key files of its method (secrets 0600), and no secret of a key-based identity in the server's config."""
    out = subprocess.run([sys.executable, "-m", "busserve.cli", "security", "init", str(tmp_path), "--auth", method,
                          "--client", "alice@acme", "--client", "bob@globex"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert _check_file(tmp_path / "nats-server.conf").returncode == 0
    config = (tmp_path / "nats-server.conf").read_text()
    creds = Credentials.load(tmp_path / "credentials.json")
    assert {i.tenant for i in creds.identities.values() if i.role == "client"} == {"acme", "globex"}
    for ident in creds.identities.values():
        assert ident.method == method, ident
        secret = {"nkey": ident.seed_file, "jwt": ident.creds_file, "mtls": ident.key_file}.get(method)
        if secret is not None:
            assert Path(secret).stat().st_mode & 0o077 == 0, secret
            lines = Path(secret).read_text().splitlines()
            if method == "mtls":
                # A PEM body is base64: any of its lines may start with "SU", so look for the key itself instead.
                assert lines[0].startswith("-----BEGIN") and not any(line in config for line in lines[1:-1])
            else:
                seeds = [line for line in lines if re.fullmatch(r"SU[A-Z2-7]{56}", line)]
                assert len(seeds) == 1 and seeds[0] not in config
    if method == "jwt":
        assert "resolver_preload" in config and "users" not in config
    else:
        assert '"acme" {' in config and '"globex" {' in config

"""The grants of every role, against a real nats-server started from the config the roles matrix generates: each
forbidden publish or subscribe is refused with a permissions violation, each one the role needs goes through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import EmbeddedNats
from busserve.bus.subjects import Subjects
from busserve.security.roles import ROLES, matrix_markdown, permissions
from busserve.security.server_config import Credentials, Identity, auth_config

S = Subjects()
ROOT = S.root
BUCKET = S.config_bucket()
DOCS = Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md"

# (identity, "pub" | "sub", subject): refused.
FORBIDDEN = [
    # a client reads only its own inbox, cancels and asks only under its own name, sees no cluster state
    ("alice", "sub", "_INBOX.>"),
    ("alice", "sub", "_INBOX.bob.x"),
    ("alice", "sub", "_INBOX.*.x"),
    ("alice", "sub", f"{ROOT}.engines.status"),
    ("alice", "sub", f"{ROOT}.engines.*.kv"),
    ("alice", "sub", f"{ROOT}.engines.e0.kv"),
    ("alice", "sub", f"{ROOT}.generate.*"),
    ("alice", "sub", f"{ROOT}.cancel"),
    ("alice", "pub", f"{ROOT}.cancel"),
    ("alice", "pub", f"{ROOT}.cancel.bob"),
    ("alice", "pub", f"{ROOT}.generate"),
    ("alice", "pub", f"{ROOT}.generate.bob"),
    ("alice", "pub", "_INBOX.bob.x"),
    ("alice", "pub", f"{ROOT}.engine.e0.generate"),
    ("alice", "pub", f"{ROOT}.control.strategy"),
    ("alice", "pub", f"$KV.{BUCKET}.strategy"),
    # an engine serves; it does not steer
    ("e0", "pub", f"{ROOT}.control.strategy"),
    ("e0", "pub", f"$KV.{BUCKET}.strategy"),
    ("e0", "pub", f"$KV.{BUCKET}.roles.e0"),
    ("e0", "pub", f"{ROOT}.engine.e1.abort"),
    ("e0", "pub", f"{ROOT}.engine.e1.prep_recv"),
    ("e0", "pub", f"{ROOT}.engine.e1.probe"),
    ("router-0", "sub", f"{ROOT}.router.r9.ping"),
    ("e0", "pub", f"{ROOT}.cancel"),
    ("e0", "pub", f"{ROOT}.engines.e1.kv"),
    ("e0", "sub", f"{ROOT}.engine.e1.remote_send"),
    ("e0", "sub", f"{ROOT}.kv.e1"),
    ("e0", "sub", f"{ROOT}.generate.*"),
    ("e0", "sub", "_INBOX.alice.x"),
    # a strategy process composes the three actions; it may not abort, migrate, drain or switch
    ("strategy", "pub", f"{ROOT}.engine.e0.abort"),
    ("strategy", "pub", f"{ROOT}.engine.e0.migrate"),
    ("strategy", "pub", f"{ROOT}.engine.e0.drain"),
    ("strategy", "pub", f"{ROOT}.engine.e0.set_roles"),
    ("strategy", "pub", f"{ROOT}.control.strategy"),
    ("strategy", "pub", "_INBOX.alice.x"),
    ("strategy", "sub", f"{ROOT}.generate.*"),
    # a router routes; roles are the operator's
    ("router-0", "pub", f"$KV.{BUCKET}.roles.e0"),
    ("router-0", "pub", f"{ROOT}.engine.e0.set_roles"),
    ("router-0", "pub", f"{ROOT}.engine.e0.drain"),
    ("router-0", "pub", f"{ROOT}.engines.status"),
    # the operator steers; it does not serve or read streams
    ("operator", "sub", "_INBOX.alice.x"),
    ("operator", "pub", "_INBOX.alice.x"),
    ("operator", "pub", f"{ROOT}.engine.e0.abort"),
    ("operator", "pub", f"{ROOT}.engine.e0.remote_send"),
    ("operator", "sub", f"{ROOT}.engines.*.kv"),
    # NATS services discovery lists the cluster's processes: an operator's question, not a client's
    ("alice", "pub", "$SRV.PING"),
    ("alice", "pub", "$SRV.STATS.busserve-engine"),
    ("alice", "sub", "$SRV.INFO"),
    ("e0", "pub", "$SRV.PING"),
]

# (identity, "pub" | "sub", subject): what the role's job needs.
ALLOWED = [
    ("alice", "pub", f"{ROOT}.generate.alice"),
    ("alice", "pub", f"{ROOT}.cancel.alice"),
    ("alice", "sub", "_INBOX.alice.>"),
    ("alice", "sub", f"{ROOT}.routers.status"),
    ("e0", "sub", f"{ROOT}.engine.e0.*"),
    ("e0", "pub", f"{ROOT}.engine.e0.probe"),
    ("router-0", "pub", f"{ROOT}.router.r9.ping"),
    ("router-0", "sub", f"{ROOT}.router.router-0.ping"),
    ("e0", "sub", f"{ROOT}.kv.e0"),
    ("e0", "sub", f"{ROOT}.cancel"),
    ("e0", "pub", f"{ROOT}.kv.e1"),
    ("e0", "pub", f"{ROOT}.engines.status"),
    ("e0", "pub", f"{ROOT}.engines.e0.kv"),
    ("e0", "pub", "_INBOX.alice.stream"),
    ("router-0", "sub", f"{ROOT}.generate.*"),
    ("router-0", "sub", f"{ROOT}.cancel.*"),
    ("router-0", "pub", f"{ROOT}.cancel"),
    ("router-0", "pub", f"{ROOT}.engine.e0.prep_recv"),
    ("router-0", "pub", f"{ROOT}.engine.e0.abort"),
    ("router-0", "pub", f"{ROOT}.engine.e0.migrate"),
    ("router-0", "pub", f"{ROOT}.strategy.pd"),
    ("router-0", "pub", f"$KV.{BUCKET}.strategy"),
    ("router-0", "pub", "_INBOX.alice.stream"),
    ("router-0", "sub", "_INBOX.alice.stream"),
    ("strategy", "sub", f"{ROOT}.strategy.pd"),
    ("strategy", "pub", f"{ROOT}.engine.e0.remote_send"),
    ("strategy", "pub", f"{ROOT}.engine.e0.start_generate"),
    ("operator", "pub", f"{ROOT}.control.strategy"),
    ("operator", "pub", f"{ROOT}.engine.e0.drain"),
    ("operator", "pub", f"$KV.{BUCKET}.roles.e0"),
    ("operator", "sub", f"{ROOT}.engines.status"),
    ("operator", "pub", "$SRV.PING"),
    ("operator", "pub", "$SRV.STATS.busserve-engine.e0"),
    ("e0", "sub", "$SRV.PING.busserve-engine.e0"),
    ("router-0", "sub", "$SRV.INFO.busserve-router"),
    ("strategy", "sub", "$SRV.STATS"),
]


class Probe:
    """One connection as one identity, recording the server's permission errors."""

    def __init__(self, nc: nats.NATS, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors

    async def refused(self, op: str, subject: str) -> bool:
        self.errors.clear()
        if op == "pub":
            await self.nc.publish(subject, b"{}")
        else:
            sub = await self.nc.subscribe(subject)
        await self.nc.flush()
        for _ in range(40):  # the -ERR follows the flush's PONG closely, but asynchronously
            if self.errors:
                break
            await asyncio.sleep(0.005)
        if op == "sub":
            await sub.unsubscribe()
        return any("permissions violation" in e.lower() and subject.lower() in e.lower() for e in self.errors)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def probes() -> AsyncIterator[dict[str, Probe]]:
    creds = Credentials.for_stack(["e0", "e1"], ["router-0"], clients=("alice", "bob"))
    server = EmbeddedNats(extra_config=auth_config(list(creds.identities.values()), S)).start()
    out: dict[str, Probe] = {}
    try:
        for ident in creds.identities.values():
            errors: list[str] = []

            async def on_error(exc: Exception, errors: list[str] = errors) -> None:
                errors.append(str(exc))

            nc = await nats.connect(server.url, user=ident.name, password=ident.password, error_cb=on_error,
                                    inbox_prefix=S.inbox_prefix(ident.name), max_reconnect_attempts=0)
            out[ident.name] = Probe(nc, errors)
        yield out
    finally:
        for p in out.values():
            await p.nc.close()
        server.stop()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("who", "op", "subject"), FORBIDDEN, ids=[f"{w}-{o}-{s}" for w, o, s in FORBIDDEN])
async def test_forbidden_is_refused(probes: dict[str, Probe], who: str, op: str, subject: str) -> None:
    assert await probes[who].refused(op, subject), f"{who} may {op} {subject}"


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("who", "op", "subject"), ALLOWED, ids=[f"{w}-{o}-{s}" for w, o, s in ALLOWED])
async def test_needed_is_allowed(probes: dict[str, Probe], who: str, op: str, subject: str) -> None:
    assert not await probes[who].refused(op, subject), f"{who} may not {op} {subject}: {probes[who].errors}"


@pytest.mark.asyncio
async def test_wrong_password_and_unknown_user_are_refused() -> None:
    ident = Identity.new("alice", "client")
    server = EmbeddedNats(extra_config=auth_config([ident], S)).start()
    try:
        for user, password in (("alice", "not-it"), ("mallory", ident.password), (None, None)):
            cfg = BusConfig(servers=[server.url], user=user, password=password, connect_attempts=1,
                            connect_timeout_s=2)
            with pytest.raises(ConnectionError, match=r"(?i)authorization"):
                await Bus.connect(cfg, name="intruder")
    finally:
        server.stop()


def test_every_role_has_grants_and_names_are_checked() -> None:
    for role in ROLES:
        perms = permissions(role, "x1", S)
        assert perms.subscribe == sorted(set(perms.subscribe), key=perms.subscribe.index)
        assert "_INBOX.x1.>" in perms.subscribe
    with pytest.raises(ValueError, match="identity"):
        permissions("client", "a.b", S)  # a dot would let a name reach into another's subjects
    with pytest.raises(ValueError, match="role"):
        permissions("admin", "x", S)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        auth_config([Identity.new("a", "client"), Identity.new("a", "engine")], S)


def test_the_documented_matrix_is_the_one_in_the_code() -> None:
    assert matrix_markdown(S) in DOCS.read_text(), "docs/SECURITY.md: paste `busserve security matrix`"


def test_tenants_are_checked() -> None:
    with pytest.raises(ValueError, match="only clients"):
        Identity.new("r9", "router", tenant="acme")
    for bad in ("BUSSERVE", "$SYS", "a.b", ""):
        with pytest.raises(ValueError, match="tenant"):
            Identity.new("alice", "client", tenant=bad or "x y")
    with pytest.raises(ValueError, match="no tenant"):  # once any client has a tenant, all need one
        auth_config([Identity.new("alice", "client", "acme"), Identity.new("bob", "client")], S)

"""Identities and the nats-server configuration they need, generated from the roles matrix.

An :class:`Identity` is a user of the bus: a name (a subject token; also its inbox prefix ``_INBOX.<name>``), a
role, a password and, for a client, optionally a tenant. :func:`auth_config` writes the server's users with exactly
the permissions :func:`busserve.security.roles.permissions` gives them:

* without tenants, one ``authorization`` block — every identity in one account, clients kept apart by their names;
* with tenants, ``accounts``: the services (routers, engines, strategy processes, operators) in ``BUSSERVE``, each
  tenant's clients in an account of its own that imports exactly its clients' ``generate.<name>`` /
  ``cancel.<name>`` services and the routers' heartbeats. Nothing else crosses: a tenant's account has no subject
  on which another tenant's requests, streams, KV events or engine status could arrive, whatever its users may
  subscribe. Streams go back through the server's reply mapping of the import (``_R_.…`` in ``BUSSERVE``,
  ``response_type: stream``), which delivers into the requester's account only.

:class:`Credentials` is the file (mode 0600) a deployment keeps the identities in, and what ``busserve up`` hands
its children through their environment — never a command line.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from busserve.bus.config import BusConfig
from busserve.bus.subjects import Subjects
from busserve.security.roles import ROLES, Role, permissions

SERVICE_ACCOUNT = "BUSSERVE"
# How long the server keeps the reply mapping of a tenant's request for its stream (nats-server's
# ``response_threshold``): past it the tokens of a longer generation no longer reach the tenant.
RESPONSE_THRESHOLD = "15m"
_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role
    password: str = ""
    # The account of a client in a multi-tenant deployment (None: the one account of a single-tenant one).
    tenant: str | None = None
    # How it proves who it is where not by password (``security init --auth``): an nkey (the public key the server
    # knows, the seed file it signs the server's nonce with), a .creds file (user JWT + seed: operator mode), or a
    # client certificate whose subject ``CN=<name>`` the server maps to the user (mTLS, ``verify_and_map``).
    nkey: str | None = None
    seed_file: str | None = None
    creds_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def method(self) -> str:
        """password, nkey, jwt or mtls."""
        if self.creds_file:
            return "jwt"
        if self.seed_file:
            return "nkey"
        if self.cert_file:
            return "mtls"
        return "password"

    @classmethod
    def new(cls, name: str, role: Role, tenant: str | None = None) -> Identity:
        if tenant is not None:
            if role != "client":
                raise ValueError(f"{name}: only clients belong to a tenant (services live in {SERVICE_ACCOUNT})")
            if not _ACCOUNT_NAME.match(tenant) or tenant.upper() in (SERVICE_ACCOUNT, "$SYS", "$G", "SYS"):
                raise ValueError(f"tenant {tenant!r}: letters, digits, '-' and '_' only, and not {SERVICE_ACCOUNT}")
        return cls(name=name, role=role, password=secrets.token_urlsafe(24), tenant=tenant)

    def env(self) -> dict[str, str]:
        """The variables a busserve process reads its credentials from (``BusConfig.from_env``): a password, or
        the paths of its key files — never the secret itself on a command line."""
        if self.method == "password":
            return {"BUSSERVE_NATS_USER": self.name, "BUSSERVE_NATS_PASSWORD": self.password}
        files = {"jwt": {"BUSSERVE_NATS_CREDS": self.creds_file}, "nkey": {"BUSSERVE_NATS_NKEY": self.seed_file},
                 "mtls": {"BUSSERVE_NATS_TLS_CERT": self.cert_file, "BUSSERVE_NATS_TLS_KEY": self.key_file}}
        return {"BUSSERVE_NATS_IDENTITY": self.name, **{k: str(v) for k, v in files[self.method].items()}}

    def bus_config(self, base: BusConfig) -> BusConfig:
        if self.method == "password":
            return replace(base, user=self.name, password=self.password, identity=None)
        return replace(base, user=None, password=None, identity=self.name, creds_file=self.creds_file,
                       nkeys_seed_file=self.seed_file, tls_cert=self.cert_file or base.tls_cert,
                       tls_key=self.key_file or base.tls_key)


def _quote(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid nats-server config string


def _list(values: list[str]) -> str:
    return "[" + ", ".join(_quote(v) for v in values) + "]"


def _user(ident: Identity, subjects: Subjects, indent: str) -> str:
    perms = permissions(ident.role, ident.name, subjects)
    body = [f"publish: {{ allow: {_list(perms.publish)} }}" if perms.publish else "publish: { deny: [\">\"] }",
            f"subscribe: {{ allow: {_list(perms.subscribe)} }}"]
    if perms.allow_responses:
        body.append("allow_responses: true")
    if ident.method == "nkey":
        who = f"nkey: {_quote(str(ident.nkey))}"
    elif ident.method == "mtls":
        who = f"user: {_quote('CN=' + ident.name)}"  # verify_and_map: the certificate's subject names the user
    elif ident.method == "password":
        who = f"user: {_quote(ident.name)}, password: {_quote(ident.password)}"
    else:
        raise ValueError(f"{ident.name}: a JWT identity is known to the server by its account, not a user list")
    return f"{indent}{{ {who},\n{indent}  permissions: {{ {', '.join(body)} }} }}"


def auth_config(identities: list[Identity], subjects: Subjects, *,
                response_threshold: str = RESPONSE_THRESHOLD) -> str:
    """The users and grants for a nats-server config: an ``authorization`` block, or ``accounts`` when a client
    has a tenant (module docstring)."""
    names = [i.name for i in identities]
    if len(set(names)) != len(names):
        raise ValueError(f"identity names must be unique: {sorted(names)}")
    if not any(i.tenant for i in identities):
        users = [_user(i, subjects, "    ") for i in identities]
        return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"
    return _accounts_config(identities, subjects, response_threshold)


def tenants_of(identities: list[Identity]) -> dict[str, list[Identity]]:
    """The clients of each tenant; every client must have one once any has."""
    tenants: dict[str, list[Identity]] = {}
    for ident in identities:
        if ident.role == "client":
            if not ident.tenant:
                raise ValueError(f"client {ident.name!r} has no tenant; in a multi-tenant deployment every client "
                                 "belongs to one")
            tenants.setdefault(ident.tenant, []).append(ident)
    return tenants


def _accounts_config(identities: list[Identity], subjects: Subjects, response_threshold: str) -> str:
    tenants = tenants_of(identities)
    services = [i for i in identities if i.role != "client"]
    allowed = _list(sorted(tenants))
    exports = [
        f"{{ service: {_quote(subjects.generate_any_owner())}, accounts: {allowed}, response_type: stream, "
        f"response_threshold: {_quote(response_threshold)} }}",
        f"{{ service: {_quote(subjects.cancel_any_owner())}, accounts: {allowed} }}",
        f"{{ service: {_quote(subjects.resend_any_owner())}, accounts: {allowed} }}",
        f"{{ stream: {_quote(subjects.routers_status())}, accounts: {allowed} }}",
    ]
    blocks = [f"  {SERVICE_ACCOUNT} {{\n    jetstream: enabled\n    users = [\n"
              + "\n".join(_user(i, subjects, "      ") for i in services)
              + "\n    ]\n    exports = [\n" + "\n".join(f"      {e}" for e in exports) + "\n    ]\n  }"]
    for tenant, clients in sorted(tenants.items()):
        # share: the router hears who asked (Nats-Request-Info), and refuses a request whose sender is not the
        # name it was sent under.
        imports = [f"{{ service: {{ account: {SERVICE_ACCOUNT}, subject: {_quote(s)} }}, share: true }}"
                   for c in clients
                   for s in (subjects.generate(c.name), subjects.cancel(c.name), subjects.resend(c.name))]
        imports.append(f"{{ stream: {{ account: {SERVICE_ACCOUNT}, subject: {_quote(subjects.routers_status())} }} }}")
        blocks.append(f"  {_quote(tenant)} {{\n    users = [\n"
                      + "\n".join(_user(i, subjects, "      ") for i in clients)
                      + "\n    ]\n    imports = [\n" + "\n".join(f"      {i}" for i in imports) + "\n    ]\n  }")
    return "accounts {\n" + "\n".join(blocks) + "\n}\n"


@dataclass
class Credentials:
    """Every identity of a deployment, by name."""

    identities: dict[str, Identity]

    def of_role(self, role: Role) -> Identity:
        for ident in self.identities.values():
            if ident.role == role:
                return ident
        raise KeyError(f"no {role} identity among {', '.join(sorted(self.identities))}")

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({name: asdict(i) for name, i in self.identities.items()}, f, indent=1)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Credentials:
        raw = json.loads(path.read_text())
        idents = {}
        for name, item in raw.items():
            if item.get("role") not in ROLES:
                raise ValueError(f"{path}: identity {name!r} has unknown role {item.get('role')!r}")
            fields = {k: item.get(k) for k in ("tenant", "nkey", "seed_file", "creds_file", "cert_file", "key_file")}
            idents[name] = Identity(name=item["name"], role=item["role"], password=item.get("password", ""),
                                    **fields)
        return cls(idents)

    @classmethod
    def for_stack(cls, engine_ids: list[str], router_ids: list[str], *, clients: tuple[str, ...] = ("client",),
                  operator: str = "operator", strategy: str = "strategy") -> Credentials:
        """A fresh identity (random password) for every process of a stack, the given clients (``name`` or
        ``name@tenant``), and one operator and strategy process."""
        idents = [Identity.new(e, "engine") for e in engine_ids] + [Identity.new(r, "router") for r in router_ids]
        for client in clients:
            name, _, tenant = client.partition("@")
            idents.append(Identity.new(name, "client", tenant or None))
        idents += [Identity.new(operator, "operator"), Identity.new(strategy, "strategy")]
        return cls({i.name: i for i in idents})


def stack_identity_config(up_state: dict[str, Any], role: Role, base: BusConfig) -> BusConfig:
    """How to connect to the stack a ``busserve up`` state file describes, as its identity of ``role`` (``base``
    unchanged for an open stack)."""
    path = up_state.get("credentials")
    if not path:
        return base
    return Credentials.load(Path(path)).of_role(role).bus_config(base)

"""Identities and the nats-server ``authorization`` block they need, generated from the roles matrix.

An :class:`Identity` is a user of the bus: a name (a subject token; also its inbox prefix ``_INBOX.<name>``), a
role and a password. :func:`authorization_config` writes the server's users with exactly the permissions
:func:`busserve.security.roles.permissions` gives them; :class:`Credentials` is the file (mode 0600) a deployment
keeps them in, and what ``busserve up`` hands its children through their environment — never a command line.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from busserve.bus.config import BusConfig
from busserve.bus.subjects import Subjects
from busserve.security.roles import ROLES, Role, permissions


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role
    password: str

    @classmethod
    def new(cls, name: str, role: Role) -> Identity:
        return cls(name=name, role=role, password=secrets.token_urlsafe(24))

    def env(self) -> dict[str, str]:
        """The variables a busserve process reads its credentials from (``BusConfig.from_env``)."""
        return {"BUSSERVE_NATS_USER": self.name, "BUSSERVE_NATS_PASSWORD": self.password}

    def bus_config(self, base: BusConfig) -> BusConfig:
        return BusConfig(**{**asdict(base), "user": self.name, "password": self.password, "identity": None})


def _quote(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid nats-server config string


def _list(values: list[str]) -> str:
    return "[" + ", ".join(_quote(v) for v in values) + "]"


def authorization_config(identities: list[Identity], subjects: Subjects) -> str:
    """The ``authorization { users = [...] }`` block for a nats-server config."""
    names = [i.name for i in identities]
    if len(set(names)) != len(names):
        raise ValueError(f"identity names must be unique: {sorted(names)}")
    users = []
    for ident in identities:
        perms = permissions(ident.role, ident.name, subjects)
        body = [f"publish: {{ allow: {_list(perms.publish)} }}" if perms.publish else "publish: { deny: [\">\"] }",
                f"subscribe: {{ allow: {_list(perms.subscribe)} }}"]
        if perms.allow_responses:
            body.append("allow_responses: true")
        users.append(f"    {{ user: {_quote(ident.name)}, password: {_quote(ident.password)},\n"
                     f"      permissions: {{ {', '.join(body)} }} }}")
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


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
            idents[name] = Identity(name=item["name"], role=item["role"], password=item["password"])
        return cls(idents)

    @classmethod
    def for_stack(cls, engine_ids: list[str], router_ids: list[str], *, clients: tuple[str, ...] = ("client",),
                  operator: str = "operator", strategy: str = "strategy") -> Credentials:
        """A fresh identity (random password) for every process of a stack, the given clients, and one operator
        and strategy process."""
        idents = [Identity.new(e, "engine") for e in engine_ids] + [Identity.new(r, "router") for r in router_ids]
        idents += [Identity.new(c, "client") for c in clients]
        idents += [Identity.new(operator, "operator"), Identity.new(strategy, "strategy")]
        return cls({i.name: i for i in idents})


def stack_identity_config(up_state: dict[str, Any], role: Role, base: BusConfig) -> BusConfig:
    """How to connect to the stack a ``busserve up`` state file describes, as its identity of ``role`` (``base``
    unchanged for an open stack)."""
    path = up_state.get("credentials")
    if not path:
        return base
    return Credentials.load(Path(path)).of_role(role).bus_config(base)

"""How to reach NATS: server URLs (one, or several for a cluster), credentials and TLS.

Resolution order for the server URLs: an explicit ``--nats`` list, then ``BUSSERVE_NATS_URL`` (comma-separated),
then the state file a running ``busserve up`` writes (so ``busserve generate`` finds the embedded server without
flags), then ``nats://127.0.0.1:4222``. Every other setting is passed through to nats-py unchanged.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_URL = "nats://127.0.0.1:4222"


def state_dir() -> Path:
    """Where ``busserve up`` records what it started (``$BUSSERVE_STATE_DIR``, else the user cache dir)."""
    explicit = os.environ.get("BUSSERVE_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "busserve"


def _up_state_file() -> Path:
    return state_dir() / "up.json"


def write_up_state(info: dict[str, Any]) -> Path:
    path = _up_state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
    return path


def clear_up_state(pid: int) -> None:
    path = _up_state_file()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def read_up_state() -> dict[str, Any] | None:
    """The state of a live ``busserve up`` on this machine, or None."""
    try:
        info = json.loads(_up_state_file().read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if isinstance(info, dict) else None


@dataclass
class BusConfig:
    servers: list[str] = field(default_factory=list)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None  # NATS .creds (JWT + nkey seed)
    nkeys_seed_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_hostname: str | None = None
    subject_prefix: str = "busserve"
    # The identity this connection has on a secured server (busserve/security): the user name by default. Set it
    # where the server knows the connection by something else (an nkey or a creds file).
    identity: str | None = None
    connect_timeout_s: float = 5.0
    # Tries per server before the first connection is given up (bad credentials should not hang a start-up).
    connect_attempts: int = 3
    # Once connected: -1 keeps reconnecting forever (services), 0 never reconnects, N tries N times.
    max_reconnect_attempts: int = -1

    @classmethod
    def from_env(cls, **overrides: Any) -> BusConfig:
        env = os.environ
        cfg = cls(
            servers=_split(env.get("BUSSERVE_NATS_URL", "")),
            user=env.get("BUSSERVE_NATS_USER") or None,
            password=env.get("BUSSERVE_NATS_PASSWORD") or None,
            token=env.get("BUSSERVE_NATS_TOKEN") or None,
            creds_file=env.get("BUSSERVE_NATS_CREDS") or None,
            nkeys_seed_file=env.get("BUSSERVE_NATS_NKEY") or None,
            tls_ca=env.get("BUSSERVE_NATS_TLS_CA") or None,
            tls_cert=env.get("BUSSERVE_NATS_TLS_CERT") or None,
            tls_key=env.get("BUSSERVE_NATS_TLS_KEY") or None,
            subject_prefix=env.get("BUSSERVE_SUBJECT_PREFIX", "busserve"),
            identity=env.get("BUSSERVE_NATS_IDENTITY") or None,
        )
        for key, value in overrides.items():
            if value is not None and value != []:
                setattr(cfg, key, value)
        return cfg

    def owner(self) -> str:
        """The identity requests and inboxes are named by ("" for an anonymous connection to an open server)."""
        return self.identity or self.user or ""

    def resolved_servers(self) -> list[str]:
        if self.servers:
            return list(self.servers)
        state = read_up_state()
        if state and state.get("nats_url"):
            return [str(state["nats_url"])]
        return [DEFAULT_URL]

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``, passed through as given."""
        kwargs: dict[str, Any] = {
            "servers": self.resolved_servers(),
            "connect_timeout": self.connect_timeout_s,
            # nats-py reads 0 as "forever"; the first connection always gets a bounded number of tries.
            "max_reconnect_attempts": max(1, self.connect_attempts - 1),
            "reconnect_time_wait": 0.3,
        }
        if self.user is not None:
            kwargs["user"] = self.user
        if self.password is not None:
            kwargs["password"] = self.password
        if self.token is not None:
            kwargs["token"] = self.token
        if self.creds_file:
            kwargs["user_credentials"] = self.creds_file
        if self.nkeys_seed_file:
            kwargs["nkeys_seed"] = self.nkeys_seed_file
        tls = self.ssl_context()
        if tls is not None:
            kwargs["tls"] = tls
            if self.tls_hostname:
                kwargs["tls_hostname"] = self.tls_hostname
        return kwargs


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]

"""nkeys and NATS JWTs: the keys and signed claims of decentralised auth (nats-server's *operator mode*).

In operator mode the server holds no user list: it trusts an operator key, and every connection presents a user
JWT (signed by its account's key, itself signed by the operator) and proves it holds the user's nkey by signing the
server's nonce. What a user may publish and subscribe is in its JWT, what an account exports and imports in the
account's JWT — the same grants as the ``authorization``/``accounts`` blocks of ``server_config``, only signed.

This module only encodes: ed25519 nkeys (through the ``nkeys`` package nats-py itself uses), the JWT format of
nats-io/jwt v2 (``{"typ": "JWT", "alg": "ed25519-nkey"}``, base64url without padding, the signature over
``header.claims``), and the ``.creds`` file nats-py reads. ``server_config.operator_config`` decides what the
claims say.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_PREFIXES = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT,
             "user": nkeys.PREFIX_BYTE_USER}


@dataclass(frozen=True)
class NKey:
    """An ed25519 key pair in nkey form: ``seed`` (``SO…``/``SA…``/``SU…``, secret) and ``public`` (``O…``/``A…``/
    ``U…``)."""

    seed: str
    public: str

    @classmethod
    def new(cls, kind: str) -> NKey:
        seed = nkeys.encode_seed(os.urandom(32), _PREFIXES[kind])
        pair = nkeys.from_seed(bytearray(seed))
        return cls(seed=seed.decode(), public=pair.public_key.decode())

    @classmethod
    def from_seed(cls, seed: str) -> NKey:
        pair = nkeys.from_seed(bytearray(seed.encode()))
        return cls(seed=seed, public=pair.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        pair = nkeys.from_seed(bytearray(self.seed.encode()))
        try:
            return bytes(pair.sign(data))
        finally:
            pair.wipe()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: NKey, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A v2 NATS JWT for ``subject`` (a public nkey) signed by ``issuer``; ``nats`` the type-specific claims."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject,
                              "nats": {**nats, "version": 2}}
    # jti: the claims' own hash, as nats-io/jwt computes it (base32 of sha256, no padding).
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
                                     ).decode().rstrip("=")
    head = _b64(json.dumps(_HEADER).encode())
    body = _b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(signature)}"


def decode_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT (unverified: for reading what a file says)."""
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))  # type: ignore[no-any-return]


def write_private(path: Path, text: str) -> Path:
    """``text`` into ``path`` with mode 0600 (it holds a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def write_creds(path: Path, user_jwt: str, user: NKey) -> Path:
    """A ``.creds`` file (the user's JWT and its nkey seed) in the format nats-py and the nats CLI read."""
    return write_private(path, (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"))

"""Give a deployment's identities the credentials of one auth method, and the server's auth section to match.

    password   a random password each (``authorization``/``accounts`` users)        the default
    nkey       an nkey each: the server knows the public key, the process signs    ``keys/<name>.nk``
               the server's nonce with the seed file
    mtls       a client certificate each (``CN=<name>``, signed by the dev CA); the  ``clients/<name>.pem``
               server maps the certificate to the user (``verify_and_map``)
    jwt        operator mode: operator, accounts and users as signed JWTs, a         ``creds/<name>.creds``
               ``.creds`` file each (``operator_mode``)

Whatever the method, the grants are the roles matrix's and tenants get accounts of their own.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from busserve.bus.subjects import Subjects
from busserve.security.dev_tls import write_client_cert
from busserve.security.nats_jwt import NKey, write_private
from busserve.security.operator_mode import operator_config
from busserve.security.server_config import Credentials, auth_config

METHODS = ("password", "nkey", "mtls", "jwt")


def issue(creds: Credentials, method: str, subjects: Subjects, out: Path) -> tuple[Credentials, str]:
    """``creds`` with the key files of ``method`` written under ``out``, and the server config's auth section.
    ``mtls`` needs the CA of ``dev_tls.write_dev_tls`` in ``out``."""
    if method not in METHODS:
        raise ValueError(f"unknown auth method {method!r} (methods: {', '.join(METHODS)})")
    if method == "jwt":
        return operator_config(creds, subjects, out)
    issued = dict(creds.identities)
    if method == "nkey":
        (out / "keys").mkdir(parents=True, exist_ok=True)
        for name, ident in issued.items():
            key = NKey.new("user")
            seed = write_private(out / "keys" / f"{name}.nk", key.seed + "\n")
            issued[name] = replace(ident, password="", nkey=key.public, seed_file=str(seed.resolve()))
    elif method == "mtls":
        for name, ident in issued.items():
            cert, key_file = write_client_cert(out, name)
            issued[name] = replace(ident, password="", cert_file=str(cert), key_file=str(key_file))
    result = Credentials(issued)
    return result, auth_config(list(result.identities.values()), subjects)

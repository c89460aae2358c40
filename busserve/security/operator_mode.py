"""Decentralised auth: an operator, its accounts and users as signed JWTs, and the server config that trusts them.

The same grants as ``server_config.auth_config`` — each user's publish/subscribe lists from the roles matrix, the
services in account ``BUSSERVE``, each tenant's clients in an account that imports exactly its clients'
``generate.<name>``/``cancel.<name>`` and the routers' heartbeats — expressed as nats-io/jwt v2 claims: the
operator signs the accounts, each account signs its users, and each identity gets a ``.creds`` file (its JWT and
nkey seed, mode 0600). The server holds only the operator's JWT and the account JWTs (``resolver: MEMORY``,
preloaded); no secret of any user. Without tenants, the clients live in ``BUSSERVE`` beside the services, kept apart
by their names (as with passwords).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from busserve.bus.subjects import Subjects
from busserve.security.nats_jwt import NKey, encode_jwt, write_creds, write_private
from busserve.security.roles import permissions
from busserve.security.server_config import SERVICE_ACCOUNT, Credentials, Identity, tenants_of

RESPONSE_THRESHOLD_NS = 15 * 60 * 10**9  # as server_config.RESPONSE_THRESHOLD
_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
              "leaf": -1}
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _user_claims(ident: Identity, subjects: Subjects) -> dict[str, Any]:
    perms = permissions(ident.role, ident.name, subjects)
    claims: dict[str, Any] = {"type": "user", "pub": {"allow": perms.publish} if perms.publish else {"deny": [">"]},
                              "sub": {"allow": perms.subscribe}, "subs": -1, "data": -1, "payload": -1}
    if perms.allow_responses:
        claims["resp"] = {"max": 1, "ttl": 0}  # the server's defaults for allow_responses: one reply, 2 minutes
    return claims


def operator_config(creds: Credentials, subjects: Subjects, out: Path) -> tuple[Credentials, str]:
    """Keys, JWTs and a ``.creds`` file per identity under ``out`` (``operator.jwt``, ``creds/<name>.creds``);
    returns the identities (now pointing at their creds files) and the server config lines of operator mode."""
    idents = list(creds.identities.values())
    tenants = tenants_of(idents) if any(i.tenant for i in idents) else {}
    operator = NKey.new("operator")
    accounts = {name: NKey.new("account") for name in ("SYS", SERVICE_ACCOUNT, *sorted(tenants))}
    service = accounts[SERVICE_ACCOUNT].public

    exports = [
        {"name": "generate", "subject": subjects.generate_any_owner(), "type": "service",
         "response_type": "Stream", "response_threshold": RESPONSE_THRESHOLD_NS},
        {"name": "cancel", "subject": subjects.cancel_any_owner(), "type": "service"},
        {"name": "resend", "subject": subjects.resend_any_owner(), "type": "service"},
        {"name": "routers-status", "subject": subjects.routers_status(), "type": "stream"},
    ]
    account_claims: dict[str, dict[str, Any]] = {
        "SYS": {"type": "account", "limits": _UNLIMITED},
        SERVICE_ACCOUNT: {"type": "account", "limits": {**_UNLIMITED, **_JETSTREAM},
                          **({"exports": exports} if tenants else {})},
    }
    for tenant, clients in tenants.items():
        imports = [{"name": subject, "subject": subject, "account": service, "type": "service", "share": True}
                   for c in clients
                   for subject in (subjects.generate(c.name), subjects.cancel(c.name), subjects.resend(c.name))]
        imports.append({"name": "routers-status", "subject": subjects.routers_status(), "account": service,
                        "type": "stream"})
        account_claims[tenant] = {"type": "account", "limits": _UNLIMITED, "imports": imports}
    account_jwts = {name: encode_jwt(operator, accounts[name].public, name, claims)
                    for name, claims in account_claims.items()}

    (out / "creds").mkdir(parents=True, exist_ok=True)
    issued: dict[str, Identity] = {}
    for ident in idents:
        account = accounts[ident.tenant if tenants and ident.role == "client" and ident.tenant else SERVICE_ACCOUNT]
        user = NKey.new("user")
        token = encode_jwt(account, user.public, ident.name, _user_claims(ident, subjects))
        path = write_creds(out / "creds" / f"{ident.name}.creds", token, user)
        issued[ident.name] = replace(ident, password="", nkey=user.public, creds_file=str(path.resolve()))

    # The services account's key stays with the deployment (0600, like every secret here): with it, identities for
    # processes that join later are signed without touching the servers' config (``add_service_identities``).
    (out / "accounts").mkdir(parents=True, exist_ok=True)
    write_private(out / "accounts" / f"{SERVICE_ACCOUNT}.nk", accounts[SERVICE_ACCOUNT].seed + "\n")
    operator_jwt = encode_jwt(operator, operator.public, "busserve",
                              {"type": "operator", "system_account": accounts["SYS"].public})
    jwt_path = write_private(out / "operator.jwt", operator_jwt + "\n")
    preload = "\n".join(f'  {accounts[name].public}: "{token}"' for name, token in account_jwts.items())
    lines = (f'operator: "{jwt_path.resolve()}"\n'
             f'system_account: "{accounts["SYS"].public}"\n'
             "resolver: MEMORY\n"
             f"resolver_preload: {{\n{preload}\n}}\n")
    return Credentials(issued), lines


def add_service_identities(out: Path, idents: list[Identity], subjects: Subjects) -> Credentials:
    """Sign ``idents`` (engines, routers, strategy processes) as users of the services account of the deployment
    in ``out``, each with a ``.creds`` file there: the servers accept them at once, as they trust the account and
    not a list of users. Needs the account key ``operator_config`` left in ``out/accounts``."""
    key_file = out / "accounts" / f"{SERVICE_ACCOUNT}.nk"
    if not key_file.exists():
        raise FileNotFoundError(f"{key_file} is missing: identities can be added only to a deployment made by "
                                "`busserve security init --auth jwt`")
    account = NKey.from_seed(key_file.read_text().strip())
    issued: dict[str, Identity] = {}
    for ident in idents:
        if ident.role == "client":
            raise ValueError(f"{ident.name}: clients belong to a tenant's account; add them with security init")
        user = NKey.new("user")
        token = encode_jwt(account, user.public, ident.name, _user_claims(ident, subjects))
        path = write_creds(out / "creds" / f"{ident.name}.creds", token, user)
        issued[ident.name] = replace(ident, password="", nkey=user.public, creds_file=str(path.resolve()))
    return Credentials(issued)

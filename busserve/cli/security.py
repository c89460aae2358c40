"""``busserve security``: the roles × subjects matrix, and the files of a secured deployment.

    busserve security matrix                  the matrix as Markdown (what docs/SECURITY.md shows)
    busserve security init DIR --engine e0 --engine e1 --router r0 --client alice
                                              credentials.json (0600) with a random password per identity,
                                              nats-server.conf with their grants; --client alice@A --client
                                              bob@B gives each tenant an account of its own; --tls adds a CA, a server
                                              certificate and TLS on the client port (dev-grade: openssl, 1 year);
                                              --cluster 3 writes node-1..3.conf, routes authenticated and, with
                                              --tls, TLS-verified both ways
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("security", help="roles × subjects matrix; credentials and server config for a deployment")
    s = p.add_subparsers(dest="security_command", required=True)
    m = s.add_parser("matrix", help="print the roles × subjects matrix (Markdown)")
    m.add_argument("--subject-prefix", default="busserve")
    i = s.add_parser("init", help="write credentials.json and nats-server.conf (and TLS files) into DIR")
    i.add_argument("dir")
    i.add_argument("--engine", action="append", default=[], metavar="ID", help="an engine identity (repeat)")
    i.add_argument("--router", action="append", default=[], metavar="ID", help="a router identity (repeat)")
    i.add_argument("--client", action="append", default=[], metavar="NAME[@TENANT]",
                   help="a client identity (repeat); NAME@TENANT puts it in the account of TENANT: once any client "
                        "has a tenant, every client needs one, and tenants share nothing but the services")
    i.add_argument("--port", type=int, default=4222)
    i.add_argument("--host", default="127.0.0.1", help="address the server listens on (default 127.0.0.1)")
    i.add_argument("--auth", choices=("password", "nkey", "mtls", "jwt"), default="password",
                   help="how identities prove who they are: a random password each (default); an nkey seed file "
                        "each; a client certificate each, mapped to its user by the server (implies --tls); or "
                        "operator mode, a .creds file (user JWT + nkey) each and no user list on the server")
    i.add_argument("--tls", action="store_true", help="also a CA and a server certificate (needs openssl)")
    i.add_argument("--tls-host", action="append", default=[], metavar="NAME",
                   help="a name or IP the server certificate is for (default localhost and 127.0.0.1)")
    i.add_argument("--cluster", type=int, default=1, metavar="N",
                   help="N nodes of one NATS cluster: node-<i>.conf each, routes between them authenticated (and "
                        "TLS-verified with --tls); client port --port + i, route port --cluster-port + i")
    i.add_argument("--cluster-port", type=int, default=6222)
    i.add_argument("--node-host", action="append", default=[], metavar="HOST",
                   help="where node i is reached by its peers, in order (default --host for all)")
    i.add_argument("--subject-prefix", default="busserve")
    a = s.add_parser("add", help="identities for processes joining a deployment made with --auth jwt (no server "
                                 "change): writes their creds and FILE, to copy to the joining host")
    a.add_argument("dir", help="the deployment's folder (from security init --auth jwt)")
    a.add_argument("--engine", action="append", default=[], metavar="ID", help="an engine identity (repeat)")
    a.add_argument("--router", action="append", default=[], metavar="ID", help="a router identity (repeat)")
    a.add_argument("--out", required=True, metavar="FILE",
                   help="the new identities alone, for `busserve up --join URL --identities FILE`")
    a.add_argument("--subject-prefix", default="busserve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve.bus.subjects import Subjects
    from busserve.security.roles import matrix_markdown

    subjects = Subjects(args.subject_prefix)
    if args.security_command == "matrix":
        print(matrix_markdown(subjects), end="")
        return 0
    if args.security_command == "add":
        return _add(args, subjects)
    return _init(args, subjects)


def _add(args: argparse.Namespace, subjects: Any) -> int:
    from busserve.security.operator_mode import add_service_identities
    from busserve.security.server_config import Credentials, Identity

    out = Path(args.dir)
    everyone = Credentials.load(out / "credentials.json")
    wanted = [Identity.new(e, "engine") for e in args.engine] + [Identity.new(r, "router") for r in args.router]
    if not wanted:
        print("busserve security add: name at least one --engine or --router", file=sys.stderr)
        return 2
    taken = sorted(i.name for i in wanted if i.name in everyone.identities)
    if taken:
        print(f"busserve security add: {', '.join(taken)} already exist in {out}", file=sys.stderr)
        return 2
    try:
        added = add_service_identities(out, wanted, subjects)
    except (FileNotFoundError, ValueError) as exc:
        print(f"busserve security add: {exc}", file=sys.stderr)
        return 2
    Credentials({**everyone.identities, **added.identities}).save(out / "credentials.json")
    added.save(Path(args.out))
    print(f"signed {', '.join(f'{i.name} ({i.role})' for i in added.identities.values())}; their identities are in "
          f"{args.out} (secrets: the creds files it names, 0600)")
    return 0


def _init(args: argparse.Namespace, subjects: Any) -> int:
    import secrets

    from busserve.security.dev_tls import write_dev_tls
    from busserve.security.issue import issue
    from busserve.security.server_config import Credentials

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    creds = Credentials.for_stack(args.engine or ["e0"], args.router or ["router-0"],
                                  clients=tuple(args.client or ["client"]))
    tls = args.tls or args.auth == "mtls"
    if tls:
        hosts = args.tls_host or sorted({"localhost", "127.0.0.1", *args.node_host})
        write_dev_tls(out, hosts)
    creds, authorization = issue(creds, args.auth, subjects, out)
    creds.save(out / "credentials.json")
    n = max(1, args.cluster)
    node_hosts = args.node_host or [args.host] * n
    if len(node_hosts) != n:
        raise SystemExit(f"--node-host given {len(node_hosts)} times for {n} nodes")
    route_password = secrets.token_urlsafe(24)
    written = []
    for i in range(n):
        lines = [f'listen: "{args.host}:{args.port + i}"', "max_payload: 8MB", "max_pending: 256MB",
                 f'jetstream {{ store_dir: "{(out / f"jetstream-{i + 1}" if n > 1 else out / "jetstream").resolve()}" }}']
        if tls:
            verify = ", verify_and_map: true" if args.auth == "mtls" else ""
            lines.append(f"tls {{ {_tls_files(out)}{verify} }}")
        if n > 1:
            routes = ", ".join(f'"nats-route://busserve-route:{route_password}@{node_hosts[j]}:{args.cluster_port + j}"'
                               for j in range(n) if j != i)
            route_tls = f"\n  tls {{ {_tls_files(out)}, verify: true }}" if tls else ""
            lines += [f'server_name: "node-{i + 1}"',
                      f'cluster {{\n  name: "busserve"\n  listen: "{args.host}:{args.cluster_port + i}"\n'
                      f'  authorization {{ user: "busserve-route", password: "{route_password}" }}\n'
                      f"  routes: [{routes}]{route_tls}\n}}"]
        conf = out / (f"node-{i + 1}.conf" if n > 1 else "nats-server.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds every password
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n" + authorization)
        written.append(conf.name)
    print(f"wrote {', '.join(written)} and credentials.json in {out} ({len(creds.identities)} identities: "
          f"{', '.join(f'{i.name} ({i.role})' for i in creds.identities.values())})")
    how = {"password": "BUSSERVE_NATS_USER / BUSSERVE_NATS_PASSWORD",
           "nkey": "BUSSERVE_NATS_IDENTITY / BUSSERVE_NATS_NKEY (keys/<name>.nk)",
           "mtls": "BUSSERVE_NATS_IDENTITY / BUSSERVE_NATS_TLS_CERT / BUSSERVE_NATS_TLS_KEY (clients/<name>.pem)",
           "jwt": "BUSSERVE_NATS_IDENTITY / BUSSERVE_NATS_CREDS (creds/<name>.creds)"}[args.auth]
    print(f"each process reads its identity from {how} (never a flag)")
    return 0


def _tls_files(out: Path) -> str:
    return (f'cert_file: "{(out / "server.pem").resolve()}", key_file: "{(out / "server-key.pem").resolve()}", '
            f'ca_file: "{(out / "ca.pem").resolve()}"')

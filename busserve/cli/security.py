"""``busserve security``: the roles × subjects matrix, and the files of a secured deployment.

    busserve security matrix                  the matrix as Markdown (what docs/SECURITY.md shows)
    busserve security init DIR --engine e0 --engine e1 --router r0 --client alice
                                              credentials.json (0600) with a random password per identity,
                                              nats-server.conf with their grants; --tls adds a CA, a server
                                              certificate and TLS on the client port (dev-grade: openssl, 1 year)
"""

from __future__ import annotations

import argparse
import os
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
    i.add_argument("--client", action="append", default=[], metavar="NAME", help="a client identity (repeat)")
    i.add_argument("--port", type=int, default=4222)
    i.add_argument("--host", default="127.0.0.1", help="address the server listens on (default 127.0.0.1)")
    i.add_argument("--tls", action="store_true", help="also a CA and a server certificate (needs openssl)")
    i.add_argument("--tls-host", action="append", default=[], metavar="NAME",
                   help="a name or IP the server certificate is for (default localhost and 127.0.0.1)")
    i.add_argument("--subject-prefix", default="busserve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve.bus.subjects import Subjects
    from busserve.security.roles import matrix_markdown

    subjects = Subjects(args.subject_prefix)
    if args.security_command == "matrix":
        print(matrix_markdown(subjects), end="")
        return 0
    return _init(args, subjects)


def _init(args: argparse.Namespace, subjects: Any) -> int:
    from busserve.security.dev_tls import write_dev_tls
    from busserve.security.server_config import Credentials, authorization_config

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    creds = Credentials.for_stack(args.engine or ["e0"], args.router or ["router-0"],
                                  clients=tuple(args.client or ["client"]))
    creds.save(out / "credentials.json")
    lines = [f'listen: "{args.host}:{args.port}"', "max_payload: 8MB", "max_pending: 256MB",
             f'jetstream {{ store_dir: "{(out / "jetstream").resolve().as_posix()}" }}']
    if args.tls:
        write_dev_tls(out, args.tls_host or ["localhost", "127.0.0.1"])
        lines.append(f'tls {{ cert_file: "{(out / "server.pem").resolve()}", '
                     f'key_file: "{(out / "server-key.pem").resolve()}", ca_file: "{(out / "ca.pem").resolve()}" }}')
    conf = out / "nats-server.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds every password
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n" + authorization_config(list(creds.identities.values()), subjects))
    print(f"wrote {conf} and {out / 'credentials.json'} ({len(creds.identities)} identities: "
          f"{', '.join(f'{i.name} ({i.role})' for i in creds.identities.values())})")
    print("each process reads its identity from BUSSERVE_NATS_USER / BUSSERVE_NATS_PASSWORD (never a flag)")
    return 0

"""``busserve up``: embedded NATS + engines + router + HTTP front, supervised, in one command."""

from __future__ import annotations

import argparse
from typing import Any

from busserve.cli.options import add_bus_args, add_engine_args, bus_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="embedded NATS + engines + router + HTTP front, in one command")
    add_bus_args(p)
    add_engine_args(p)
    p.add_argument("--engines", type=int, default=None,
                   help="number of engine processes (default 2; with --identities, one per engine identity)")
    p.add_argument("--strategy", default="least_loaded", help="initial strategy (default least_loaded)")
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="strategy parameter")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible front (0: off)")
    p.add_argument("--nats-port", type=int, default=None, help="port of the embedded server (default: free)")
    p.add_argument("--api-keys-file", default=None, metavar="FILE",
                   help="API keys of the HTTP front (see `busserve router --help`; BUSSERVE_API_KEYS works too)")
    p.add_argument("--rate-limit", type=float, default=0.0, metavar="REQ_PER_S", help="per key; 429 over it")
    p.add_argument("--max-concurrent", type=int, default=0, help="requests in progress per key; 429 over it")
    p.add_argument("--insecure", action="store_true",
                   help="run the embedded nats-server open (no credentials, every client may read every stream); "
                        "by default each process gets its own identity with the grants of its role")
    p.add_argument("--join", action="append", default=[], metavar="URL",
                   help="add this host's engines (and a router, unless --no-router) to the cluster at URL instead of "
                        "starting a server (repeat or comma-separate for a NATS cluster; the same as --nats); ids "
                        "carry this host's name and a random suffix, and each is checked free before serving")
    p.add_argument("--no-router", action="store_true", help="start no router here (with --join: engines only)")
    p.add_argument("--identities", default=None, metavar="FILE",
                   help="with --join on a secured cluster: the identities issued for this host's processes "
                        "(`busserve security add DIR --engine ID --out FILE`); their names are the process ids")
    p.add_argument("--roles", action="append", default=[], metavar="ROLES",
                   help="roles per engine in order, e.g. --roles prefill --roles decode (default both)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve.launch.stack import launch_cluster

    args.nats = [*args.nats, *args.join]
    if args.no_router and not args.nats:
        raise SystemExit("busserve up: --no-router needs --join URL (a stack of its own needs its router)")
    if args.engines is None and not args.identities:
        args.engines = 2
    cfg = bus_config(args)
    # Only --nats (or BUSSERVE_NATS_URL) names an outside server; the state file of another `up` does not.
    return launch_cluster(args, cfg)

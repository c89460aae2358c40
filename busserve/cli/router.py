"""``busserve router``: one router process (several may run), optionally with the OpenAI-compatible front."""

from __future__ import annotations

import argparse
from typing import Any

from busserve.cli.options import add_bus_args, bus_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser("router", help="run one router")
    add_bus_args(p)
    p.add_argument("--id", default=None, help="router id (default: a random one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the default model's)")
    p.add_argument("--strategy", default=None, help="strategy to set if none is stored yet")
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="strategy parameter")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=0, help="also serve the OpenAI-compatible front (0: off)")
    h = p.add_argument_group("HTTP front: keys and limits")
    h.add_argument("--api-keys-file", default=None, metavar="FILE",
                   help="API keys, one per line ('KEY' or 'NAME KEY'); also BUSSERVE_API_KEYS=k1,k2. With none "
                        "the front is open (a warning says so)")
    h.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413 (default 4 MiB)")
    h.add_argument("--rate-limit", type=float, default=0.0, metavar="REQ_PER_S",
                   help="requests per second per key (or for everyone, without keys); over it 429 (default off)")
    h.add_argument("--rate-burst", type=int, default=0, help="requests a key may send at once (default: 1 s worth)")
    h.add_argument("--max-concurrent", type=int, default=0,
                   help="requests in progress per key, streams included; over it 429 (default off)")
    h.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics on its own port instead of the front's (default: on the front)")
    h.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default 127.0.0.1)")
    g = p.add_argument_group("request lifecycle")
    g.add_argument("--lease-s", type=float, default=15.0,
                   help="lease of a parked receive, renewed while the strategy works (default 15): how soon a "
                        "dead router's half-routed requests end with an Error")
    g.add_argument("--progress-s", type=float, default=30.0,
                   help="a started request whose stream is quiet this long gets its engine probed (default 30)")
    g.add_argument("--resume-limit", type=int, default=2,
                   help="default times a request is resumed on another engine after its own is lost (default 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve.router.main import run_router_command

    return run_router_command(args, bus_config(args))

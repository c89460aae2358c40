"""The ``busserve`` command line: one module per subcommand in this package (``busserve/cli/<command>.py``), the
options several share in ``options.py`` below them. Each subcommand imports what it runs only when it runs, so
``busserve version`` does not pay for importing torch.

    busserve up                      embedded NATS + engines + router + HTTP front, in one command
    busserve engine                  one engine process
    busserve router                  one router process (several may run)
    busserve generate "prompt"       stream a completion through the router
    busserve strategy set|show|serve live strategy control, strategies as processes
    busserve status                  live view of engines, routers and the active strategy
    busserve bench                   open-loop load generator
    busserve nats                    only the embedded nats-server
    busserve security matrix|init    roles × subjects matrix; credentials and server config for a deployment
    busserve schema export           write schemas/ (JSON Schema + AsyncAPI) from the code
    busserve version
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence

Command = Callable[[argparse.Namespace], int]
# One module per subcommand; each has ``add_parser(subparsers)`` and imports what it runs only when it runs.
SUBCOMMANDS = ("version", "schema", "nats", "up", "engine", "router", "generate", "strategy", "status", "bench",
               "security")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="busserve", description="LLM microserving over NATS.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"busserve.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


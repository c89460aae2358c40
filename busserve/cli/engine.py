"""``busserve engine``: one engine process."""

from __future__ import annotations

import argparse
from typing import Any

from busserve.cli.options import add_bus_args, add_engine_args, bus_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser("engine", help="run one engine")
    add_bus_args(p)
    add_engine_args(p)
    p.add_argument("--id", default=None, help="engine id (default: a random one)")
    p.add_argument("--roles", default="prefill,decode", help="comma-separated roles (default prefill,decode)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus endpoint port (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics endpoint binds (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve.engine.main import run_engine_command

    return run_engine_command(args, bus_config(args))

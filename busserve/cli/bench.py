"""``busserve bench``: the open-loop load generator (vLLM-style serving metrics)."""

from __future__ import annotations

import argparse
from typing import Any

from busserve.cli.options import add_bus_args, bus_config


def add_parser(sub: Any) -> None:
    from busserve.bench.args import add_bench_args

    p = sub.add_parser("bench", help="open-loop load generator (vLLM-style serving metrics)")
    add_bus_args(p)
    add_bench_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve.bench.main import run_bench_command

    return run_bench_command(args, bus_config(args, role="client"))

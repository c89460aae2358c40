"""``busserve version``."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve import __version__

    print(f"busserve {__version__}")
    return 0

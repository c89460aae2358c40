"""``busserve schema export [--check]``: write (or check) schemas/ from the code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("schema", help="JSON Schema and AsyncAPI documents")
    schema_sub = p.add_subparsers(dest="schema_command", required=True)
    pe = schema_sub.add_parser("export", help="write schemas/ from the code")
    pe.add_argument("--out", default="schemas", help="output folder (default schemas)")
    pe.add_argument("--check", action="store_true", help="fail if the files differ from the code")
    pe.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve.bus import schema_export

    out = Path(args.out)
    if args.check:
        stale = schema_export.stale_files(out)
        if stale:
            print(f"out of date in {out}: {', '.join(stale)} — run `busserve schema export`", file=sys.stderr)
            return 1
        print(f"{out} is in sync with the code")
        return 0
    for path in schema_export.export(out):
        print(f"wrote {path}")
    return 0

"""``busserve nats``: only the embedded nats-server (JetStream on), until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("nats", help="run only the embedded nats-server (JetStream on)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--data-dir", default=None, help="JetStream store (default: a temporary folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busserve.bus.config import clear_up_state, write_up_state
    from busserve.bus.embedded import EmbeddedNats
    from busserve.launch.signals import StopFlag

    stop = StopFlag()
    with EmbeddedNats(port=args.port, data_dir=args.data_dir) as server:
        write_up_state({"pid": os.getpid(), "nats_url": server.url, "started_at": time.time()})
        print(f"nats-server on {server.url} (JetStream on, data in {server.data_dir}); Ctrl-C stops it", flush=True)
        try:
            while not stop.wait(0.5):
                if not server.running:
                    print("nats-server exited", flush=True)
                    return 1
        finally:
            clear_up_state(os.getpid())
    print("stopped", flush=True)
    return 0

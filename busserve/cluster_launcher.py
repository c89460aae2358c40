"""``busserve up``: the whole stack in one command (embedded NATS first; engines, router and front follow)."""

from __future__ import annotations

import argparse
import os
import time

from busserve.bus.config import clear_up_state, write_up_state
from busserve.bus.embedded import EmbeddedNats
from busserve.up import StopFlag


def launch_cluster(args: argparse.Namespace) -> int:
    stop = StopFlag()
    with EmbeddedNats(port=args.nats_port) as server:
        write_up_state({"pid": os.getpid(), "nats_url": server.url, "started_at": time.time()})
        print(f"bus: nats-server on {server.url}", flush=True)
        print("engines, router and HTTP front are not part of this build yet; the bus alone is up. Ctrl-C stops it.",
              flush=True)
        try:
            while not stop.wait(0.5) and server.running:
                pass
        finally:
            clear_up_state(os.getpid())
    return 0

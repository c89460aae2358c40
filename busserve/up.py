"""``busserve up`` and ``busserve nats``: start the embedded bus (and, for ``up``, the rest of a cluster).

``busserve nats`` runs only the nats-server. ``busserve up`` starts it unless ``--nats`` names one, then the
engines, the router and the HTTP front as child processes; it records the bus URL in the state file so that
``busserve generate`` on the same machine finds it, and stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from types import FrameType

from busserve.bus.config import clear_up_state, write_up_state
from busserve.bus.embedded import EmbeddedNats


class StopFlag:
    """Set by SIGINT/SIGTERM; waited on by the main thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)


def run_nats_only(args: argparse.Namespace) -> int:
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


def run_up(args: argparse.Namespace) -> int:
    from busserve.cluster_launcher import launch_cluster

    return launch_cluster(args)

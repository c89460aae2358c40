"""The signals ``busserve up`` answers, as flags its main thread waits on: SIGINT/SIGTERM stop (a second one: stop
at once), SIGHUP restarts the engines one by one."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopFlag:
    """Set by SIGINT/SIGTERM; ``hurry`` by a second one; ``restart`` by SIGHUP. Waited on by the main thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.hurry = threading.Event()
        self.restart = threading.Event()
        self.wake = threading.Event()  # any of them
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGHUP, self._hup)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        (self.hurry if self.event.is_set() else self.event).set()
        self.wake.set()

    def _hup(self, signum: int, frame: FrameType | None) -> None:
        self.restart.set()
        self.wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until stopped, restarted or ``timeout``; True once stopped."""
        self.wake.wait(timeout)
        self.wake.clear()
        return self.event.is_set()

    def is_set(self) -> bool:
        return self.event.is_set()

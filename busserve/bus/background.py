"""An asyncio event loop on a background thread, for processes whose main thread does the computing.

An engine process computes on its main thread — the thread that loaded the model — and keeps all bus I/O on this
loop. That keeps exactly one thread in the process running multi-threaded torch: with a second OpenMP team
(more OpenMP threads than cores), libgomp stops spin-waiting and every small kernel pays a wake-up (measured here:
a batch-16 decode step's matmuls went from 50 ms to 68 ms).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str = "bus-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 120.0) -> T:
        """Run ``coro`` on the loop and wait for its result from the calling thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

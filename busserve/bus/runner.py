"""Running a long-lived bus process's asyncio main (a router, a strategy process) so that it always ends.

``asyncio.run`` cancels the tasks still running when main returns and then waits for every one of them, without a
bound. A task that swallows its cancellation therefore keeps the process alive forever — and nats-py does swallow
one: a publish waiting for its flusher catches ``CancelledError`` and returns (``Client._flush_pending``), so a loop
publishing through a connection whose server is gone can outlive every cancel. A router was seen still waiting
there an hour after its SIGTERM. :func:`run_bounded` gives the leftover tasks ``settle_s`` once cancelled, names
the ones that did not finish in the log, and closes the loop without them instead of waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
SETTLE_S = 5.0


def run_bounded(main: Coroutine[Any, Any, T], *, what: str, settle_s: float = SETTLE_S) -> T:
    """``asyncio.run(main)``, except that tasks left over at the end get ``settle_s`` to finish, not forever."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            stuck = loop.run_until_complete(_settle(settle_s))
            if stuck:
                names = ", ".join(sorted(t.get_name() for t in stuck))
                log.warning("%s: %d task(s) still running %.0f s after being cancelled, left behind: %s", what,
                            len(stuck), settle_s, names)
            else:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), settle_s))
        except Exception as exc:  # the exit is what matters now
            log.warning("%s: while shutting down: %s", what, exc)
        finally:
            asyncio.set_event_loop(None)
            loop.close()  # the tasks left behind never run again


async def _settle(settle_s: float) -> set[asyncio.Task[Any]]:
    me = asyncio.current_task()
    tasks = {t for t in asyncio.all_tasks() if t is not me and not t.done()}
    for t in tasks:
        t.cancel()
    if not tasks:
        return set()
    _, pending = await asyncio.wait(tasks, timeout=settle_s)
    for t in tasks - pending:  # retrieve what they ended with, so asyncio does not log it as never retrieved
        if not t.cancelled():
            t.exception()
    return pending

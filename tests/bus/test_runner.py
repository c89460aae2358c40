"""run_bounded: a bus process's asyncio main ends even when a task swallows its cancellation (as nats-py's publish
does while it waits for its flusher), and otherwise behaves as asyncio.run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import pytest

from busserve.bus.runner import run_bounded


async def _swallows_cancels() -> None:
    while True:
        with contextlib.suppress(asyncio.CancelledError):  # what nats-py's _flush_pending does
            await asyncio.sleep(3600)


def test_a_task_that_swallows_its_cancel_does_not_keep_the_process(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> str:
        asyncio.get_running_loop().create_task(_swallows_cancels(), name="stubborn-publisher")
        await asyncio.sleep(0.05)
        return "done"

    ended: list[str] = []
    thread = threading.Thread(target=lambda: ended.append(run_bounded(main(), what="router t", settle_s=0.3)),
                              daemon=True)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="busserve.bus.runner"):
        thread.start()
        thread.join(timeout=10)
    assert ended == ["done"], "run_bounded did not return (asyncio.run would wait here forever)"
    assert time.monotonic() - t0 < 5
    assert "stubborn-publisher" in caplog.text and "router t" in caplog.text


def test_it_returns_and_raises_as_asyncio_run() -> None:
    async def ok() -> int:
        async def quick() -> None:
            await asyncio.sleep(3600)
        asyncio.get_running_loop().create_task(quick())  # cancelled at the end, as asyncio.run does
        return 7

    async def bad() -> None:
        raise ValueError("no")

    assert run_bounded(ok(), what="t") == 7
    with pytest.raises(ValueError, match="no"):
        run_bounded(bad(), what="t")

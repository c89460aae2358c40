"""One id, one process: a second engine or router started under an id already serving on the bus is refused (exit
code 2, the reason printed) and the first keeps serving; ids busserve picks itself carry the host and a suffix."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.bus.identity import host_scoped_id
from busserve.engine.model_loader import LoadedModel
from busserve.testing import ProcessCluster
from tests.faults.conftest import TINY_ENGINE, wait_router
from tests.helpers import live_view

pytestmark = pytest.mark.slow


def test_host_scoped_ids_are_subject_tokens_and_differ() -> None:
    ids = {host_scoped_id("up") for _ in range(20)}
    assert len(ids) > 1
    assert all(re.fullmatch(r"up-[A-Za-z0-9_-]+-[0-9a-f]{4}", i) for i in ids), ids


@pytest.mark.asyncio
async def test_a_second_process_under_a_serving_id_is_refused(tiny_dir: Path, tiny: LoadedModel,
                                                             tmp_path: Path) -> None:
    with ProcessCluster(log_dir=str(tmp_path)) as c:
        c.start_engine("A", "--model", str(tiny_dir), *TINY_ENGINE, threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        await asyncio.to_thread(c.wait_engines, {"A"})
        bus = await Bus.connect(c.bus_config(), name="t")
        try:
            await wait_router(bus)
            for argv, what in ((["engine", "--id", "A", "--model", str(tiny_dir), *TINY_ENGINE, "--threads", "1"],
                                "engine id 'A'"),
                               (["router", "--id", "r0", "--tokenizer", str(tiny_dir)], "router id 'r0'")):
                out = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "busserve.cli", *argv, "--nats", c.url],
                    capture_output=True, text=True, timeout=180)
                assert out.returncode == 2, out.stdout + out.stderr
                assert f"{what} is already serving" in out.stdout + out.stderr, out.stdout + out.stderr
            # The first ones serve on.
            view = await live_view(bus, {"A"})
            assert view.get("A") is not None
            await wait_router(bus)
        finally:
            await bus.close()

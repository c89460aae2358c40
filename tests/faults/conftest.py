"""Clusters for the fault tests: real nats-server, engine and router processes, each test its own (they get
killed). Logs go to the test's temporary folder, printed when a test fails."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.engine.model_loader import LoadedModel
from busserve.messages import RouterStatus
from busserve.testing import ProcessCluster
from busserve.tokenization import vocab_size

TINY_ENGINE = ("--dtype", "float32", "--kv-pages", "512", "--max-batch-tokens", "64")


def prompt(tiny: LoadedModel, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    vocab = vocab_size(tiny.tokenizer)
    return [rng.randrange(100, vocab) for _ in range(n)]


async def wait_router(bus: Bus, router_id: str = "r0", timeout_s: float = 30.0) -> RouterStatus:
    sub = await bus.nc.subscribe(bus.subjects.routers_status())
    try:
        while True:
            st = codec.decode((await sub.next_msg(timeout=timeout_s)).data, RouterStatus)
            if st.router_id == router_id:
                return st
    finally:
        await sub.unsubscribe()


def dump_logs(folder: Path) -> str:
    out = []
    for f in sorted(folder.glob("*.log")):
        out.append(f"----- {f.name}\n" + f.read_text(errors="replace")[-6000:])
    return "\n".join(out)


@pytest.fixture
def logs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    folder = tmp_path / "logs"
    folder.mkdir()
    yield folder
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(dump_logs(folder))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def tiny_cluster(tiny_dir: Path, logs: Path) -> Iterator[ProcessCluster]:
    """Engines A and B (the tiny model, one thread each) and router r0."""
    with ProcessCluster(log_dir=str(logs)) as c:
        for eid in ("A", "B"):
            c.start_engine(eid, "--model", str(tiny_dir), *TINY_ENGINE, threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        c.wait_engines({"A", "B"})
        yield c


"""One id, one process: a second engine or router started under an id already serving on the bus is refused (exit
code 2, the reason printed) and the first keeps serving; ids busserve picks itself carry the host and a suffix."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.bus.identity import host_scoped_id
from busserve.bus.subjects import Subjects
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


@pytest.mark.asyncio
async def test_up_join_adds_this_hosts_engines_to_a_running_cluster(tiny_dir: Path, tiny: LoadedModel,
                                                                    tmp_path: Path) -> None:
    """`busserve up --join URL --no-router`: no server of its own, its engine under a host-scoped id joins the
    cluster and serves requests the cluster's router sends it; Ctrl-C stops only what it started."""
    from busserve.bus import codec
    from busserve.messages import Final, GenerateRequest, RouterStatus, SamplingParams

    with ProcessCluster(log_dir=str(tmp_path)) as c:
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        joined = c.start("up", "up", "--join", c.url, "--no-router", "--engines", "1", "--model", str(tiny_dir),
                         *TINY_ENGINE)
        bus = await Bus.connect(c.bus_config(), name="t")
        try:
            await wait_router(bus)
            view = await live_view(bus, set(), wait_s=1)
            for _ in range(600):
                engines = [e.id for e in view.engines()]
                if engines:
                    break
                assert joined.poll() is None, (tmp_path / "up.log").read_text()
                await asyncio.sleep(0.2)
            assert len(engines) == 1 and re.fullmatch(r"up-[A-Za-z0-9_-]+-[0-9a-f]{4}-e0", engines[0]), engines
            req = GenerateRequest(prompt_token_ids=list(range(100, 120)), sampling=SamplingParams(
                max_tokens=4, temperature=0.0, ignore_eos=True))
            events = [e async for e in bus.generate(req, first_event_timeout_s=60)]
            assert isinstance(events[-1], Final) and events[-1].engine_id == engines[0], events[-1]
            routers: set[str] = set()
            sub = await bus.nc.subscribe(bus.subjects.routers_status())
            deadline = asyncio.get_running_loop().time() + 2.5
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                with contextlib.suppress(Exception):
                    routers.add(codec.decode((await sub.next_msg(timeout=left)).data, RouterStatus).router_id)
            assert routers == {"r0"}  # --no-router: the joining host added none
        finally:
            await bus.close()
        c.kill("up", signal.SIGINT)


@pytest.mark.asyncio
async def test_up_join_a_secured_cluster_with_identities_issued_for_this_host(tiny_dir: Path, tiny: LoadedModel,
                                                                              tmp_path: Path) -> None:
    """Operator mode: `busserve security add DIR --engine hostb-e0` signs a new engine under the deployment's
    services account — the running server's config is not touched — and `busserve up --join URL --identities FILE
    --no-router` starts that engine under that name; the cluster's router serves a client's request on it. An
    engine that claims the id without the identity is refused by the server."""
    from busserve.messages import Final, GenerateRequest, SamplingParams
    from busserve.security.issue import issue
    from busserve.security.server_config import Credentials

    deploy = tmp_path / "deploy"
    creds, auth = issue(Credentials.for_stack(["e-main"], ["r0"], clients=("alice",)), "jwt", Subjects(), deploy)
    creds.save(deploy / "credentials.json")
    with ProcessCluster(credentials=creds, auth=auth, log_dir=str(tmp_path)) as c:
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        added = subprocess.run([sys.executable, "-m", "busserve.cli", "security", "add", str(deploy), "--engine",
                                "hostb-e0", "--out", str(tmp_path / "hostb.json")], capture_output=True, text=True,
                               timeout=60)
        assert added.returncode == 0, added.stderr
        assert "hostb-e0" in Credentials.load(deploy / "credentials.json").identities
        joined = c.start("up", "up", "--join", c.url, "--identities", str(tmp_path / "hostb.json"), "--no-router",
                         "--model", str(tiny_dir), *TINY_ENGINE)
        bus = await Bus.connect(c.bus_config("alice"), name="alice")
        try:
            for _ in range(600):
                if "joined the cluster" in (tmp_path / "up.log").read_text(errors="replace"):
                    break
                assert joined.poll() is None, (tmp_path / "up.log").read_text()
                await asyncio.sleep(0.2)
            else:
                raise AssertionError((tmp_path / "up.log").read_text())
            req = GenerateRequest(prompt_token_ids=list(range(100, 120)), sampling=SamplingParams(
                max_tokens=4, temperature=0.0, ignore_eos=True))
            events = [e async for e in bus.generate(req, first_event_timeout_s=60)]
            assert isinstance(events[-1], Final) and events[-1].engine_id == "hostb-e0", events[-1]
        finally:
            await bus.close()
        # The same id under another identity (engine e-main's creds): its grants are for e-main's subjects, so it
        # is refused before it serves, with the reason.
        impostor = c.start("e-main", "engine", "--nats", c.url, "--id", "hostb-e0", "--model", str(tiny_dir),
                           *TINY_ENGINE)
        assert impostor.wait(timeout=120) == 2
        assert "is not this connection's identity 'e-main'" in (tmp_path / "e-main.log").read_text()
        c.kill("up", signal.SIGINT)

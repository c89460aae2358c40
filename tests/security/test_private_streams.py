"""Two clients on a secured cluster (real nats-server from the generated config, real engine and router processes
connecting with their own identities): each gets its answers, neither can read, forge into or cancel the other's
streams, and the services keep working under their least-privilege grants (config bucket, strategy switch)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.config_store import ConfigStore
from busserve.engine.model_loader import LoadedModel
from busserve.messages import Cancel, Final, GenerateRequest, SamplingParams, TokenChunk
from busserve.router.control import set_strategy
from busserve.security.server_config import Credentials
from busserve.testing import ProcessCluster
from tests.faults.conftest import TINY_ENGINE, prompt, wait_router

pytestmark = pytest.mark.slow


def _req(label: str, ids: list[int], n: int) -> GenerateRequest:
    return GenerateRequest(request_id=label, prompt_token_ids=ids,
                           sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


async def _collect(bus: Bus, req: GenerateRequest) -> list[object]:
    return [e async for e in bus.generate(req, first_event_timeout_s=60)]


async def _cancel_after_first_token(owner: Bus, req: GenerateRequest, canceller: Bus) -> list[object]:
    """``owner``'s request; once its first token is in, ``canceller`` cancels it by its label, under its own name."""
    events: list[object] = []
    async for event in owner.generate(req, first_event_timeout_s=60):
        events.append(event)
        if isinstance(event, TokenChunk) and len(events) <= 2:
            await canceller.publish(canceller.subjects.cancel(canceller.owner),
                                    Cancel(request_id=str(req.request_id), reason="cancel"))
    return events


@pytest.mark.asyncio
async def test_clients_see_only_their_own_requests(tiny_dir: Path, tiny: LoadedModel, tmp_path: Path) -> None:
    creds = Credentials.for_stack(["A"], ["r0"], clients=("alice", "bob"))
    with ProcessCluster(credentials=creds, log_dir=str(tmp_path)) as c:
        c.start_engine("A", "--model", str(tiny_dir), *TINY_ENGINE, threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        await asyncio.to_thread(c.wait_engines, {"A"})
        operator = await Bus.connect(c.bus_config("operator"), name="operator")
        alice = await Bus.connect(c.bus_config("alice"), name="alice")
        bob = await Bus.connect(c.bus_config("bob"), name="bob")
        try:
            await wait_router(operator)
            # Each gets its own answer, through the router, on its own inbox.
            events = await _collect(alice, _req("same-label", prompt(tiny, 12, 1), 6))
            assert isinstance(events[-1], Final) and events[-1].finish_reason == "length", events[-1]
            assert sum(len(e.token_ids) for e in events if isinstance(e, TokenChunk)) == 6

            # Bob asks the router to stream into Alice's inbox: nothing is published there.
            forged: list[object] = []

            async def on_forged(msg: object) -> None:
                forged.append(msg)

            spy = await alice.nc.subscribe("_INBOX.alice.forged", cb=on_forged)
            await bob.publish(bob.subjects.generate("bob"), _req("forge", prompt(tiny, 12, 2), 4),
                              reply="_INBOX.alice.forged")
            # ... and Bob's honest request with the same label as Alice's next one is served.
            bob_events = await _collect(bob, _req("same-label", prompt(tiny, 12, 3), 4))
            assert isinstance(bob_events[-1], Final), bob_events[-1]
            await asyncio.sleep(0.5)
            assert forged == []
            await spy.unsubscribe()

            # Bob cancels Alice's request by its label: it runs to its end. Alice's own cancel ends hers.
            done = await _cancel_after_first_token(alice, _req("a-long", prompt(tiny, 12, 4), 120), bob)
            assert isinstance(done[-1], Final) and done[-1].finish_reason == "length", done[-1]
            ended = await _cancel_after_first_token(alice, _req("a-mine", prompt(tiny, 12, 5), 300), alice)
            assert isinstance(ended[-1], Final) and ended[-1].finish_reason == "cancelled", ended[-1]
            indices = [e.index for e in ended if isinstance(e, TokenChunk)]
            assert indices == sorted(indices) and sum(len(e.token_ids) for e in ended if isinstance(e, TokenChunk)) < 300

            # The services' grants are enough for the live configuration: the router stored its strategy, the
            # operator switches it.
            store = await ConfigStore.open(operator)
            assert (await store.get_strategy()) is not None
            state = await set_strategy(operator, "round_robin", {})
            assert state.name == "round_robin"
            await store.close()
            events = await _collect(alice, _req("after-switch", prompt(tiny, 12, 6), 3))
            assert isinstance(events[-1], Final), events[-1]

            # A strategy as its own process, under the strategy role: it composes the actions, routers reach it.
            c.start("strategy", "strategy", "serve", "tests.router.custom_strategy:pinned", "--name", "custom",
                    "--nats", c.url)
            for _ in range(100):
                try:
                    await set_strategy(operator, "custom", {"target": "A"})
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # the process's own view hears the engines' next heartbeat
            events = await _collect(alice, _req("via-process", prompt(tiny, 12, 7), 3))
            assert isinstance(events[-1], Final) and events[-1].engine_id == "A", events[-1]
        finally:
            for b in (alice, bob, operator):
                await b.close()
        for log in tmp_path.glob("*.log"):
            text = log.read_text(errors="replace")
            assert "ermissions violation" not in text, f"{log.name} was refused something it needs:\n{text[-3000:]}"

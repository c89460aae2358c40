"""Two tenants (accounts) share one cluster — real nats-server from the generated ``accounts`` config, real engine
and router processes: each tenant's client is served through its account's imports, and neither tenant sees the
other's requests, streams, KV events or status. Even a user of tenant A whose grants are widened to everything
(``>``) sees nothing of B and cannot act for anyone: what crosses between accounts is only what the config exports."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from busserve.bus.client import Bus
from busserve.bus.subjects import Subjects
from busserve.engine.model_loader import LoadedModel
from busserve.messages import Cancel, Final, GenerateRequest, SamplingParams, TokenChunk
from busserve.security.server_config import Credentials, auth_config
from busserve.testing import ProcessCluster
from tests.faults.conftest import TINY_ENGINE, prompt, wait_router

pytestmark = pytest.mark.slow
S = Subjects()


def _req(label: str, ids: list[int], n: int) -> GenerateRequest:
    return GenerateRequest(request_id=label, prompt_token_ids=ids,
                           sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


def _tokens(events: list[object]) -> int:
    return sum(len(e.token_ids) for e in events if isinstance(e, TokenChunk))


def _widen(config: str, user: str) -> str:
    """``user``'s grants replaced by everything: what an account lets through is then all that limits it."""
    pattern = re.compile(r'(\{ user: "' + user + r'", password: "[^"]*",\s*)permissions: \{.*?\} \}\n', re.S)
    widened, n = pattern.subn(r'\1permissions: { publish: { allow: [">"] }, subscribe: { allow: [">"] } } }\n',
                              config)
    assert n == 1, config
    return widened


async def _until_cancel_then_end(owner: Bus, req: GenerateRequest, canceller: Bus, subject: str) -> list[object]:
    """``owner``'s request; after its first token, ``canceller`` cancels it by its label on ``subject``."""
    events: list[object] = []
    async for event in owner.generate(req, first_event_timeout_s=60):
        events.append(event)
        if isinstance(event, TokenChunk) and len(events) <= 2:
            await canceller.publish(subject, Cancel(request_id=str(req.request_id), reason="cancel"))
    return events


@pytest.mark.asyncio
async def test_tenants_share_the_services_and_nothing_else(tiny_dir: Path, tiny: LoadedModel,
                                                           tmp_path: Path) -> None:
    creds = Credentials.for_stack(["A0"], ["r0"], clients=("alice@A", "mallory@A", "bob@B"))
    config = _widen(auth_config(list(creds.identities.values()), S), "mallory")
    with ProcessCluster(credentials=creds, auth=config, log_dir=str(tmp_path)) as c:
        c.start_engine("A0", "--model", str(tiny_dir), *TINY_ENGINE, threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        await asyncio.to_thread(c.wait_engines, {"A0"})
        alice = await Bus.connect(c.bus_config("alice"), name="alice")
        bob = await Bus.connect(c.bus_config("bob"), name="bob")
        mallory = await Bus.connect(c.bus_config("mallory"), name="mallory")
        seen: list[Msg] = []

        async def on_any(msg: Msg) -> None:
            seen.append(msg)

        try:
            await wait_router(alice)  # the routers' heartbeats reach a tenant through its import
            everything = await mallory.nc.subscribe(">", cb=on_any)
            await mallory.nc.flush()

            # Both tenants are served, each on its own inbox, tokens in order.
            a = [e async for e in alice.generate(_req("a-1", prompt(tiny, 12, 1), 6), first_event_timeout_s=60)]
            b = [e async for e in bob.generate(_req("b-secret", prompt(tiny, 12, 2), 6), first_event_timeout_s=60)]
            for events in (a, b):
                assert isinstance(events[-1], Final) and events[-1].finish_reason == "length", events[-1]
                assert _tokens(events) == 6
                indices = [e.index for e in events if isinstance(e, TokenChunk)]
                assert indices == sorted(indices)

            # Mallory, in A with every grant, tries to act for others: bob's subjects are not imported into A
            # (no responders), alice's are, but the router hears that mallory sent them and drops them.
            stolen: list[Msg] = []

            async def on_stolen(msg: Msg) -> None:
                stolen.append(msg)

            trap = await mallory.nc.subscribe("_INBOX.mallory.trap", cb=on_stolen)
            await mallory.publish(S.generate("alice"), _req("m-as-alice", prompt(tiny, 12, 3), 3),
                                  reply="_INBOX.mallory.trap")
            long_b = asyncio.create_task(_until_cancel_then_end(
                bob, _req("b-long", prompt(tiny, 12, 4), 100), mallory, S.cancel("bob")))
            long_a = asyncio.create_task(_until_cancel_then_end(
                alice, _req("a-long", prompt(tiny, 12, 5), 100), mallory, S.cancel("alice")))
            done_b, done_a = await asyncio.gather(long_b, long_a)
            assert isinstance(done_b[-1], Final) and done_b[-1].finish_reason == "length", done_b[-1]
            assert isinstance(done_a[-1], Final) and done_a[-1].finish_reason == "length", done_a[-1]
            await asyncio.sleep(0.5)
            assert [m for m in stolen if m.data] == [], "the router served a request mallory sent as alice"
            await trap.unsubscribe()

            # Alice's own cancel still counts (through her import).
            own = await _until_cancel_then_end(alice, _req("a-mine", prompt(tiny, 12, 6), 300), alice,
                                               S.cancel("alice"))
            assert isinstance(own[-1], Final) and own[-1].finish_reason == "cancelled", own[-1]
            await everything.unsubscribe()

            # What mallory's ">" heard: tenant A's own traffic and the routers' heartbeats, nothing of B or of the
            # services.
            subjects = {m.subject for m in seen}
            assert any(s.startswith("_INBOX.alice.") for s in subjects), subjects  # she did hear her tenant
            foreign = [s for s in subjects if not (s.startswith(("_INBOX.alice.", "_INBOX.mallory."))
                                                   or s in (S.routers_status(), S.generate("alice"),
                                                            S.cancel("alice"), S.resend("alice"), S.generate("bob"),
                                                            S.cancel("bob")))]
            assert foreign == [], foreign
            own_sends = (S.cancel("bob"), S.generate("bob"), S.cancel("alice"), S.generate("alice"))
            assert not [m for m in seen if (b"b-secret" in m.data or b"b-long" in m.data)
                        and m.subject not in own_sends]  # (her own cancel of b-long she hears back)
            assert not [m for m in seen if m.subject.startswith(("_INBOX.bob", S.engines_status(), "$KV", "$JS"))]
        finally:
            for bus in (alice, bob, mallory):
                await bus.close()
        for log in tmp_path.glob("*.log"):
            text = log.read_text(errors="replace")
            assert "ermissions violation" not in text, f"{log.name} was refused something it needs:\n{text[-3000:]}"
        assert "the server says 'mallory' sent it" in (tmp_path / "r0.log").read_text()

"""The engine on a real nats-server: the direct generate path, bad input, cancel, heartbeats, no leaked pages."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import msgspec
import pytest

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.engine.engine_core import EngineCore
from busserve.engine.main import EngineOptions, build_core
from busserve.engine.model_loader import LoadedModel
from busserve.engine.service import EngineService
from busserve.messages import (
    Cancel,
    ChatMessage,
    EngineStatus,
    Error,
    Final,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
)
from tests.helpers import LoopThread

MAX_LEN = 256


class EngineUnderTest:
    def __init__(self, loaded: LoadedModel, bus_config: BusConfig, engine_id: str) -> None:
        self.loop = LoopThread()
        self.core: EngineCore = build_core(EngineOptions(engine_id=engine_id, max_model_len=MAX_LEN, kv_pages=64,
                                                         transports=("bus",)), loaded)
        self.bus: Bus = self.loop.run(Bus.connect(bus_config, name=engine_id))
        self.service = EngineService(self.bus, self.core)
        self.loop.run(self.service.start())

    def close(self) -> None:
        self.loop.run(self.service.stop())
        self.loop.run(self.bus.close())
        self.loop.close()

    def assert_no_leaks(self) -> None:
        def check() -> tuple[int, int]:
            self.core.scheduler.check_pages()
            return len(self.core.scheduler.by_id), self.core.scheduler.pages_held_by_requests()

        assert self.core.call(check) == (0, 0)


@pytest.fixture(scope="module")
def engine(tiny: LoadedModel, nats_server) -> Iterator[EngineUnderTest]:  # type: ignore[no-untyped-def]
    e = EngineUnderTest(tiny, BusConfig(servers=[nats_server.url]), "svc0")
    yield e
    e.close()


@pytest.fixture(autouse=True)
def _no_leaks(engine: EngineUnderTest) -> Iterator[None]:
    yield
    engine.assert_no_leaks()


async def _collect(bus: Bus, req: GenerateRequest | bytes, engine_id: str = "svc0", **kw) -> list:  # type: ignore[no-untyped-def]
    subject = bus.subjects.engine_action(engine_id, "generate")
    if isinstance(req, bytes):
        async with bus.open_stream() as stream:
            await bus.nc.publish(subject, req, reply=stream.subject, headers=kw.get("headers"))
            return [e async for e in stream.events(first_event_timeout_s=30)]
    return [e async for e in bus.generate(req, subject=subject, first_event_timeout_s=30)]


@pytest.mark.asyncio
async def test_direct_generate_streams_to_the_reply_subject(bus: Bus, engine: EngineUnderTest) -> None:
    events = await _collect(bus, GenerateRequest(prompt="hello", sampling=SamplingParams(max_tokens=5,
                                                                                         temperature=0)))
    assert [type(e) for e in events] == [TokenChunk] * 5 + [Final]
    assert [e.index for e in events[:-1]] == list(range(5))
    assert events[-1].usage.completion_tokens == 5 and events[-1].engine_id == "svc0"


@pytest.mark.asyncio
async def test_json_client_gets_json_events(bus: Bus, engine: EngineUnderTest) -> None:
    raw = b'{"prompt": "hi", "sampling": {"max_tokens": 2, "temperature": 0}}'
    subject = bus.subjects.engine_action("svc0", "generate")
    sub = await bus.nc.subscribe("json.reply")
    await bus.nc.publish(subject, raw, reply="json.reply")
    msgs = [await sub.next_msg(timeout=30) for _ in range(3)]
    assert all(m.data.startswith(b"{") for m in msgs)
    assert msgspec.json.decode(msgs[-1].data)["type"] == "final"


BAD_INPUTS = [
    (b'{"prompt": "x", "sampling": {"max_tokens": 0}}', "invalid_request", "sampling.max_tokens"),
    (b'{"prompt": "x", "sampling": {"temperature": -0.5}}', "invalid_request", "sampling.temperature"),
    (msgspec.msgpack.encode({"prompt": "x", "sampling": {"temperature": math.nan}}), "invalid_request",
     "sampling.temperature"),
    (b'{"prompt": "x", "sampling": {"top_p": 0}}', "invalid_request", "sampling.top_p"),
    (b'{"prompt": "x", "sampling": {"top_p": 1.01}}', "invalid_request", "sampling.top_p"),
    (b'{"prompt": "x", "model": "gpt-17"}', "unknown_model", "model"),
    (b'{"prompt_token_ids": [1, 99999999]}', "invalid_request", "prompt_token_ids[1]"),
    (b'{"prompt_token_ids": [5]' + b"", "malformed", None),
    (b"\xc1\xc1\xc1 garbage", "malformed", None),
    (b'{"messages": "not a list"}', "invalid_request", "messages"),
    ((b'{"prompt_token_ids": [' + b",".join([b"7"] * MAX_LEN) + b"]}"), "prompt_too_long", "prompt"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("payload", "code", "field"), BAD_INPUTS)
async def test_bad_input_gets_an_error_naming_the_problem(bus: Bus, engine: EngineUnderTest, payload: bytes,
                                                          code: str, field: str | None) -> None:
    events = await _collect(bus, payload)
    assert len(events) == 1 and isinstance(events[0], Error), events
    assert events[0].code == code and events[0].field == field, events[0]
    # ... and the engine keeps serving everyone else.
    ok = await _collect(bus, GenerateRequest(prompt="still alive?", sampling=SamplingParams(max_tokens=2)))
    assert isinstance(ok[-1], Final)


@pytest.mark.asyncio
async def test_garbage_on_every_engine_subject_is_answered(bus: Bus, engine: EngineUnderTest) -> None:
    for action in ("prep_recv", "remote_send", "start_generate", "abort", "set_roles", "no_such_action"):
        reply = await bus.nc.request(bus.subjects.engine_action("svc0", action), b"\x00\xff", timeout=5)
        err = codec.decode(reply.data, Error, reply.headers)
        assert err.code in {"malformed", "invalid_request"}, (action, err)


@pytest.mark.asyncio
async def test_cancel_frees_pages_at_once(bus: Bus, engine: EngineUnderTest) -> None:
    req = GenerateRequest(request_id="to-cancel", prompt="tell me a long story",
                          sampling=SamplingParams(max_tokens=200, ignore_eos=True, temperature=0))
    events = []
    async for event in bus.generate(req, subject=bus.subjects.engine_action("svc0", "generate")):
        events.append(event)
        if len(events) == 3:
            await bus.publish(bus.subjects.cancel(), Cancel(request_id="to-cancel"))
    final = events[-1]
    assert isinstance(final, Final) and final.finish_reason == "cancelled"
    assert final.usage.completion_tokens < 200
    # The request's pages are back before anything else happens (checked by the autouse fixture too).
    assert engine.core.call(lambda: engine.core.scheduler.pages_held_by_requests()) == 0


@pytest.mark.asyncio
async def test_client_that_walks_away_is_cancelled(bus: Bus, engine: EngineUnderTest) -> None:
    req = GenerateRequest(prompt="walk away", sampling=SamplingParams(max_tokens=200, ignore_eos=True))
    async for _ in bus.generate(req, subject=bus.subjects.engine_action("svc0", "generate")):
        break  # leaving the loop publishes a Cancel
    for _ in range(50):
        if engine.core.call(lambda: len(engine.core.scheduler.by_id)) == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.core.call(lambda: len(engine.core.scheduler.by_id)) == 0


@pytest.mark.asyncio
async def test_heartbeat_reports_the_engine(bus: Bus, engine: EngineUnderTest) -> None:
    sub = await bus.nc.subscribe(bus.subjects.engines_status())
    msg = await sub.next_msg(timeout=5)
    st = codec.decode(msg.data, EngineStatus, msg.headers)
    assert st.engine_id == "svc0" and st.total_pages == 64 and st.free_pages <= 64
    assert st.roles == ["prefill", "decode"] and st.transports == ["bus"] and st.max_model_len == MAX_LEN


@pytest.mark.asyncio
async def test_many_concurrent_requests_all_end_once(bus: Bus, engine: EngineUnderTest) -> None:
    async def one(i: int) -> list:  # type: ignore[type-arg]
        sp = SamplingParams(max_tokens=3 + i % 5, temperature=0.8, seed=i)
        return await _collect(bus, GenerateRequest(messages=[ChatMessage(role="user", content=f"n{i}")], sampling=sp))

    results = await asyncio.gather(*(one(i) for i in range(24)))
    for i, events in enumerate(results):
        terminals = [e for e in events if isinstance(e, (Final, Error))]
        assert len(terminals) == 1 and isinstance(terminals[0], Final), events
        assert sum(len(e.token_ids) for e in events if isinstance(e, TokenChunk)) == 3 + i % 5

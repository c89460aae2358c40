"""busserve's NATS services protocol presence against a real nats-server: PING/INFO/STATS documents that
``nats.micro``'s own parsers read, per-endpoint counts that end at the first reply, errors with the protocol's headers.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from busserve import __version__
from busserve.bus.client import Bus
from busserve.bus.nats_service import MAX_PENDING, NatsService
from busserve.errors import RemoteError
from busserve.messages import Ack, Cancel, Error


async def _ask(bus: Bus, subject: str) -> dict[str, Any]:
    reply = await bus.nc.request(subject, b"", timeout=2)
    return json.loads(reply.data)  # type: ignore[no-any-return]


async def _gather(bus: Bus, subject: str, wait_s: float = 0.5) -> list[dict[str, Any]]:
    """Every answer to a discovery request (all services answer ``$SRV.PING``), as ``nats micro ls`` collects them."""
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish(subject, b"", reply=inbox)
    answers = []
    try:
        while True:
            msg = await sub.next_msg(timeout=wait_s)
            answers.append(json.loads(msg.data))
    except Exception:  # nats.errors.TimeoutError: nothing more within wait_s
        pass
    await sub.unsubscribe()
    return answers


@pytest.mark.asyncio
async def test_discovery_documents_and_endpoint_stats(bus: Bus) -> None:
    name, sid = f"busserve-test-{uuid.uuid4().hex[:6]}", "svc-1"
    service = NatsService(name, sid, "a test service", {"role": "test"})
    for endpoint in ("ok", "refuse", "crash", "event"):
        service.add_endpoint(endpoint, f"t.{name}.{endpoint}")
    await bus.serve_as(service)
    heard: list[str] = []

    async def ok(msg: Msg) -> None:
        await asyncio.sleep(0.02)
        await bus.respond(msg, Ack(detail="fine"))

    async def refuse(msg: Msg) -> None:
        await bus.respond(msg, Error(code="overloaded", message="too busy\nfor you", request_id="r"))

    async def crash(msg: Msg) -> None:
        raise RuntimeError("handler bug")

    async def event(msg: Msg) -> None:
        heard.append(msg.subject)

    for endpoint, handler in (("ok", ok), ("refuse", refuse), ("crash", crash), ("event", event)):
        await bus.subscribe(f"t.{name}.{endpoint}", handler, service=service, endpoint=endpoint)

    for _ in range(3):
        assert (await bus.request(f"t.{name}.ok", Cancel(request_id="x"), Ack, timeout_s=2)).detail == "fine"
    with pytest.raises(RemoteError):
        await bus.request(f"t.{name}.refuse", Cancel(request_id="x"), Ack, timeout_s=2)
    raw = await bus.nc.request(f"t.{name}.refuse", b"{}", timeout=2)
    # The protocol's error headers beside the typed body; a header value stays one line.
    assert raw.headers is not None
    assert raw.headers[ERROR_CODE_HEADER] == "429"
    assert raw.headers[ERROR_HEADER] == "overloaded: too busy for you"
    await bus.nc.publish(f"t.{name}.crash", b"")
    await bus.nc.publish(f"t.{name}.event", b"")
    await bus.nc.flush()
    for _ in range(100):
        if heard and service.endpoints["crash"].requests:
            break
        await asyncio.sleep(0.01)

    pings = [p for p in await _gather(bus, "$SRV.PING") if p["name"] == name]
    assert len(pings) == 1
    ping = ServicePing.from_dict(pings[0])
    assert (ping.id, ping.version, ping.metadata, pings[0]["type"]) == (
        sid, __version__, {"role": "test"}, "io.nats.micro.v1.ping_response")

    info = ServiceInfo.from_dict(await _ask(bus, f"$SRV.INFO.{name}"))
    assert info.description == "a test service"
    assert [(e.name, e.subject) for e in info.endpoints] == [(e, f"t.{name}.{e}") for e in
                                                              ("ok", "refuse", "crash", "event")]

    stats = ServiceStats.from_dict(await _ask(bus, f"$SRV.STATS.{name}.{sid}"))
    by_name = {e.name: e for e in stats.endpoints}
    assert (by_name["ok"].num_requests, by_name["ok"].num_errors) == (3, 0)
    # Processing time runs to the reply: three handlers that each sleep 20 ms before answering.
    assert by_name["ok"].processing_time >= 3 * 20_000_000
    assert by_name["ok"].average_processing_time >= 20_000_000
    assert (by_name["refuse"].num_requests, by_name["refuse"].num_errors) == (2, 2)
    assert by_name["refuse"].last_error == "overloaded: too busy\nfor you"
    assert (by_name["crash"].num_requests, by_name["crash"].num_errors) == (1, 1)
    assert by_name["crash"].last_error == "RuntimeError: handler bug"
    assert (by_name["event"].num_requests, by_name["event"].num_errors) == (1, 0)

    await bus.stop_serving(service)
    assert not [p for p in await _gather(bus, f"$SRV.PING.{name}", wait_s=0.3)]


def test_ids_are_subject_tokens_and_unanswered_requests_are_bounded() -> None:
    with pytest.raises(ValueError, match="one subject token"):
        NatsService("busserve-engine", "host.with.dots", "x")
    service = NatsService("busserve-test", "s", "x")
    service.add_endpoint("e", "t.e")

    async def never_answers(msg: Msg) -> None:
        pass

    handler = service.metered(never_answers, "e")

    class FakeMsg:
        def __init__(self, reply: str) -> None:
            self.reply, self.subject = reply, "t.e"

    async def flood() -> None:
        for i in range(MAX_PENDING + 50):
            await handler(FakeMsg(f"_INBOX.{i}"))  # type: ignore[arg-type]

    asyncio.run(flood())
    assert service.endpoints["e"].requests == MAX_PENDING + 50
    assert len(service._pending) == MAX_PENDING

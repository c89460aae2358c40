"""The bus client against a real nats-server: typed errors, no hangs, JSON from a plain nats-py client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from nats.aio.msg import Msg

from busserve.bus import client as client_module
from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.bus.embedded import EmbeddedNats
from busserve.errors import NoResponders, PayloadTooLarge, RemoteError, RequestTimeout
from busserve.messages import Ack, Cancel, Error, Final, GenerateRequest, Resend, TokenChunk, Usage


@pytest.mark.asyncio
async def test_request_to_no_responders_fails_fast(bus: Bus) -> None:
    start = time.monotonic()
    with pytest.raises(NoResponders) as info:
        await bus.request("nobody.listens.here", Cancel(request_id="x"), Ack, timeout_s=10)
    assert time.monotonic() - start < 2
    assert "nobody.listens.here" in str(info.value)
    assert info.value.to_error().code == "no_engine"


@pytest.mark.asyncio
async def test_request_that_times_out(bus: Bus) -> None:
    async def silent(msg: Msg) -> None:
        pass

    await bus.subscribe("slow.service", silent)
    start = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        await bus.request("slow.service", Cancel(request_id="x"), Ack, timeout_s=0.3)
    assert 0.25 < time.monotonic() - start < 2
    assert "slow.service" in str(info.value) and "0.3" in str(info.value)


@pytest.mark.asyncio
async def test_error_reply_raises_remote_error(bus: Bus) -> None:
    async def refuse(msg: Msg) -> None:
        await bus.respond(msg, Error(code="conflict", message="no way", request_id="x"))

    await bus.subscribe("refusing.service", refuse)
    with pytest.raises(RemoteError) as info:
        await bus.request("refusing.service", Cancel(request_id="x"), Ack, timeout_s=2)
    assert info.value.error.code == "conflict"


@pytest.mark.asyncio
async def test_oversized_payload_is_a_typed_error(bus: Bus) -> None:
    huge = GenerateRequest(prompt="x" * (bus.max_payload + 10))
    with pytest.raises(PayloadTooLarge) as info:
        await bus.publish("anywhere", huge)
    assert info.value.max_payload == bus.max_payload
    assert info.value.to_error().code == "payload_too_large"
    with pytest.raises(PayloadTooLarge):
        await bus.request("anywhere", huge, Ack, timeout_s=1)
    # The connection is still usable afterwards.
    await bus.nc.flush(timeout=2)
    assert bus.nc.is_connected


@pytest.mark.asyncio
async def test_a_failing_handler_keeps_the_subscription_alive(bus: Bus) -> None:
    seen: list[str] = []

    async def handler(msg: Msg) -> None:
        req = codec.decode(msg.data, GenerateRequest, msg.headers)  # raises on garbage
        seen.append(req.prompt or "")
        await bus.respond(msg, Ack())

    await bus.subscribe("fragile", handler)
    await bus.nc.publish("fragile", b"\xc1 garbage")
    await bus.nc.publish("fragile", b'{"prompt": 3}')
    await bus.request("fragile", GenerateRequest(prompt="still here"), Ack, timeout_s=2)
    assert seen == ["still here"]


@pytest.mark.asyncio
async def test_stream_reads_until_terminal_event(bus: Bus) -> None:
    async def fake_engine(msg: Msg) -> None:
        req = codec.decode(msg.data, GenerateRequest, msg.headers)
        ct = codec.content_type_of(msg.data, msg.headers)
        rid = req.request_id or ""
        for i in range(3):
            await bus.publish(msg.reply, TokenChunk(request_id=rid, index=i, token_ids=[i], text=str(i)),
                              content_type=ct)
        await bus.publish(msg.reply, Final(request_id=rid, finish_reason="length",
                                           usage=Usage(prompt_tokens=1, completion_tokens=3)), content_type=ct)
        # Anything after the terminal event must not be read.
        await bus.publish(msg.reply, TokenChunk(request_id=rid, index=9, token_ids=[9]), content_type=ct)

    await bus.subscribe("test.gen", fake_engine)
    for ct in ("msgpack", "json"):
        events = [e async for e in bus.generate(GenerateRequest(prompt="hi"), subject="test.gen", content_type=ct)]
        assert [type(e) for e in events] == [TokenChunk, TokenChunk, TokenChunk, Final]
        assert "".join(e.text for e in events if isinstance(e, TokenChunk)) == "012"


@pytest.mark.asyncio
async def test_stream_to_nobody_fails_fast(bus: Bus) -> None:
    start = time.monotonic()
    with pytest.raises(NoResponders):
        async for _ in bus.generate(GenerateRequest(prompt="hi"), subject="no.router.here"):
            pass
    assert time.monotonic() - start < 2


@pytest.mark.asyncio
async def test_stream_idle_timeout(bus: Bus) -> None:
    async def starts_then_stalls(msg: Msg) -> None:
        await bus.publish(msg.reply, TokenChunk(request_id="r", index=0, token_ids=[1]))

    cancels: list[str] = []

    async def on_cancel(msg: Msg) -> None:
        cancels.append(codec.decode(msg.data, Cancel, msg.headers).request_id)

    await bus.subscribe("stalling", starts_then_stalls)
    await bus.subscribe(bus.subjects.cancel(), on_cancel)
    with pytest.raises(RequestTimeout):
        async for _ in bus.generate(GenerateRequest(prompt="hi", request_id="stall1"), subject="stalling",
                                    idle_timeout_s=0.3):
            pass
    await bus.nc.flush()
    await asyncio.sleep(0.1)
    assert cancels == ["stall1"]  # the client told the servers it gave up


@pytest.mark.asyncio
async def test_plain_nats_client_publishes_json(bus: Bus, nats_server: EmbeddedNats) -> None:
    """A client with no busserve import (only nats-py) sends a JSON GenerateRequest that busserve decodes."""
    received: asyncio.Queue[GenerateRequest] = asyncio.Queue()

    async def handler(msg: Msg) -> None:
        await received.put(codec.decode(msg.data, GenerateRequest, msg.headers))

    await bus.subscribe("plain.json", handler)
    await bus.nc.flush()
    script = f"""
import asyncio, json, sys, nats
assert not any(name.startswith("busserve") for name in sys.modules)
async def main():
    nc = await nats.connect("{nats_server.url}")
    body = {{"prompt": "Hello from outside", "sampling": {{"max_tokens": 5, "temperature": 0}}}}
    await nc.publish("plain.json", json.dumps(body).encode())
    await nc.publish("plain.json", json.dumps(body).encode(), headers={{"Content-Type": "application/json"}})
    await nc.flush()
    await nc.close()
asyncio.run(main())
assert not any(name.startswith("busserve") for name in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for _ in range(2):
        req = await asyncio.wait_for(received.get(), timeout=5)
        assert req.prompt == "Hello from outside"
        assert req.sampling.max_tokens == 5 and req.sampling.temperature == 0


@pytest.mark.asyncio
async def test_trace_context_rides_in_headers(bus: Bus) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from busserve.telemetry.propagation import extract

    got: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    async def handler(msg: Msg) -> None:
        got.set_result(msg)

    await bus.subscribe("traced", handler)
    ctx = SpanContext(trace_id=0x1234, span_id=0x99, is_remote=False, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(ctx)):
        await bus.publish("traced", Cancel(request_id="t"))
    msg = await asyncio.wait_for(got, 5)
    assert msg.headers["traceparent"] == f"00-{0x1234:032x}-{0x99:016x}-01"
    continued = trace.get_current_span(extract(msg.headers)).get_span_context()
    assert continued.trace_id == 0x1234


async def _lossy_pair(bus: Bus, lose: set[int], lose_final: bool) -> list[object]:
    """A fake engine that loses chunks ``lose`` (and maybe its Final) on the way, and a fake router that answers
    a Resend by publishing the stream again from the asked index, as the engine's stream log would."""
    sent: dict[str, list[TokenChunk | Final]] = {}
    asked: list[int] = []

    async def engine(msg: Msg) -> None:
        req = codec.decode(msg.data, GenerateRequest, msg.headers)
        rid = req.request_id or ""
        events: list[TokenChunk | Final] = [TokenChunk(request_id=rid, index=i, token_ids=[i], text=str(i))
                                            for i in range(6)]
        events.append(Final(request_id=rid, finish_reason="length"))
        sent[msg.reply] = events
        for i, e in enumerate(events):
            if i in lose or (lose_final and isinstance(e, Final)):
                continue
            await bus.publish(msg.reply, e)

    async def router(msg: Msg) -> None:
        ask = codec.decode(msg.data, Resend, msg.headers)
        asked.append(ask.from_index)
        for subject, events in sent.items():
            for e in events:
                if isinstance(e, Final) or e.index + len(e.token_ids) > ask.from_index:
                    await bus.publish(subject, e)

    await bus.subscribe("lossy.gen", engine)
    await bus.subscribe(bus.subjects.resend(), router)
    events = [e async for e in bus.generate(GenerateRequest(prompt="hi", request_id="lossy"), subject="lossy.gen")]
    return [asked, events]


@pytest.mark.asyncio
async def test_a_gap_is_asked_again_and_filled_in_order(bus: Bus) -> None:
    asked, events = await _lossy_pair(bus, lose={2, 3}, lose_final=False)
    assert asked == [2]
    assert [e.index for e in events if isinstance(e, TokenChunk)] == [0, 1, 2, 3, 4, 5]  # type: ignore[union-attr]
    assert [type(e) for e in events].count(Final) == 1 and isinstance(events[-1], Final)  # type: ignore[index]


@pytest.mark.asyncio
async def test_a_lost_tail_is_asked_again_after_a_quiet_spell(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RESEND_IDLE_S", 0.3)
    asked, events = await _lossy_pair(bus, lose={4, 5}, lose_final=True)
    assert asked and asked[0] == 4
    assert "".join(e.text for e in events if isinstance(e, TokenChunk)) == "012345"  # type: ignore[union-attr]
    assert isinstance(events[-1], Final)  # type: ignore[index]


@pytest.mark.asyncio
async def test_a_gap_nobody_fills_ends_the_stream_with_stream_gap(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RESEND_WAIT_S", 0.5)

    async def engine(msg: Msg) -> None:
        for i in (0, 1, 3):
            await bus.publish(msg.reply, TokenChunk(request_id="g", index=i, token_ids=[i]))
        await bus.publish(msg.reply, Final(request_id="g", finish_reason="length"))

    await bus.subscribe("gappy.gen", engine)
    start = time.monotonic()
    events = [e async for e in bus.generate(GenerateRequest(prompt="hi", request_id="g"), subject="gappy.gen")]
    assert isinstance(events[-1], Error) and events[-1].code == "stream_gap", events[-1]
    assert [e.index for e in events if isinstance(e, TokenChunk)] == [0, 1]  # nothing past the gap, no Final
    assert time.monotonic() - start < 3

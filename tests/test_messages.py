"""Every message round-trips through msgpack and JSON; bad values are refused with an Error naming the field."""

from __future__ import annotations

import math

import msgspec
import pytest

from busserve import messages as m
from busserve.bus import codec
from busserve.errors import MalformedMessage


def _kv_addr() -> m.KVAddress:
    return m.KVAddress(
        engine_id="e1", request_id="r1", transport="shm", start=16, end=40, pages=[3, 9], page_size=16,
        num_layers=2, num_kv_heads=3, head_dim=64, dtype="float32", handle="busserve-e1", pool_pages=128,
    )


SAMPLES: dict[type, msgspec.Struct] = {
    m.SamplingParams: m.SamplingParams(max_tokens=8, temperature=0.5, top_p=0.9, top_k=40, seed=7, stop=["\n"],
                                       stop_token_ids=[2], ignore_eos=True, min_p=0.05),
    m.StreamOptions: m.StreamOptions(include_usage=False, content_type="json"),
    m.ChatMessage: m.ChatMessage(role="user", content="hi"),
    m.GenerateRequest: m.GenerateRequest(request_id="r1", messages=[m.ChatMessage(role="user", content="hi")]),
    m.Cancel: m.Cancel(request_id="r1", reason="bored"),
    m.Resend: m.Resend(request_id="r1", from_index=7),
    m.ResendStream: m.ResendStream(stream_subject="_INBOX.alice.s1", from_index=7),
    m.Usage: m.Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=2),
    m.TokenChunk: m.TokenChunk(request_id="r1", index=0, token_ids=[5, 6], text="ab"),
    m.Final: m.Final(request_id="r1", finish_reason="stop", usage=m.Usage(prompt_tokens=1, completion_tokens=1),
                     stop_reason="\n", engine_id="e1"),
    m.Error: m.Error(code="invalid_request", message="bad", field="sampling.top_p", request_id="r1"),
    m.KVAddress: _kv_addr(),
    m.PrepRecv: m.PrepRecv(request_id="r1", prompt_token_ids=[1, 2, 3], end=2, stream_subject="_INBOX.x",
                           lease_s=5.0, transport="bus", label="client-1", output_offset=1, supervisor="router-0"),
    m.PrepRecvReply: m.PrepRecvReply(request_id="r1", matched=16, kv_addr=_kv_addr()),
    m.RemoteSend: m.RemoteSend(request_id="r1", prompt_token_ids=[1, 2, 3], kv_addr=_kv_addr(), begin=0, end=2),
    m.RemoteSendReply: m.RemoteSendReply(request_id="r1", bytes_sent=10, layers=2, computed_tokens=2,
                                         cached_tokens=0, duration_s=0.1),
    m.StartGenerate: m.StartGenerate(request_id="r1", begin=2),
    m.StartGenerateReply: m.StartGenerateReply(request_id="r1", engine_id="e1"),
    m.Abort: m.Abort(request_id="r1", notify=True, reason="x"),
    m.AbortReply: m.AbortReply(request_id="r1", found=True, notified=False, terminated=True),
    m.Renew: m.Renew(request_id="r1", lease_s=15.0),
    m.RenewReply: m.RenewReply(request_id="r1", lease_s=15.0),
    m.Probe: m.Probe(request_id="r1"),
    m.Migrate: m.Migrate(request_id="r1", phase="resume"),
    m.MigrateReply: m.MigrateReply(request_id="r1", token_ids=[1, 2, 3], end=2, num_output=1, rounds=3,
                                   bytes_sent=4096, copy_s=0.01, stopped_s=0.002),
    m.Drain: m.Drain(grace_s=30.0),
    m.ProbeReply: m.ProbeReply(request_id="r1", state="dropped", num_output=3, reason="fenced"),
    m.StreamStatus: m.StreamStatus(request_id="r1", owner="e1", owner_kind="engine", supervisor="router-0"),
    m.KVChunk: m.KVChunk(request_id="r1", layer=1, begin=0, end=2, data=b"\x00\x01" * 8),
    m.KVCommit: m.KVCommit(request_id="r1", chunks=3, nbytes=99),
    m.KVCommitReply: m.KVCommitReply(request_id="r1", chunks=3),
    m.NvshmemIdRequest: m.NvshmemIdRequest(group="g0", rank=1, world_size=2),
    m.NvshmemId: m.NvshmemId(group="g0", world_size=2, unique_id=bytes(range(128))),
    m.EngineStatus: m.EngineStatus(engine_id="e1", model="smol", roles=["prefill", "decode"], running=1, waiting=2,
                                   parked=0, free_pages=10, total_pages=20, page_size=16, max_model_len=8192,
                                   transports=["shm", "bus"], prefix_hit_rate=0.5),
    m.KVStored: m.KVStored(page_hashes=[1, 2**63], parent_hash=5),
    m.KVRemoved: m.KVRemoved(page_hashes=[1]),
    m.KVCleared: m.KVCleared(),
    m.KVEventBatch: m.KVEventBatch(engine_id="e1", seq=3, events=[m.KVStored(page_hashes=[1]), m.KVCleared()]),
    m.KVSnapshotRequest: m.KVSnapshotRequest(),
    m.RoutedRequest: m.RoutedRequest(request_id="r1", prompt_token_ids=[1, 2], stream_subject="s", params={"f": 0.2}),
    m.StrategyResult: m.StrategyResult(request_id="r1", started_on="e1", touched=["e0", "e1"],
                                       error=m.Error(code="timeout", message="x")),
    m.SetStrategy: m.SetStrategy(name="balanced_pd", params={"f": 0.3, "strict": True, "n": 2, "who": "x"}),
    m.StrategyState: m.StrategyState(name="pd", params={"f": 0.1}, revision=4, updated_by="cli"),
    m.SetRoles: m.SetRoles(engine_id="e1", roles=["decode"]),
    m.RolesState: m.RolesState(engine_id="e1", roles=["prefill"]),
    m.RouterStatus: m.RouterStatus(router_id="r", strategy="pd", in_flight=1),
    m.Ack: m.Ack(detail="ok"),
}


def test_every_message_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(m.ALL_MESSAGES)


@pytest.mark.parametrize("content_type", ["msgpack", "json"])
@pytest.mark.parametrize("tp", m.ALL_MESSAGES, ids=lambda t: t.__name__)
def test_round_trip(tp: type, content_type: codec.ContentType) -> None:
    msg = SAMPLES[tp]
    data = codec.encode(msg, content_type)
    headers = codec.headers_for(content_type)
    assert codec.decode(data, tp, headers) == msg
    # Without the header the encoding is sniffed.
    assert codec.decode(data, tp) == msg


def test_stream_events_decode_by_tag() -> None:
    for event in (SAMPLES[m.TokenChunk], SAMPLES[m.Final], SAMPLES[m.Error]):
        for ct in ("msgpack", "json"):
            assert codec.decode(codec.encode(event, ct), m.StreamEvent) == event  # type: ignore[arg-type]


def _error(data: bytes, tp: type = m.GenerateRequest) -> m.Error:
    with pytest.raises(MalformedMessage) as info:
        codec.decode(data, tp)
    return info.value.error


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b'{"prompt": "x", "sampling": {"temperature": -1}}', "sampling.temperature"),
        (b'{"prompt": "x", "sampling": {"top_p": 0}}', "sampling.top_p"),
        (b'{"prompt": "x", "sampling": {"top_p": 1.5}}', "sampling.top_p"),
        (b'{"prompt": "x", "sampling": {"max_tokens": 0}}', "sampling.max_tokens"),
        (b'{"prompt": "x", "sampling": {"max_tokens": "ten"}}', "sampling.max_tokens"),
        (b'{"prompt": "x", "sampling": {"top_k": -5}}', "sampling.top_k"),
        (b'{"prompt": "x", "sampling": {"stop": [""]}}', "sampling.stop[0]"),
        (b'{"prompt": 5}', "prompt"),
        (b'{"prompt_token_ids": [1, -2]}', "prompt_token_ids[1]"),
        (b'{"prompt_token_ids": []}', "prompt_token_ids"),
        (b'{"prompt": "x", "request_id": "a.b"}', "request_id"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    ],
)
def test_out_of_range_values_name_the_field(payload: bytes, field: str) -> None:
    err = _error(payload)
    assert err.code == "invalid_request"
    assert err.field == field, err


def test_exactly_one_prompt_form() -> None:
    for payload in (b"{}", b'{"prompt": "a", "prompt_token_ids": [1]}'):
        err = _error(payload)
        assert err.code == "invalid_request" and err.field == "prompt"
        assert "exactly one" in err.message


def test_nan_temperature_is_refused_in_msgpack() -> None:
    data = msgspec.msgpack.encode({"prompt": "x", "sampling": {"temperature": math.nan}})
    err = _error(data)
    assert err.field == "sampling.temperature"


def test_malformed_bytes() -> None:
    for data in (b"\xc1\xff\x00", b"{not json", b"", b"\x92\x01"):
        err = _error(data)
        assert err.code in {"malformed", "invalid_request"}, err


def test_unknown_tag_is_refused() -> None:
    err = _error(b'{"type": "launch_missiles", "request_id": "x"}', m.StreamEvent)  # type: ignore[arg-type]
    assert err.code == "invalid_request" and err.field == "type"


def test_unsupported_content_type_header() -> None:
    with pytest.raises(MalformedMessage) as info:
        codec.decode(b"{}", m.GenerateRequest, {"Content-Type": "application/xml"})
    assert "Content-Type" in info.value.error.message


def test_remote_send_begin_after_end() -> None:
    data = codec.encode(SAMPLES[m.RemoteSend])
    raw = msgspec.msgpack.decode(data)
    raw["begin"], raw["end"] = 5, 2
    err = _error(msgspec.msgpack.encode(raw), m.RemoteSend)
    assert err.field == "begin"

"""Generate ``schemas/``: JSON Schema of every message and an AsyncAPI 3 document of every subject.

Both come from the code (``busserve.messages`` and ``busserve.bus.subjects``), so ``busserve schema export``
rewrites them and ``busserve schema export --check`` (run by the tests) fails when the committed files drift.

The text depends on the code alone, never on the msgspec release that renders it: msgspec 0.18 copies docstrings
as written and later releases dedent them, and releases order the members of an ``anyOf`` differently (``T | None``),
so every ``description`` is normalised here (``inspect.cleandoc``), ``anyOf`` members are sorted, and keys are
written sorted.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from busserve import __version__
from busserve import messages as m
from busserve.bus.subjects import Subjects


@dataclass(frozen=True)
class Channel:
    id: str
    address: str
    messages: tuple[type[msgspec.Struct], ...]
    description: str
    # Operation from busserve's side: "receive" (busserve listens) or "send" (busserve publishes).
    action: str
    reply: tuple[type[msgspec.Struct], ...] = ()


def channels(subjects: Subjects | None = None) -> list[Channel]:
    s = subjects or Subjects()
    eid = "{engineId}"
    return [
        Channel("generate", s.generate(), (m.GenerateRequest,),
                "Client requests; routers take them in a queue group. The NATS reply-to is the stream subject, and "
                "the reply is the stream: StreamStatus and TokenChunk events, then exactly one Final or Error.",
                "receive", reply=(m.StreamStatus, m.TokenChunk, m.Final, m.Error)),
        Channel("stream", s.stream("{requestId}"), (m.StreamStatus, m.TokenChunk, m.Final, m.Error),
                "A request's token stream: StreamStatus events (who holds the request), TokenChunk events (check "
                "index: a gap means a lost event — ask for it again on resendAsOwner), then exactly one Final or "
                "Error. Any subject may be used (the "
                "generate request's reply-to); this is the default.", "send"),
        Channel("generateAsOwner", s.generate("{owner}"), (m.GenerateRequest,),
                "The same on a secured server: a client may publish only under its own name (its NATS user) and "
                "the reply-to must lie in its own inbox space, _INBOX.<owner>.>; routers refuse any other.",
                "receive", reply=(m.StreamStatus, m.TokenChunk, m.Final, m.Error)),
        Channel("cancel", s.cancel(), (m.Cancel,),
                "Cancel a request: clients on an open server; on a secured one only routers publish here (by the "
                "router's id for the request), engines listen.", "receive"),
        Channel("cancelAsOwner", s.cancel("{owner}"), (m.Cancel,),
                "A client's cancel on a secured server, under its own name: it counts for its own requests only.",
                "receive"),
        Channel("resendAsOwner", s.resend("{owner}"), (m.Resend,),
                "A client that missed events of its stream (a TokenChunk index past the one it expected, or its "
                "connection back from an outage) asks for them again from from_index; the router that knows the "
                "request relays to the engines, and the one that ran it publishes the stream again from there "
                "(kept 60 s after the end). Skip a TokenChunk that ends at or before the index you expect. On an "
                "open server the bare subject below carries it.", "receive"),
        Channel("resend", s.resend(), (m.Resend, m.ResendStream),
                "Open servers: clients' Resend. Everywhere: a router's ResendStream to the engines (by stream "
                "subject).", "receive"),
        Channel("strategy", s.strategy("{strategyName}"), (m.RoutedRequest, m.Ack),
                "Requests forwarded by a router to a strategy running as its own process (queue group); an Ack "
                "is a ping, answered at once.", "send", reply=(m.StrategyResult, m.Ack, m.Error)),
        Channel("controlStrategy", s.control_strategy(), (m.SetStrategy,),
                "Switch the active strategy while serving; a router replies with the stored state.", "receive",
                reply=(m.StrategyState, m.Error)),
        Channel("engineGenerate", s.engine_action(eid, "generate"), (m.GenerateRequest,),
                "Data-parallel path: the engine runs the whole request and streams to the reply-to.", "receive"),
        Channel("enginePrepRecv", s.engine_action(eid, "prep_recv"), (m.PrepRecv,),
                "Match a cached prefix of prompt[:end], reserve KV slots for the rest, park the request.", "receive",
                reply=(m.PrepRecvReply, m.Error)),
        Channel("engineRemoteSend", s.engine_action(eid, "remote_send"), (m.RemoteSend,),
                "Compute the KV of prompt[:end] and write [begin, end) into the receiver's slots, layer by layer; "
                "replies once every byte has landed.", "receive", reply=(m.RemoteSendReply, m.Error)),
        Channel("engineStartGenerate", s.engine_action(eid, "start_generate"), (m.StartGenerate,),
                "Prefill prompt[begin:] on top of the received KV, then decode to the stream subject.", "receive",
                reply=(m.StartGenerateReply, m.Error)),
        Channel("engineAbort", s.engine_action(eid, "abort"), (m.Abort,),
                "Drop a request on this engine and give its pages back.", "receive", reply=(m.AbortReply, m.Error)),
        Channel("engineRenew", s.engine_action(eid, "renew"), (m.Renew,),
                "Extend the lease of a parked request while its strategy still works on it.", "receive",
                reply=(m.RenewReply, m.Error)),
        Channel("engineProbe", s.engine_action(eid, "probe"), (m.Probe,),
                "What the engine knows of a request: queued, running, parked, sending, ended or dropped.",
                "receive", reply=(m.ProbeReply, m.Error)),
        Channel("engineMigrate", s.engine_action(eid, "migrate"), (m.Migrate,),
                "Live migration of a running request: copy its KV to the target's reservation in rounds while it "
                "decodes, stop it for the last round and reply with its tokens; then release (drop it here) or "
                "resume (decode on here).", "receive", reply=(m.MigrateReply, m.Error)),
        Channel("engineDrain", s.engine_action(eid, "drain"), (m.Drain,),
                "Take no new work, say draining in heartbeats (routers move the running requests elsewhere), stop "
                "once nothing is held or after grace_s.", "receive", reply=(m.EngineStatus, m.Error)),
        Channel("engineSetRoles", s.engine_action(eid, "set_roles"), (m.SetRoles,),
                "Change the engine's roles (prefill, decode) while serving.", "receive",
                reply=(m.RolesState, m.Error)),
        Channel("engineKVSnapshot", s.engine_action(eid, "kv_snapshot"), (m.KVSnapshotRequest,),
                "Every page hash in the engine's prefix cache, with the KV-event seq it reflects.", "receive",
                reply=(m.KVEventBatch, m.Error)),
        Channel("enginesStatus", s.engines_status(), (m.EngineStatus,), "Engine heartbeats.", "send"),
        Channel("engineKVEvents", s.engine_kv_events(eid), (m.KVEventBatch,),
                "Prefix-cache changes of one engine, as chained page hashes.", "send"),
        Channel("kvData", s.kv_data(eid), (m.KVChunk, m.KVCommit),
                "KV data for an engine's reserved slots when the transport is the bus.", "receive",
                reply=(m.KVCommitReply, m.Error)),
        Channel("nvshmemBootstrap", s.nvshmem_bootstrap("{group}"), (m.NvshmemIdRequest,),
                "GPU engines of one NVSHMEM group fetch the group's unique id from rank 0 before nvshmem init.",
                "receive", reply=(m.NvshmemId, m.Error)),
        Channel("routersStatus", s.routers_status(), (m.RouterStatus,), "Router heartbeats.", "send"),
        Channel("routerPing", s.router_ping("{routerId}"), (m.Ack,),
                "Answered by the router serving under this id; a router asks before it takes the id (no responders: "
                "the id is free).", "receive", reply=(m.Ack,)),
    ]


def normalised(node: Any) -> Any:
    """``node`` with every ``description`` cleaned as ``inspect.cleandoc`` does and every ``anyOf`` in one order
    (the same under any msgspec; neither changes what the schema means)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "description" and isinstance(v, str):
                out[k] = inspect.cleandoc(v)
            elif k == "anyOf" and isinstance(v, list):
                out[k] = sorted((normalised(x) for x in v), key=lambda x: json.dumps(x, sort_keys=True))
            else:
                out[k] = normalised(v)
        return out
    if isinstance(node, list):
        return [normalised(v) for v in node]
    return node


def _components(ref_template: str) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(m.ALL_MESSAGES, ref_template=ref_template)
    return normalised(components)  # type: ignore[no-any-return]


def json_schema() -> dict[str, Any]:
    components = _components("#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://busserve.dev/schemas/messages.schema.json",
        "title": "busserve messages",
        "description": "Every message busserve puts on NATS. msgpack on the wire by default; JSON accepted "
        "(Content-Type: application/json). Generated by `busserve schema export`.",
        "oneOf": [{"$ref": f"#/$defs/{t.__name__}"} for t in m.ALL_MESSAGES],
        "$defs": components,
    }


def asyncapi(subjects: Subjects | None = None) -> dict[str, Any]:
    components = _components("#/components/schemas/{name}")
    chans: dict[str, Any] = {}
    ops: dict[str, Any] = {}
    msgs: dict[str, Any] = {}
    for ch in channels(subjects):
        params = {
            token.strip("{}"): {"description": f"{token.strip('{}')} (a subject token)"}
            for token in ch.address.split(".")
            if token.startswith("{")
        }
        entry: dict[str, Any] = {
            "address": ch.address,
            "description": ch.description,
            "messages": {t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in ch.messages},
        }
        if params:
            entry["parameters"] = params
        chans[ch.id] = entry
        op: dict[str, Any] = {
            "action": ch.action,
            "channel": {"$ref": f"#/channels/{ch.id}"},
            "summary": ch.description.split(";")[0].split(". ")[0],
        }
        if ch.reply:
            op["reply"] = {
                "description": "Sent to the request's NATS reply-to (inbox).",
                "messages": [{"$ref": f"#/components/messages/{t.__name__}"} for t in ch.reply],
            }
        ops[f"{ch.action}{ch.id[0].upper()}{ch.id[1:]}"] = op
        for t in ch.messages + ch.reply:
            msgs[t.__name__] = {
                "name": t.__name__,
                "title": t.__name__,
                "summary": inspect.cleandoc(t.__doc__ or t.__name__).splitlines()[0],
                "payload": {"$ref": f"#/components/schemas/{t.__name__}"},
                "headers": {
                    "type": "object",
                    "properties": {
                        "Content-Type": {"type": "string", "enum": ["application/msgpack", "application/json"]},
                        "traceparent": {"type": "string", "description": "W3C trace context"},
                        "tracestate": {"type": "string"},
                    },
                },
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "busserve",
            "version": __version__,
            "description": "LLM microserving over NATS: routers and engines exchange these messages only.",
        },
        "defaultContentType": "application/msgpack",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "busserve up"}},
        "channels": chans,
        "operations": ops,
        "components": {"schemas": components, "messages": dict(sorted(msgs.items()))},
    }


def rendered() -> dict[str, str]:
    """File name → content, exactly as committed."""

    def dump(obj: Any) -> str:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"

    return {"messages.schema.json": dump(json_schema()), "asyncapi.json": dump(asyncapi())}


def export(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered().items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written


def stale_files(out_dir: Path) -> list[str]:
    """Names of files in ``out_dir`` that differ from what the code generates."""
    stale = []
    for name, text in rendered().items():
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    return stale

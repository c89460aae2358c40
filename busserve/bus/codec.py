"""Encoding of messages on the wire: msgpack by default, JSON accepted, chosen by a Content-Type header.

A message without the header is sniffed: every busserve message is a map, so a payload starting with ``{`` (which
in msgpack would be the bare integer 123) is JSON and anything else msgpack. This lets a plain client in any
language publish JSON without knowing about headers. Replies and stream events go out in the encoding the
request came in, unless the request says otherwise.

Encoders and decoders are built once per type; decoding is validation (see ``busserve.messages``), and every
failure surfaces as :class:`busserve.errors.MalformedMessage` carrying an :class:`Error` that names the field.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal, TypeVar

import msgspec

from busserve.errors import MalformedMessage
from busserve.messages import error_from_exception

ContentType = Literal["msgpack", "json"]
CONTENT_TYPE_HEADER = "Content-Type"
MIME: dict[ContentType, str] = {"msgpack": "application/msgpack", "json": "application/json"}
_FROM_MIME: dict[str, ContentType] = {
    "application/msgpack": "msgpack",
    "application/x-msgpack": "msgpack",
    "application/vnd.msgpack": "msgpack",
    "application/json": "json",
    "text/json": "json",
}

T = TypeVar("T")

_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()


@cache
def _msgpack_decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(tp)


@cache
def _json_decoder(tp: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(tp)


def content_type_of(data: bytes, headers: dict[str, str] | None) -> ContentType:
    """The payload's encoding: the header if present (case-insensitive), else sniffed."""
    if headers:
        for key, value in headers.items():
            if key.lower() == "content-type":
                mime = value.split(";", 1)[0].strip().lower()
                found = _FROM_MIME.get(mime)
                if found is None:
                    raise MalformedMessage.of(f"unsupported Content-Type {value!r}; use application/msgpack or json")
                return found
    stripped = data.lstrip(b" \t\r\n")
    return "json" if stripped[:1] == b"{" else "msgpack"


def encode(msg: Any, content_type: ContentType = "msgpack") -> bytes:
    if content_type == "json":
        return _json_encoder.encode(msg)
    return _msgpack_encoder.encode(msg)


def headers_for(content_type: ContentType, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {CONTENT_TYPE_HEADER: MIME[content_type]}
    if extra:
        headers.update(extra)
    return headers


def decode(data: bytes, tp: type[T] | Any, headers: dict[str, str] | None = None) -> T:
    """Decode ``data`` as ``tp``; raise MalformedMessage (with an Error naming the field) on any failure."""
    content_type = content_type_of(data, headers)
    decoder = _json_decoder(tp) if content_type == "json" else _msgpack_decoder(tp)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise MalformedMessage(error_from_exception(exc)) from exc

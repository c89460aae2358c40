"""A request as a strategy sees it: tokenized, with its sampling settings, its stream subject and a record of which
engines it touched (so that the router can clean up after a failed or cancelled strategy)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from busserve.bus.codec import ContentType
from busserve.messages import SamplingParams, StreamOptions


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stream_subject: str
    stream: StreamOptions = field(default_factory=StreamOptions)
    content_type: ContentType = "msgpack"
    model: str = ""
    arrival: float = field(default_factory=time.monotonic)
    # Filled in as the strategy runs.
    touched: set[str] = field(default_factory=set)  # engines that may hold state for this request
    assigned: set[str] = field(default_factory=set)  # engines whose load this request counts toward
    prefill_charge: dict[str, int] = field(default_factory=dict)  # engine -> prompt tokens it still has to compute
    decoding_on: str | None = None
    started_on: str | None = None  # the engine that accepted start_generate (it owns the terminal event)
    start_pending: str | None = None  # start_generate sent to this engine, reply not seen yet
    strategy: str = ""
    operation: str = "text_completion"  # "chat" when the client sent messages (GenAI conventions)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

"""A request as a strategy sees it: tokenized, with its sampling settings, its stream subject and a record of which
engines it touched (so that the router can clean up after a failed or cancelled strategy).

Ids: ``label`` is the client's request id — what stream events carry and what a client's Cancel names. Engines know
the request by ``request_id``, which the router assigns (unique, whatever clients send) and changes for every
attempt: a resumption, or a fallback after a lost sender, is a new attempt, so that an engine that dropped an
earlier one refuses nothing of the next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from busserve.bus.codec import ContentType
from busserve.kv.page_hash import prefix_page_hashes
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
    label: str = ""  # the client's id (defaults to request_id)
    owner: str = ""  # who sent it (the identity in its subject on a secured server): only the owner cancels it
    supervisor: str = ""  # the router that owns the request until an engine starts it, and resumes it after
    engine_hint: str = ""  # run on this engine if it is up (GenerateRequest.engine_hint), bypassing the strategy
    output_offset: int = 0  # the last output_offset tokens of prompt_token_ids were streamed already (resumed)
    base_id: str = ""  # request_id of the first attempt
    attempt: int = 0
    # Attempt numbers handed out so far, shared by every attempt of the request (``replace`` keeps the reference):
    # an attempt that failed halfway (a migration called off) never lends its id to the next.
    tries: list[int] = field(default_factory=lambda: [0])
    # Filled in as the strategy runs.
    touched: set[str] = field(default_factory=set)  # engines that may hold state for this request
    senders: set[str] = field(default_factory=set)  # engines asked to remote_send (stopped first on cleanup)
    parked_on: set[str] = field(default_factory=set)  # engines holding a receive (leases renewed meanwhile)
    assigned: set[str] = field(default_factory=set)  # engines whose load this request counts toward
    prefill_charge: dict[str, int] = field(default_factory=dict)  # engine -> prompt tokens it still has to compute
    decoding_on: str | None = None
    started_on: str | None = None  # the engine that accepted start_generate (it owns the terminal event)
    start_pending: str | None = None  # start_generate sent to this engine, reply not seen yet
    strategy: str = ""
    operation: str = "text_completion"  # "chat" when the client sent messages (GenAI conventions)
    # The prompt's chained page hashes per page size, computed once however many engines weigh the request (the
    # prompt of a Request never changes; a new attempt is a new Request with its own).
    hashes: dict[int, list[int]] = field(default_factory=dict, repr=False)
    # The last cached-prefix walk of the cluster's index for this request: (index, its version, engine → tokens).
    prefix_memo: tuple[Any, int, dict[str, int]] | None = field(default=None, repr=False)
    groups_memo: tuple[Any, int, list[tuple[int, set[str]]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.label = self.label or self.request_id
        self.base_id = self.base_id or self.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def page_hashes(self, page_size: int) -> list[int]:
        """Hashes of the prompt's full pages (``busserve.kv.page_hash``), computed on first use."""
        got = self.hashes.get(page_size)
        if got is None:
            got = self.hashes[page_size] = prefix_page_hashes(self.prompt_token_ids, page_size)
        return got

    def renumber(self) -> None:
        """Go on under a fresh engine-side id, in place, forgetting the engines touched so far (the caller has
        aborted them): what a strategy does to start over after a lost sender."""
        self.tries[0] += 1
        self.attempt = self.tries[0]
        self.request_id = f"{self.base_id}:{self.attempt}"
        self.touched, self.senders, self.parked_on = set(), set(), set()
        self.started_on = self.start_pending = None

    def next_attempt(self, streamed: list[int] | None = None) -> Request:
        """The same request under a fresh engine-side id, with no engine touched yet. ``streamed``: output tokens
        the client has already seen; the new attempt computes them as prompt and streams on after them."""
        self.tries[0] += 1
        n = self.tries[0]
        prompt = self.prompt_token_ids[: self.prompt_len - self.output_offset]
        out = list(streamed) if streamed is not None else list(self.prompt_token_ids[len(prompt):])
        return replace(self, request_id=f"{self.base_id}:{n}", attempt=n, prompt_token_ids=prompt + out,
                       output_offset=len(out), touched=set(), senders=set(), parked_on=set(), assigned=set(),
                       prefill_charge={}, decoding_on=None, started_on=None, start_pending=None, hashes={},
                       prefix_memo=None, groups_memo=None)

"""One request's state inside an engine. Plain Python.

A sequence is either a GENERATE sequence (prefill, then sample until a stop) or a SEND sequence (the sender side
of remote_send: prefill ``prompt[:target]`` without sampling, its KV shipped to another engine as it is computed).

Token accounting: ``token_ids`` is the prompt followed by the sampled tokens. The KV of ``token_ids[:num_computed]``
is in ``pages`` (``num_cached`` of those tokens came from the prefix cache or from another engine). A decoding
sequence always has exactly one token — the last one sampled — whose KV is not computed yet.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class SeqKind(enum.Enum):
    GENERATE = "generate"
    SEND = "send"


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"  # prep_recv: pages reserved, waiting for start_generate
    FROZEN = "frozen"  # live migration: stopped (pages kept) while its last KV moves to another engine
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    kind: SeqKind = SeqKind.GENERATE
    max_tokens: int = 16
    target: int = 0  # SEND: compute token_ids[:target]
    prompt_len: int = 0
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0
    status: SeqStatus = SeqStatus.WAITING
    arrival: float = field(default_factory=time.monotonic)
    prompt_cached: bool = False  # the prompt's full pages were offered to the prefix cache
    lease_deadline: float = 0.0  # PARKED only
    parked_end: int = 0  # PARKED: the ``end`` of prep_recv
    num_preemptions: int = 0
    prefill_chunk: int = 0  # start_generate's cap on prompt tokens per step beside decoders; 0: none
    # Engine-side state (sampler settings, detokenizer, stream subject, transfer plan). Opaque here.
    ctx: Any = None

    def __post_init__(self) -> None:
        if not self.prompt_len:
            self.prompt_len = len(self.token_ids)

    @property
    def key(self) -> tuple[str, SeqKind]:
        """Where the scheduler files it: an engine may hold a request's SEND and GENERATE sequences at once."""
        return (self.request_id, self.kind)

    @property
    def compute_target(self) -> int:
        return self.target if self.kind is SeqKind.SEND else len(self.token_ids)

    @property
    def remaining(self) -> int:
        return self.compute_target - self.num_computed

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

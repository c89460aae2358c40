"""What the parts of the engine around the step loop may use of the engine core: the protocol
(``subrequests.py``) and live migration (``migration.py``) reach the core only through this."""

from __future__ import annotations

from typing import Protocol

from busserve.bus.codec import ContentType
from busserve.engine.outputs import StreamWriter
from busserve.engine.requests import Command, GenerateCtx, Outbound
from busserve.engine.scheduler import Scheduler
from busserve.engine.sequence import Sequence
from busserve.messages import Error, SamplingParams


class EngineOps(Protocol):
    """What the protocol may use of the engine core."""

    engine_id: str
    model_name: str
    scheduler: Scheduler
    outputs: StreamWriter
    max_queued: int
    max_model_len: int

    def generate_ctx(self, *, stream_subject: str, content_type: ContentType, include_usage: bool,
                     sampling: SamplingParams, trace: object, label: str, supervisor: str = "",
                     output_offset: int = 0, streamed: list[int] | None = None) -> GenerateCtx: ...

    def check_prompt(self, request_id: str, n: int) -> Error | None: ...

    def finish(self, seq: Sequence, outcome: str, *, hold: bool = False) -> None: ...

    def submit(self, cmd: Command) -> None: ...

    def emit(self, outs: list[Outbound]) -> None: ...

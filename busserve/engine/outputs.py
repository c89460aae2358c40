"""A request's stream as the engine writes it: a status event, TokenChunks in order, then exactly one terminal.

Every event an engine puts on a client's stream is built here, and ``StreamWriter.end`` is the only way an engine
ends a stream; it remembers which requests it ended and how (``ended``), so that an abort or a probe arriving later
can say "already ended" instead of ending it again. Token by token: the stop token ids and EOS, then the
detokenizer (which holds back text that could still become a stop string), then ``max_tokens`` and the context
limit. Indices and usage count the output another engine streamed before this one took over (``output_offset``).
"""

from __future__ import annotations

from collections.abc import Iterable

from busserve.engine.requests import GenerateCtx, Memory, Outbound, gen_ctx
from busserve.engine.sequence import Sequence
from busserve.messages import Error, Final, FinishReason, StreamStatus, TokenChunk, TokenLogprob, Usage


class StreamWriter:
    def __init__(self, engine_id: str, eos_token_ids: Iterable[int], max_model_len: int,
                 heartbeat_s: float = 1.0) -> None:
        self.engine_id = engine_id
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.heartbeat_s = heartbeat_s
        self.ended = Memory()  # request id -> "final" | "error"

    @staticmethod
    def _out(ctx: GenerateCtx, seq: Sequence, msg: object) -> Outbound:
        return Outbound(ctx.stream_subject, msg, ctx.content_type, supervised=ctx.supervised)

    def started(self, seq: Sequence, out: list[Outbound]) -> None:
        """The engine holds the request now (before its first token), supervised by ``ctx.supervisor``."""
        ctx = gen_ctx(seq)
        out.append(self._out(ctx, seq, StreamStatus(request_id=ctx.label, owner=self.engine_id,
                                                     owner_kind="engine", supervisor=ctx.supervisor,
                                                     heartbeat_s=self.heartbeat_s)))

    def token(self, seq: Sequence, tok: int, out: list[Outbound], logprob: TokenLogprob | None = None
              ) -> FinishReason | None:
        """Append a sampled token, stream it, and end the stream if it finished the request (returns why)."""
        ctx = gen_ctx(seq)
        seq.token_ids.append(tok)
        finish: FinishReason | None = None
        stop_reason: str | int | None = None
        text = ""
        if tok in ctx.stop_token_ids:
            finish, stop_reason = "stop", tok
        elif not ctx.ignore_eos and tok in self.eos_token_ids:
            finish = "stop"
        else:
            text = ctx.detok.push(tok)
            if ctx.detok.stopped_by is not None:
                finish, stop_reason = "stop", ctx.detok.stopped_by
        if finish is None and ctx.grammar is not None and ctx.grammar.is_stopped():
            finish = "stop"  # the structured output is complete
        index = ctx.output_offset + seq.num_output - 1
        if finish is None and (index + 1 >= ctx.max_tokens or len(seq.token_ids) >= self.max_model_len):
            finish = "length"
        if finish is not None:
            text += ctx.detok.flush()
        out.append(self._out(ctx, seq, TokenChunk(request_id=ctx.label, index=index, token_ids=[tok], text=text,
                                                       logprobs=None if logprob is None else [logprob])))
        if finish is not None:
            self.end(seq, Final(request_id=ctx.label, finish_reason=finish, usage=self.usage(seq),
                                stop_reason=stop_reason, engine_id=self.engine_id), out)
        return finish

    def final(self, seq: Sequence, reason: FinishReason, out: list[Outbound], stop_reason: str | None = None) -> None:
        ctx = gen_ctx(seq)
        self.end(seq, Final(request_id=ctx.label, finish_reason=reason, usage=self.usage(seq),
                            stop_reason=stop_reason, engine_id=self.engine_id), out)

    def error(self, seq: Sequence, error: Error, out: list[Outbound]) -> None:
        ctx = gen_ctx(seq)
        error.request_id = ctx.label
        self.end(seq, error, out)

    def end(self, seq: Sequence, event: Final | Error, out: list[Outbound]) -> None:
        """The one place an engine ends a stream."""
        ctx = gen_ctx(seq)
        if ctx.ended:
            return
        ctx.ended = True
        self.ended.add(seq.request_id, "final" if isinstance(event, Final) else "error")
        if isinstance(event, Final) and not ctx.include_usage:
            event.usage = None
        out.append(self._out(ctx, seq, event))

    @staticmethod
    def usage(seq: Sequence) -> Usage:
        ctx = gen_ctx(seq)
        return Usage(prompt_tokens=seq.prompt_len - ctx.output_offset,
                     completion_tokens=ctx.output_offset + seq.num_output, cached_tokens=ctx.cached_tokens)

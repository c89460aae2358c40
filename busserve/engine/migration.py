"""Live migration, on the source engine: a running request's KV moves to another engine while it keeps decoding.

The life of one migration (the router drives it; ``router/migration.py``):

 1. The router reserves room on the target (prep_recv with ``migration``: the tokens so far, and an ``end`` with
    headroom for the tokens decoded meanwhile) and sends ``Migrate(start)`` here with the target's ``kv_addr``.
 2. **Rounds.** After each step, if the previous round has landed, the positions computed since are queued for the
    transfer thread (all layers) — the request decodes on meanwhile, each round shorter than the one before.
 3. **The last round.** Once at most ``final_tokens`` positions are left uncopied (or after ``max_rounds``), the
    request is *frozen*: out of the batch, pages kept, nothing more on its stream. The rest is copied, the writer
    commits, and the reply — sent only after every event the request put on its stream has gone out — carries its
    tokens and how far its KV landed.
 4. The router starts it on the target (``start_generate`` with ``extend``), which streams on at the next index,
    then ``Migrate(release)`` drops it here. If the target failed, ``Migrate(resume)`` thaws it: it decodes here on.

A migration ends without harm whenever the request does (it finished, was cancelled or fenced): the reply is an
Error and the router aborts the target's reservation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from busserve.engine.ops import EngineOps
from busserve.engine.requests import ActionCmd, Memory, MigrationCmd, Outbound, Reply, gen_ctx
from busserve.engine.scheduler import Scheduler
from busserve.engine.sequence import SeqStatus, Sequence
from busserve.kv.storage import KVStorage
from busserve.kv.transfer.base import KVTransport, KVWriter, TransferError
from busserve.messages import Error, Migrate, MigrateReply

log = logging.getLogger(__name__)

# How long a request stays stopped after its migration reply without a release or resume (the router's
# start_generate on the target is bounded by 10 s; this is well past it).
FROZEN_LIMIT_S = 60.0


@dataclass
class _Migration:
    seq: Sequence
    writer: KVWriter
    reserved_end: int
    final_tokens: int
    max_rounds: int
    reply: Reply
    copied: int  # positions [0, copied) are on the target (or queued to it)
    rounds: int = 0
    in_flight: bool = False
    started: float = field(default_factory=time.monotonic)
    frozen_at: float = 0.0


class Migrations:
    """The source side of live migrations on one engine (state owned by the compute thread)."""

    def __init__(self, ops: EngineOps, kv: KVStorage, transports: dict[str, KVTransport], dropped: Memory) -> None:
        self.ops = ops
        self.kv = kv
        self.transports = transports
        self.dropped = dropped
        self.active: dict[str, _Migration] = {}
        self.cancelled: dict[str, str] = {}  # frozen requests a client cancelled: ended if they thaw here
        self.stopped_since: dict[str, float] = {}  # frozen requests whose reply went out: waiting for release/resume

    @property
    def engine_id(self) -> str:
        return self.ops.engine_id

    @property
    def scheduler(self) -> Scheduler:
        return self.ops.scheduler

    def apply(self, msg: Migrate, cmd: ActionCmd) -> MigrateReply | Error | None:
        """A ``Migrate`` action; None when the reply comes later (``start``)."""
        rid = msg.request_id
        if msg.phase == "release":
            seq = self.scheduler.frozen.get(rid)
            if seq is None:
                return Error(code="unknown_request", request_id=rid, message=f"no migrated request {rid} here")
            n = gen_ctx(seq).output_offset + seq.num_output
            self.cancelled.pop(rid, None)  # the cancel reached the target too: it ends the request there
            self.stopped_since.pop(rid, None)
            self.ops.finish(seq, "migrated")
            self.dropped.add(rid, "migrated")
            return MigrateReply(request_id=rid, token_ids=[], end=0, num_output=n)
        if msg.phase == "resume":
            if rid in self.active:  # the router gave up waiting for the copy: call it off
                self._fail(rid, "called off by the router")
            seq = self.scheduler.frozen.get(rid)
            if seq is None:
                return Error(code="unknown_request", request_id=rid, message=f"no stopped request {rid} here")
            self.stopped_since.pop(rid, None)
            self.scheduler.thaw(seq)
            log.info("migration of %s called off: it decodes on here", rid)
            self._end_if_cancelled(seq)
            return MigrateReply(request_id=rid, token_ids=list(seq.token_ids), end=seq.num_computed,
                                num_output=gen_ctx(seq).output_offset + seq.num_output)
        return self._start(msg, cmd)

    def _start(self, msg: Migrate, cmd: ActionCmd) -> Error | None:
        rid = msg.request_id
        seq = self.scheduler.get(rid)
        if seq is None or seq.status is not SeqStatus.RUNNING or seq.is_prefill:
            state = "not here" if seq is None else ("prefilling" if seq.is_prefill else seq.status.value)
            return Error(code="conflict", request_id=rid,
                         message=f"request {rid} cannot migrate from engine {self.engine_id}: {state} (only a "
                                 "decoding request moves; the router resumes the others elsewhere)")
        if rid in self.active:
            return Error(code="conflict", request_id=rid, message=f"request {rid} is migrating already")
        addr = msg.kv_addr
        if addr is None or (addr.start > 0 and addr.start % addr.page_size):
            return Error(code="invalid_request", field="kv_addr", request_id=rid, message="a migration needs a kv_addr")
        transport = self.transports.get(addr.transport)
        if transport is None:
            return Error(code="invalid_request", field="kv_addr.transport", request_id=rid,
                         message=f"engine {self.engine_id} cannot send over {addr.transport!r}")
        if seq.num_computed > addr.end:
            return Error(code="invalid_request", field="kv_addr.end", request_id=rid,
                         message=f"the target reserved {addr.end} positions; the request has {seq.num_computed}")
        try:
            writer = transport.open_writer(addr, self.kv)
        except TransferError as exc:
            return Error(code="transfer_failed", field="kv_addr", message=str(exc), request_id=rid)
        self.active[rid] = _Migration(seq=seq, writer=writer, reserved_end=addr.end, final_tokens=msg.final_tokens,
                                      max_rounds=msg.max_rounds, reply=cmd.reply, copied=addr.start)
        self.advance()
        return None

    # ------------------------------------------------------------------ rounds (after every step)

    def advance(self) -> None:
        for rid, m in list(self.active.items()):
            if m.in_flight or m.frozen_at:
                continue
            seq = m.seq
            if seq.status is SeqStatus.WAITING:  # preempted: its pages went back, what they held is no longer its
                self._fail(rid, "the request was preempted")
                continue
            if seq.status is not SeqStatus.RUNNING:
                continue  # finished or cancelled meanwhile: ``ended`` takes care of it
            computed = seq.num_computed
            if computed + 1 > m.reserved_end:
                self._fail(rid, f"the request outgrew the target's reservation ({m.reserved_end} positions)")
                continue
            last = computed - m.copied <= m.final_tokens or m.rounds + 1 >= m.max_rounds
            if last:
                self.scheduler.freeze(seq)
                m.frozen_at = time.monotonic()
            self._queue(m, computed, final=last)

    def _queue(self, m: _Migration, upto: int, *, final: bool) -> None:
        pages = list(m.seq.pages)
        if upto > m.copied:
            for layer in range(self.kv.layout.num_layers):
                m.writer.write(layer, pages, m.copied, upto)
        m.copied = upto
        m.rounds += 1
        m.in_flight = True
        rid = m.seq.request_id
        if final:
            m.writer.finish(lambda err, nbytes, rid=rid: self.ops.submit(MigrationCmd(rid, True, err)))
        else:
            # The transfer thread runs writes in order: this marker runs once the round has landed.
            m.writer.after_queued(lambda rid=rid: self.ops.submit(MigrationCmd(rid, False)))

    def landed(self, cmd: MigrationCmd) -> None:
        m = self.active.get(cmd.request_id)
        if m is None:
            return
        m.in_flight = False
        if not cmd.final:
            return
        del self.active[cmd.request_id]
        seq = m.seq
        if cmd.error is not None:
            if seq.status is SeqStatus.FROZEN:
                self.scheduler.thaw(seq)
                self._end_if_cancelled(seq)
            m.reply(Error(code="transfer_failed", request_id=cmd.request_id,
                          message=f"migration failed, the request decodes on here: {cmd.error}"))
            return
        if seq.status is not SeqStatus.FROZEN:
            m.reply(Error(code="conflict", request_id=cmd.request_id, message="the request ended meanwhile"))
            return
        now = time.monotonic()
        self.stopped_since[cmd.request_id] = now
        m.reply(MigrateReply(request_id=cmd.request_id, token_ids=list(seq.token_ids), end=m.copied,
                             num_output=gen_ctx(seq).output_offset + seq.num_output, rounds=m.rounds,
                             bytes_sent=m.writer.bytes_written, copy_s=now - m.started, stopped_s=now - m.frozen_at))

    def expire(self, now: float) -> None:
        """A stopped request whose router said neither release nor resume within ``FROZEN_LIMIT_S`` (it died, or
        the message was lost) is dropped here without a stream event: either the target started it and streams on,
        or the target's reservation lapses with an Error on the stream — one terminal event either way, where
        decoding on here could follow the target's."""
        for rid, since in list(self.stopped_since.items()):
            seq = self.scheduler.frozen.get(rid)
            if seq is None:
                del self.stopped_since[rid]
            elif now - since > FROZEN_LIMIT_S:
                del self.stopped_since[rid]
                self.cancelled.pop(rid, None)
                log.warning("migrated request %s was neither released nor resumed in %gs: dropped here", rid,
                            FROZEN_LIMIT_S)
                self.ops.finish(seq, "migrated")
                self.dropped.add(rid, "migrated (no release came)")

    def cancel_frozen(self, seq: Sequence, reason: str) -> None:
        """A client cancelled a request that is stopped here for its migration: the engine it runs on next ends it
        (the target, which hears the same cancel; or this one, if the migration is called off)."""
        self.cancelled[seq.request_id] = reason

    def _end_if_cancelled(self, seq: Sequence) -> None:
        reason = self.cancelled.pop(seq.request_id, None)
        if reason is None:
            return
        out: list[Outbound] = []
        self.ops.outputs.final(seq, "cancelled", out, stop_reason=reason)
        self.ops.finish(seq, "cancelled")
        self.dropped.add(seq.request_id, f"cancelled: {reason}")
        self.ops.emit(out)

    def ended(self, seq: Sequence, why: str) -> None:
        """The request ended here (finished, cancelled, fenced) while migrating: the migration fails."""
        m = self.active.pop(seq.request_id, None)
        if m is None:
            return
        m.writer.abort(why)
        m.writer.finish(lambda err, nbytes: None)  # drain, then tell the target the writes are over
        m.reply(Error(code="conflict", request_id=seq.request_id, message=f"the request ended during migration: {why}"))

    def _fail(self, rid: str, why: str) -> None:
        m = self.active.pop(rid)
        m.writer.abort(why)
        m.writer.finish(lambda err, nbytes: None)
        m.reply(Error(code="transfer_failed", request_id=rid, message=f"migration called off: {why}"))

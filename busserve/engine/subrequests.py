"""The sub-request protocol on one engine: prep_recv, remote_send, start_generate, abort, renew and probe.

It owns the state between a router's actions — parked receives with their leases, the sender side of transfers,
pages kept in quarantine, and the memory of requests that ended here — and reaches the engine core only through
:class:`EngineOps` (the scheduler, the stream writer, ``finish`` to remove a sequence, ``submit`` to queue a
command). The life of one request through it, receiver R and sender S:

 1. **prep_recv on R**: match R's cached prefix of ``prompt[:end]``, reserve pages for the rest, park the request.
    The router owns it now; the lease (renewed by the router while its strategy works) bounds how long R keeps
    it, and the write window (``KVAddress.expires_at``) how long any sender may write into the reservation.
 2. **remote_send on S**: a SEND sequence computes ``prompt[:end]`` (or finds it in S's cache); after each layer
    of each step its new KV goes to R through the transport, the rest when it is all computed; S replies once R
    has it all (``SendDoneCmd``).
 3. **start_generate on R**: ``begin`` must equal prep_recv's ``end``; the request joins the queue with
    ``[0, begin)`` computed and R owns its stream from here (``outputs.StreamWriter``).
 4. **Ends before 3** — abort, a client's cancel, the lease running out, or a fence — drop the receive. Only a
    lapsed lease puts an event on the stream (an Error: the router that should have started it is gone); the rest
    leave the stream to the router. Pages a sender may still be writing (shm) stay in quarantine until the router
    says every sender stopped (``Abort.sender_stopped``), the sender's process is gone, or the write window ends.

Requests that ended here are remembered (bounded) so that later actions for them are refused and ``probe`` can
say what became of them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from busserve.engine.migration import Migrations
from busserve.engine.ops import EngineOps
from busserve.engine.requests import ActionCmd, Memory, Outbound, SendCtx, SendDoneCmd, gen_ctx
from busserve.engine.scheduler import DuplicateRequest, NeverFits, Scheduler
from busserve.engine.sequence import SeqKind, SeqStatus, Sequence
from busserve.kv.pool import OutOfPages
from busserve.kv.storage import KVStorage, dtype_name
from busserve.kv.transfer.base import LEASE_SAFETY_MARGIN_S, KVTransport, KVWriter, TransferError
from busserve.kv.transfer.bus import LandingZones
from busserve.messages import (
    Abort,
    AbortReply,
    Error,
    KVAddress,
    Migrate,
    PrepRecv,
    PrepRecvReply,
    Probe,
    ProbeReply,
    RemoteSend,
    RemoteSendReply,
    Renew,
    RenewReply,
    StartGenerate,
    StartGenerateReply,
)

log = logging.getLogger(__name__)


@dataclass
class Reservation:
    """A parked receive's transfer terms: who may write, how, until when."""

    transport: str
    write_deadline: float  # unix time (KVAddress.expires_at)
    sender_pid: int = 0
    writes_over: bool = False  # the sender said it writes no more


@dataclass
class Quarantine:
    """Pages of a dropped receive (held by the scheduler under the request's key) that a sender may still write."""

    write_deadline: float
    sender_pid: int = 0

    def over(self, now: float) -> bool:
        if now > self.write_deadline + LEASE_SAFETY_MARGIN_S:
            return True
        return bool(self.sender_pid) and not _process_alive(self.sender_pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SubRequests:
    def __init__(self, ops: EngineOps, kv: KVStorage, transports: dict[str, KVTransport],
                 landing: LandingZones, offered: list[str]) -> None:
        self.ops = ops
        self.kv = kv
        self.transports = transports
        self.landing = landing
        self.offered = offered
        self.reservations: dict[str, Reservation] = {}
        self.quarantine: dict[str, Quarantine] = {}
        self.dropped = Memory()  # request id -> why it ended here without a stream event
        self.migrating_in: set[str] = set()  # parked receives of requests migrating here
        self.migrations = Migrations(ops, kv, transports, self.dropped)
        self.on_prep_recv: Callable[[Sequence, int, int, object, int], None] | None = None  # telemetry

    @property
    def scheduler(self) -> Scheduler:
        return self.ops.scheduler

    # ------------------------------------------------------------------ dispatch

    def apply(self, cmd: ActionCmd) -> None:
        msg = cmd.msg
        if isinstance(msg, PrepRecv):
            cmd.reply(self.prep_recv(msg, cmd))
        elif isinstance(msg, StartGenerate):
            cmd.reply(self.start_generate(msg, cmd))
        elif isinstance(msg, RemoteSend):
            err = self.remote_send(msg, cmd)  # replies itself once the KV has landed
            if err is not None:
                cmd.reply(err)
        elif isinstance(msg, Abort):
            cmd.reply(self.abort(msg))
        elif isinstance(msg, Renew):
            cmd.reply(self.renew(msg))
        elif isinstance(msg, Probe):
            cmd.reply(self.probe(msg))
        elif isinstance(msg, Migrate):
            reply = self.migrations.apply(msg, cmd)
            if reply is not None:
                cmd.reply(reply)

    # ------------------------------------------------------------------ receiver

    def _refused(self, rid: str) -> Error | None:
        why = self.dropped.get(rid)
        if why is not None or rid in self.ops.outputs.ended:
            return Error(code="conflict", request_id=rid,
                         message=f"request {rid} already ended on engine {self.ops.engine_id} ({why or 'ended'})")
        return None

    def _check_model_and_end(self, rid: str, model: str, end: int, prompt_len: int) -> Error | None:
        if model and model != self.ops.model_name:
            return Error(code="unknown_model", field="model", request_id=rid,
                         message=f"this engine serves {self.ops.model_name!r}, not {model!r}")
        if end > prompt_len:
            return Error(code="invalid_request", field="end", request_id=rid,
                         message=f"end {end} is beyond the prompt ({prompt_len} tokens)")
        return None

    def prep_recv(self, msg: PrepRecv, cmd: ActionCmd) -> PrepRecvReply | Error:
        rid = msg.request_id
        n = len(msg.prompt_token_ids)
        err = (self._check_model_and_end(rid, msg.model, msg.end if not msg.migration else 0, n)
               or self.ops.check_prompt(rid, n) or self._refused(rid))
        if err is None and msg.end > self.ops.max_model_len:
            err = Error(code="invalid_request", field="end", request_id=rid,
                        message=f"end {msg.end} is beyond this engine's context ({self.ops.max_model_len} tokens)")
        if err is not None:
            return err
        transport = msg.transport or next(iter(self.offered), None)
        if transport not in self.offered or transport not in self.transports:
            return Error(code="invalid_request", field="transport", request_id=rid,
                         message=f"transport {transport!r} not offered by engine {self.ops.engine_id} "
                                 f"(offers {', '.join(self.transports) or 'none'})")
        sched = self.scheduler
        queued = len(sched.waiting) + len(sched.parked)
        if queued >= self.ops.max_queued:
            return Error(code="overloaded", request_id=rid,
                         message=f"engine {self.ops.engine_id} has {queued} requests queued (its bound)")
        streamed = list(msg.prompt_token_ids[n - msg.output_offset:]) if msg.output_offset else None
        seq = Sequence(request_id=rid, token_ids=list(msg.prompt_token_ids), max_tokens=msg.sampling.max_tokens)
        seq.ctx = self.ops.generate_ctx(
            stream_subject=msg.stream_subject, content_type=msg.stream.content_type or cmd.content_type,
            include_usage=msg.stream.include_usage, sampling=msg.sampling, trace=cmd.trace, label=msg.label or rid,
            supervisor=msg.supervisor or "router", output_offset=msg.output_offset, streamed=streamed)
        try:
            matched = sched.park(seq, msg.end, time.monotonic() + msg.lease_s)
        except DuplicateRequest:
            return Error(code="conflict", message=f"duplicate prep_recv: {rid} is already on this engine",
                         request_id=rid)
        except NeverFits as exc:
            return Error(code="prompt_too_long", field="prompt", message=str(exc), request_id=rid)
        except OutOfPages as exc:
            return Error(code="overloaded", field="end", request_id=rid,
                         message=f"engine {self.ops.engine_id}: {exc}; the request fits later, or send end=0")
        lay = self.kv.layout
        deadline = time.time() + msg.write_window_s
        addr = KVAddress(
            engine_id=self.ops.engine_id, request_id=rid, transport=transport,  # type: ignore[arg-type]
            start=matched, end=msg.end, pages=seq.pages[matched // lay.page_size :], page_size=lay.page_size,
            num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
            dtype=dtype_name(lay.dtype), handle=self.transports[transport].receiver_handle(),
            pool_pages=lay.num_pages, expires_at=deadline,
            # The bus reaches wherever the bus does: if the sender cannot map our segment, it writes over the bus.
            fallbacks=["bus"] if transport != "bus" and "bus" in self.transports else [],
        )
        if msg.migration:
            self.migrating_in.add(rid)
        if msg.end > matched:
            self.reservations[rid] = Reservation(transport, deadline, msg.sender_pid)
            if transport == "bus" or "bus" in addr.fallbacks:
                self.landing.open(addr)
        if self.on_prep_recv is not None:
            self.on_prep_recv(seq, matched, len(addr.pages), cmd.trace, cmd.received_ns)
        return PrepRecvReply(request_id=rid, matched=matched, kv_addr=addr)

    def start_generate(self, msg: StartGenerate, cmd: ActionCmd) -> StartGenerateReply | Error:
        rid = msg.request_id
        seq = self.scheduler.parked.get(rid)
        if seq is None:
            live = self.scheduler.get(rid)
            why = "already started" if live is not None else (self.dropped.get(rid) or "unknown here")
            return Error(code="unknown_request", request_id=rid,
                         message=f"no parked request {rid} on engine {self.ops.engine_id} ({why})")
        migrated = rid in self.migrating_in
        if migrated:
            total = len(seq.token_ids) + len(msg.extend)
            if not msg.begin <= min(seq.parked_end, total - 1):
                return Error(code="conflict", field="begin", request_id=rid,
                             message=f"start_generate begin={msg.begin} must be within the migration's reservation "
                                     f"({seq.parked_end}) and leave a token to compute ({total} tokens)")
        elif msg.begin != seq.parked_end:
            return Error(code="conflict", field="begin", request_id=rid,
                         message=f"start_generate begin={msg.begin} must equal prep_recv end={seq.parked_end}")
        elif msg.extend:
            return Error(code="invalid_request", field="extend", request_id=rid,
                         message="extend is for a migrated request (prep_recv with migration)")
        self.landing.close(rid)
        self.reservations.pop(rid, None)
        ctx = gen_ctx(seq)
        if migrated:
            self.migrating_in.discard(rid)
            self.scheduler.start_migrated(rid, msg.begin, list(msg.extend), msg.prefill_chunk)
            ctx.output_offset += len(msg.extend)
            ctx.detok.prime(list(msg.extend))
        else:
            self.scheduler.start_parked(rid, msg.begin, msg.prefill_chunk)
        # From here the request generates on this engine: its spans hang under the start_generate sub-request.
        ctx.trace, ctx.t_arrival_ns, ctx.t_scheduled_ns = cmd.trace, cmd.received_ns, 0
        out: list[Outbound] = []
        self.ops.outputs.started(seq, out)
        self._emit(out)
        return StartGenerateReply(request_id=rid, engine_id=self.ops.engine_id)

    def drop_parked(self, seq: Sequence, why: str, *, sender_stopped: bool = False) -> None:
        """End a receive before start_generate. Pages a sender may still write into go to quarantine."""
        rid = seq.request_id
        self.landing.close(rid)  # bus writes are refused from now on: nothing to quarantine for them
        res = self.reservations.pop(rid, None)
        hold = res is not None and res.transport != "bus" and not sender_stopped and not res.writes_over
        if hold:
            assert res is not None
            self.quarantine[rid] = Quarantine(res.write_deadline, res.sender_pid)
        self.ops.finish(seq, "cancelled", hold=hold)
        self.migrating_in.discard(rid)
        self.dropped.add(rid, why)

    def renew(self, msg: Renew) -> RenewReply | Error:
        seq = self.scheduler.parked.get(msg.request_id)
        if seq is None:
            return Error(code="unknown_request", request_id=msg.request_id,
                         message=f"no parked request {msg.request_id} on engine {self.ops.engine_id}")
        seq.lease_deadline = max(seq.lease_deadline, time.monotonic() + msg.lease_s)
        return RenewReply(request_id=msg.request_id, lease_s=msg.lease_s)

    def expire(self, now_monotonic: float) -> None:
        """Lapsed leases (an Error on the stream: nobody started the request) and quarantines that are over."""
        out: list[Outbound] = []
        for seq in self.scheduler.expired_parked(now_monotonic):
            self.ops.outputs.error(seq, Error(
                code="lease_expired", message=f"request parked on engine {self.ops.engine_id} was never started "
                                              "(start_generate or abort did not come before its lease ended)"), out)
            self.drop_parked(seq, "lease expired")
        if self.quarantine:
            now = time.time()
            for rid in [r for r, q in self.quarantine.items() if q.over(now)]:
                self.release_quarantine(rid)
        self._emit(out)
        if self.scheduler.frozen:
            self.migrations.expire(now_monotonic)

    def writes_over(self, rid: str) -> None:
        """A sender says it writes no more for ``rid``: its quarantined pages (if any) come back now."""
        res = self.reservations.get(rid)
        if res is not None:
            res.writes_over = True
        self.release_quarantine(rid)

    def release_quarantine(self, rid: str) -> None:
        if self.quarantine.pop(rid, None) is not None:
            self.scheduler.release_held((rid, SeqKind.GENERATE))

    # ------------------------------------------------------------------ sender

    def remote_send(self, msg: RemoteSend, cmd: ActionCmd) -> Error | None:
        rid = msg.request_id
        addr = msg.kv_addr
        err = self._check_model_and_end(rid, msg.model, msg.end, len(msg.prompt_token_ids))
        if err is not None:
            return err
        if addr.request_id != rid:
            return Error(code="invalid_request", field="kv_addr.request_id", request_id=rid,
                         message=f"kv_addr was reserved for request {addr.request_id}, not {rid}")
        if addr.end != msg.end:
            return Error(code="invalid_request", field="end", request_id=rid,
                         message=f"end {msg.end} differs from the receiver's reservation end {addr.end}")
        if msg.begin > addr.start:
            return Error(code="invalid_request", field="begin", request_id=rid,
                         message=f"begin {msg.begin} is past the receiver's matched prefix ({addr.start}): positions "
                                 f"[{addr.start}, {msg.begin}) would stay unwritten")
        if addr.transport == "shm" and not addr.handle.startswith(f"busserve-kv-{addr.engine_id}-"):
            return Error(code="invalid_request", field="kv_addr.handle", request_id=rid,
                         message=f"kv_addr handle {addr.handle!r} does not belong to engine {addr.engine_id}")
        if rid in self.dropped:
            return Error(code="conflict", message=f"request {rid} already ended here ({self.dropped.get(rid)})",
                         request_id=rid)
        transport = self.transports.get(addr.transport)
        if transport is None:
            return Error(code="invalid_request", field="kv_addr.transport", request_id=rid,
                         message=f"engine {self.ops.engine_id} cannot send over {addr.transport!r}")
        writer = None
        begin = max(msg.begin, addr.start)
        if msg.end > begin:
            try:
                writer = self._open_writer(addr, transport)
            except TransferError as exc:
                return Error(code="transfer_failed", field="kv_addr", message=str(exc), request_id=rid)
        seq = Sequence(request_id=rid, token_ids=list(msg.prompt_token_ids[: msg.end]), kind=SeqKind.SEND,
                       target=msg.end)
        seq.ctx = SendCtx(writer=writer, begin=begin, end=msg.end, next_pos=begin, reply=cmd.reply,
                          request_id=rid, trace=cmd.trace)
        try:
            self.scheduler.add(seq)
        except DuplicateRequest:
            return Error(code="conflict", message=f"a remote_send for {rid} is already running here", request_id=rid)
        except NeverFits as exc:
            return Error(code="prompt_too_long", field="end", message=str(exc), request_id=rid)
        return None

    def _open_writer(self, addr: KVAddress, transport: KVTransport) -> KVWriter:
        """A writer on the reservation's transport or, where that cannot reach the receiver from here (its shm
        segment is on another host or behind another /dev/shm), on the first fallback it accepts that we have."""
        try:
            return transport.open_writer(addr, self.kv)
        except TransferError as exc:
            for name in addr.fallbacks:
                other = self.transports.get(name)
                if other is not None and name != addr.transport:
                    log.info("remote_send %s: %s to %s failed (%s); writing over %s instead", addr.request_id,
                             addr.transport, addr.engine_id, exc, name)
                    return other.open_writer(msgspec.structs.replace(addr, transport=name), self.kv)
            raise

    def layer_hook(self, sends: list[tuple[Sequence, int]]) -> Callable[[int], None] | None:
        """After layer l's KV is written for this step, queue its sends (eager, per layer)."""
        plan = []
        for seq, n in sends:
            ctx: SendCtx = seq.ctx
            a, b = ctx.next_pos, min(seq.num_computed + n, ctx.end)
            if b > a and ctx.writer is not None and not ctx.aborted:
                plan.append((ctx.writer, list(seq.pages), a, b))
        if not plan:
            return None

        def hook(layer: int) -> None:
            for writer, pages, a, b in plan:
                writer.write(layer, pages, a, b)

        return hook

    def after_step(self, sends: list[tuple[Sequence, int]]) -> None:
        for s, _ in sends:
            ctx: SendCtx = s.ctx
            ctx.next_pos = max(ctx.next_pos, s.num_computed)
        self.finish_ready_sends()

    def finish_ready_sends(self) -> None:
        """SEND sequences whose KV is all computed: write what is left (cached positions), then commit."""
        for seq in self.scheduler.running:
            if seq.kind is not SeqKind.SEND or seq.remaining > 0 or seq.ctx.finishing:
                continue
            ctx: SendCtx = seq.ctx
            ctx.finishing = True
            ctx.computed_at = time.monotonic()
            ctx.t_computed_ns = time.time_ns()
            if ctx.writer is None:
                self.ops.submit(SendDoneCmd(seq.request_id, None, 0))
                continue
            if ctx.next_pos < ctx.end and not ctx.aborted:
                pages = list(seq.pages)
                for layer in range(self.kv.layout.num_layers):
                    ctx.writer.write(layer, pages, ctx.next_pos, ctx.end)
                ctx.next_pos = ctx.end
            rid = seq.request_id
            ctx.writer.finish(lambda err, nbytes, rid=rid: self.ops.submit(SendDoneCmd(rid, err, nbytes)))

    def send_done(self, cmd: SendDoneCmd) -> int:
        """The transfer of a remote_send is over: reply. Returns the bytes it sent."""
        seq = self.scheduler.get(cmd.request_id, SeqKind.SEND)
        if seq is None:
            return 0
        ctx: SendCtx = seq.ctx
        if ctx.aborted:
            ctx.reply(Error(code="transfer_failed", message="remote_send aborted", request_id=ctx.request_id))
        elif cmd.error is not None:
            ctx.reply(Error(code="transfer_failed", message=f"KV transfer failed: {cmd.error}",
                            request_id=ctx.request_id))
        else:
            ctx.reply(RemoteSendReply(
                request_id=ctx.request_id, bytes_sent=cmd.nbytes, layers=self.kv.layout.num_layers,
                computed_tokens=ctx.end - min(seq.num_cached, ctx.end), cached_tokens=min(seq.num_cached, ctx.end),
                duration_s=time.monotonic() - ctx.started, compute_s=ctx.computed_at - ctx.started,
                transfer_busy_s=ctx.writer.busy_s if ctx.writer is not None else 0.0,
                transport=ctx.writer.addr.transport if ctx.writer is not None else None,
            ))
        self.ops.finish(seq, "error" if (ctx.aborted or cmd.error) else "sent")
        return cmd.nbytes

    def stop_send(self, seq: Sequence, why: str) -> None:
        """Abort a remote_send: nothing more is written; it replies with an Error (now, or once the writes already
        queued have drained, if it was committing)."""
        ctx: SendCtx = seq.ctx
        ctx.aborted = True
        if ctx.writer is not None:
            ctx.writer.abort(why)
        if not ctx.finishing:
            ctx.finishing = True
            if ctx.writer is not None:
                ctx.writer.finish(lambda err, nbytes: None)  # drain, then tell the receiver writes are over
            ctx.reply(Error(code="transfer_failed", message=f"remote_send aborted: {why}", request_id=ctx.request_id))
            self.ops.finish(seq, "error")

    # ------------------------------------------------------------------ abort, probe

    def abort(self, msg: Abort) -> AbortReply:
        """Drop a request here (its receive, its send, its run). ``notify``: end its stream if this engine owns it."""
        rid = msg.request_id
        terminated = rid in self.ops.outputs.ended
        found = notified = False
        why = f"aborted: {msg.reason}" if msg.reason else "aborted"
        send = self.scheduler.get(rid, SeqKind.SEND)
        if send is not None:
            found = True
            self.stop_send(send, why)
        seq = self.scheduler.get(rid)
        if seq is not None:
            found = True
            if seq.status is SeqStatus.PARKED:
                self.drop_parked(seq, why, sender_stopped=msg.sender_stopped)
            else:
                out: list[Outbound] = []
                if msg.notify and not gen_ctx(seq).ended:
                    self.ops.outputs.final(seq, "cancelled", out, stop_reason=msg.reason or None)
                    notified = True
                self.ops.finish(seq, "cancelled")
                self._emit(out)
                self.dropped.add(rid, why)
        if msg.sender_stopped:
            self.release_quarantine(rid)
        if not found and rid not in self.dropped and not terminated:
            self.dropped.add(rid, why)  # an abort that overtook its request: refuse it when it comes
        return AbortReply(request_id=rid, found=found, notified=notified, terminated=terminated)

    def probe(self, msg: Probe) -> ProbeReply:
        rid = msg.request_id
        seq = self.scheduler.get(rid)
        if seq is not None:
            ctx = gen_ctx(seq)
            state = {SeqStatus.PARKED: "parked", SeqStatus.WAITING: "waiting"}.get(seq.status, "running")  # frozen too
            return ProbeReply(request_id=rid, state=state,  # type: ignore[arg-type]
                              num_output=ctx.output_offset + seq.num_output)
        if self.scheduler.get(rid, SeqKind.SEND) is not None:
            return ProbeReply(request_id=rid, state="sending")
        terminal = self.ops.outputs.ended.get(rid)
        if terminal is not None:
            return ProbeReply(request_id=rid, state="ended", terminal=terminal)  # type: ignore[arg-type]
        why = self.dropped.get(rid)
        if why is not None:
            return ProbeReply(request_id=rid, state="dropped", reason=why)
        return ProbeReply(request_id=rid, state="unknown")

    # ------------------------------------------------------------------ fences

    def fence(self, why: str) -> int:
        """Drop every request a router supervises — receives, sends and runs — without a stream event: those
        routers have taken them over (or will, once they see this engine gone). Returns how many were dropped."""
        dropped = 0
        for seq in list(self.scheduler.by_id.values()):
            if seq.kind is SeqKind.SEND:
                self.stop_send(seq, why)
            elif not gen_ctx(seq).supervised:
                continue
            elif seq.status is SeqStatus.PARKED:
                self.drop_parked(seq, why)
            else:
                self.ops.finish(seq, "cancelled")
                self.dropped.add(seq.request_id, why)
            dropped += 1
        return dropped

    def _emit(self, out: list[Outbound]) -> None:
        if out:
            self.ops.emit(out)

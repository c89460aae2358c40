"""The engine's compute loop. It runs in its own thread and is the one authority over request state.

Every change — a new request, a cancel, prep_recv / remote_send / start_generate / abort, a finished KV transfer —
arrives as a command in the inbox and is applied between steps, in order, so replies are consistent with one
another (a start_generate is either accepted before a cancel, and then its terminal event comes from here, or it
is refused). One step::

    drain commands → expire leases → schedule → run (per-layer KV sends hook in) → sample → publish

Failures are data: a request that fails gets an Error on its stream and the loop goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from busserve.bus.codec import ContentType
from busserve.engine.attention_backends import select_backend
from busserve.engine.detokenizer import Detokenizer
from busserve.engine.model_loader import LoadedModel
from busserve.engine.requests import (
    ActionCmd,
    CallCmd,
    CancelCmd,
    Command,
    GenerateCmd,
    GenerateCtx,
    Outbound,
    SendCtx,
    SendDoneCmd,
)
from busserve.engine.runner import ModelRunner, kv_layout_for
from busserve.engine.sampler import SamplingState, sample
from busserve.engine.scheduler import DuplicateRequest, Scheduler, SchedulerConfig
from busserve.engine.sequence import SeqKind, SeqStatus, Sequence
from busserve.kv.pool import OutOfPages, PageAllocator
from busserve.kv.radix_cache import RadixCache
from busserve.kv.storage import KVStorage, dtype_name
from busserve.kv.transfer.base import KVTransport, TransferError
from busserve.kv.transfer.bus import LandingZones
from busserve.messages import (
    Abort,
    AbortReply,
    Error,
    Final,
    KVAddress,
    KVCleared,
    KVEventBatch,
    KVStored,
    PrepRecv,
    PrepRecvReply,
    RemoteSend,
    RemoteSendReply,
    SamplingParams,
    StartGenerate,
    StartGenerateReply,
    TokenChunk,
    Usage,
)

log = logging.getLogger(__name__)

SEND_SUFFIX = "#send"  # the sender-side sequence of remote_send, so one engine can be both sender and receiver
MAX_TOMBSTONES = 10_000


@dataclass
class EngineConfig:
    engine_id: str
    page_size: int = 16
    num_pages: int = 4096
    max_batch_tokens: int = 1024
    max_prefill_tokens: int = 0  # a step's budget while nobody decodes (SchedulerConfig); 0: max_batch_tokens
    max_running: int = 64
    max_model_len: int | None = None
    transports: list[str] = field(default_factory=lambda: ["shm", "bus"])
    shm_kv: bool = True  # keep the pool in /dev/shm (needed to receive over shm)
    attention: str = "auto"  # decode-attention backend: auto, torch, triton, flashinfer (engine/attention_backends.py)


@dataclass
class EngineCounters:
    steps: int = 0
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    kv_bytes_sent: int = 0
    busy_s: float = 0.0


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, emit: Callable[[list[Outbound]], None],
                 kv_events_subject: str = "") -> None:
        self.config = config
        self.loaded = loaded
        self.emit = emit
        self.kv_events_subject = kv_events_subject
        dtype = next(loaded.model.parameters()).dtype
        layout = kv_layout_for(loaded, config.num_pages, config.page_size, dtype)
        device = next(loaded.model.parameters()).device
        shm_name = f"busserve-kv-{config.engine_id}-{threading.get_native_id()}" if config.shm_kv else None
        self.kv = KVStorage(layout, device=device, shm_name=shm_name)
        self.max_model_len = min(config.max_model_len or loaded.max_model_len, loaded.max_model_len)
        self.allocator = PageAllocator(config.num_pages)
        self.cache = RadixCache(self.allocator, config.page_size)
        self.scheduler = Scheduler(
            SchedulerConfig(page_size=config.page_size, max_batch_tokens=config.max_batch_tokens,
                            max_prefill_tokens=config.max_prefill_tokens, max_running=config.max_running,
                            max_model_len=self.max_model_len),
            self.allocator, self.cache,
        )
        self.runner = ModelRunner(loaded, self.kv, select_backend(
            config.attention, device, num_heads=int(loaded.model.config.num_attention_heads),
            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=dtype))
        self.inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.transfer_executor = ThreadPoolExecutor(1, thread_name_prefix=f"kv-transfer-{config.engine_id}")
        self.transports: dict[str, KVTransport] = {}
        self.landing = LandingZones(self.kv)
        # Bounded memories of ended requests: those cancelled, aborted or expired here (later actions for them are
        # refused), and those whose terminal event this engine published (so an abort can say so).
        self.tombstones: OrderedDict[str, None] = OrderedDict()
        self.terminal_sent: OrderedDict[str, None] = OrderedDict()
        self.counters = EngineCounters()
        self._kv_event_seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Telemetry hooks (see busserve.telemetry.engine_telemetry), called on the compute thread.
        self.on_finish: Callable[[Sequence, str], None] | None = None
        self.on_prep_recv: Callable[[Sequence, int, int, object, int], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def submit(self, cmd: Command) -> None:
        self.inbox.put(cmd)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"engine-{self.config.engine_id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to end after the current step (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.transfer_executor.shutdown(wait=True, cancel_futures=True)
        for t in self.transports.values():
            t.close()
        self.kv.close()
        self.transports.clear()

    def run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            busy = self.scheduler.has_work
            self._drain(block=not busy)
            self._expire_leases()
            if self.scheduler.has_work:
                t0 = time.monotonic()
                try:
                    self.step()
                except Exception:
                    log.exception("engine step failed; failing the requests of that batch")
                    self._fail_running("engine step failed; see the engine log")
                self.counters.busy_s += time.monotonic() - t0

    def _drain(self, *, block: bool) -> None:
        timeout = 0.25 if self.scheduler.parked else 1.0
        try:
            cmd = self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self._apply(cmd)
            except Exception:
                log.exception("command %s failed", type(cmd).__name__)
            try:
                cmd = self.inbox.get_nowait()
            except queue.Empty:
                return

    # ------------------------------------------------------------------ the step

    def step(self) -> None:
        batch = self.scheduler.schedule()
        out: list[Outbound] = []
        self._finish_ready_sends()
        if batch:
            now_ns = time.time_ns()
            for s in batch.seqs:
                if not s.ctx.t_scheduled_ns:
                    s.ctx.t_scheduled_ns = now_ns
            sample_seqs = [s for s, n in batch if s.kind is SeqKind.GENERATE and s.num_computed + n == len(s.token_ids)]
            sends = [(s, n) for s, n in batch if s.kind is SeqKind.SEND]
            hook = self._layer_hook(sends) if sends else None
            logits = self.runner.run(batch, sample_seqs, hook)
            for s, n in batch:
                if s.is_prefill:
                    self.counters.prompt_tokens_computed += min(n, s.prompt_len - s.num_computed)
            self.scheduler.advance(batch)
            for s, _ in sends:
                s.ctx.next_pos = max(s.ctx.next_pos, s.num_computed)
            self._finish_ready_sends()
            tokens = sample(logits, [s.ctx.sampling for s in sample_seqs])
            for seq, tok in zip(sample_seqs, tokens, strict=True):
                self._append_token(seq, tok, out)
            self.counters.steps += 1
        self._collect_kv_events(out)
        if out:
            self.emit(out)

    def _append_token(self, seq: Sequence, tok: int, out: list[Outbound]) -> None:
        ctx: GenerateCtx = seq.ctx
        if ctx.first_token_at is None:
            ctx.first_token_at = time.monotonic()
            ctx.t_first_token_ns = time.time_ns()
            ctx.cached_tokens = seq.num_cached
        seq.token_ids.append(tok)
        self.counters.generated_tokens += 1
        finish: str | None = None
        stop_reason: str | int | None = None
        text = ""
        if tok in ctx.stop_token_ids:
            finish, stop_reason = "stop", tok
        elif not ctx.ignore_eos and tok in self.loaded.eos_token_ids:
            finish = "stop"
        else:
            text = ctx.detok.push(tok)
            if ctx.detok.stopped_by is not None:
                finish, stop_reason = "stop", ctx.detok.stopped_by
        if finish is None and (seq.num_output >= ctx.max_tokens or len(seq.token_ids) >= self.max_model_len):
            finish = "length"
        if finish is not None:
            text += ctx.detok.flush()
        out.append(Outbound(ctx.stream_subject, TokenChunk(request_id=seq.request_id, index=seq.num_output - 1,
                                                            token_ids=[tok], text=text), ctx.content_type))
        if finish is not None:
            out.append(Outbound(ctx.stream_subject, Final(
                request_id=seq.request_id, finish_reason=finish,  # type: ignore[arg-type]
                usage=self._usage(seq) if ctx.include_usage else None, stop_reason=stop_reason,
                engine_id=self.config.engine_id), ctx.content_type))
            self._terminal_sent(seq.request_id)
            self._finish(seq, finish)

    def _usage(self, seq: Sequence) -> Usage:
        ctx: GenerateCtx = seq.ctx
        return Usage(prompt_tokens=seq.prompt_len, completion_tokens=seq.num_output, cached_tokens=ctx.cached_tokens)

    def _finish(self, seq: Sequence, outcome: str) -> None:
        self.landing.close(seq.request_id)
        self.scheduler.finish(seq)
        if outcome == "error":
            self.counters.requests_failed += 1
        else:
            self.counters.requests_finished += 1
        if self.on_finish is not None:
            self.on_finish(seq, outcome)

    def _fail(self, seq: Sequence, error: Error, out: list[Outbound]) -> None:
        if seq.kind is SeqKind.GENERATE:
            ctx: GenerateCtx = seq.ctx
            out.append(Outbound(ctx.stream_subject, error, ctx.content_type))
            self._terminal_sent(seq.request_id)
        self._finish(seq, "error")

    def _fail_running(self, message: str) -> None:
        out: list[Outbound] = []
        for seq in list(self.scheduler.running):
            err = Error(code="engine_failure", message=message, request_id=seq.request_id)
            if seq.kind is SeqKind.SEND:
                seq.ctx.reply(err)
            self._fail(seq, err, out)
        if out:
            self.emit(out)

    # ------------------------------------------------------------------ KV sends (sender side of remote_send)

    def _layer_hook(self, sends: list[tuple[Sequence, int]]) -> Callable[[int], None]:
        """After layer l's KV is written for this step, queue its sends (eager, per layer)."""
        plan = []
        for seq, n in sends:
            ctx: SendCtx = seq.ctx
            a, b = ctx.next_pos, min(seq.num_computed + n, ctx.end)
            if b > a and ctx.writer is not None and not ctx.aborted:
                plan.append((ctx.writer, list(seq.pages), a, b))

        def hook(layer: int) -> None:
            for writer, pages, a, b in plan:
                writer.write(layer, pages, a, b)

        return hook

    def _finish_ready_sends(self) -> None:
        """SEND sequences whose KV is all computed: write what is left (cached positions), then commit."""
        for seq in self.scheduler.running:
            if seq.kind is not SeqKind.SEND or seq.remaining > 0 or seq.ctx.finishing:
                continue
            ctx: SendCtx = seq.ctx
            ctx.finishing = True
            ctx.computed_at = time.monotonic()
            ctx.t_computed_ns = time.time_ns()
            if ctx.writer is None:
                self.submit(SendDoneCmd(seq.request_id, None, 0))
                continue
            if ctx.next_pos < ctx.end and not ctx.aborted:
                pages = list(seq.pages)
                for layer in range(self.kv.layout.num_layers):
                    ctx.writer.write(layer, pages, ctx.next_pos, ctx.end)
                ctx.next_pos = ctx.end
            rid = seq.request_id
            ctx.writer.finish(lambda err, nbytes, rid=rid: self.submit(SendDoneCmd(rid, err, nbytes)))

    def _on_send_done(self, cmd: SendDoneCmd) -> None:
        seq = self.scheduler.by_id.get(cmd.request_id)
        if seq is None:
            return
        ctx: SendCtx = seq.ctx
        self.counters.kv_bytes_sent += cmd.nbytes
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
            ))
        self._finish(seq, "error" if (ctx.aborted or cmd.error) else "sent")

    # ------------------------------------------------------------------ commands

    def _apply(self, cmd: Command) -> None:
        if isinstance(cmd, GenerateCmd):
            self._on_generate(cmd)
        elif isinstance(cmd, CancelCmd):
            self._on_cancel(cmd)
        elif isinstance(cmd, ActionCmd):
            msg = cmd.msg
            if isinstance(msg, PrepRecv):
                cmd.reply(self._on_prep_recv(msg, cmd))
            elif isinstance(msg, StartGenerate):
                cmd.reply(self._on_start_generate(msg, cmd))
            elif isinstance(msg, RemoteSend):
                err = self._on_remote_send(msg, cmd)
                if err is not None:
                    cmd.reply(err)
            elif isinstance(msg, Abort):
                cmd.reply(self._on_abort(msg))
        elif isinstance(cmd, SendDoneCmd):
            self._on_send_done(cmd)
        elif isinstance(cmd, CallCmd):
            cmd.reply(cmd.fn())

    @staticmethod
    def _remember(book: OrderedDict[str, None], request_id: str) -> None:
        book[request_id] = None
        while len(book) > MAX_TOMBSTONES:
            book.popitem(last=False)

    def _tombstone(self, request_id: str) -> None:
        self._remember(self.tombstones, request_id)

    def _terminal_sent(self, request_id: str) -> None:
        self._remember(self.terminal_sent, request_id)

    def _check_prompt(self, request_id: str, n: int) -> Error | None:
        if n >= self.max_model_len:
            return Error(code="prompt_too_long", field="prompt",
                         message=f"prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                                 "and at least one must be left for the output", request_id=request_id)
        if n == 0:
            return Error(code="invalid_request", field="prompt", message="empty prompt", request_id=request_id)
        return None

    def _gen_ctx(self, stream_subject: str, content_type: ContentType, include_usage: bool,
                 sampling: SamplingParams, trace: object) -> GenerateCtx:
        return GenerateCtx(
            stream_subject=stream_subject, content_type=content_type, include_usage=include_usage,
            sampling=SamplingState.from_params(sampling), max_tokens=sampling.max_tokens,
            stop_token_ids=frozenset(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
            detok=Detokenizer(self.loaded.tokenizer, sampling.stop), trace=trace,
        )

    def _on_generate(self, cmd: GenerateCmd) -> None:
        err = self._check_prompt(cmd.request_id, len(cmd.token_ids))
        if err is None and cmd.request_id in self.tombstones:
            err = Error(code="conflict", message="request was cancelled", request_id=cmd.request_id)
        seq = Sequence(request_id=cmd.request_id, token_ids=list(cmd.token_ids), max_tokens=cmd.sampling.max_tokens)
        if err is None:
            seq.ctx = self._gen_ctx(cmd.stream_subject, cmd.content_type, cmd.include_usage, cmd.sampling, cmd.trace)
            try:
                self.scheduler.add(seq)
                return
            except DuplicateRequest as exc:
                err = Error(code="conflict", message=str(exc), request_id=cmd.request_id)
        self.emit([Outbound(cmd.stream_subject, err, cmd.content_type)])

    def _on_cancel(self, cmd: CancelCmd) -> None:
        self._drop(cmd.request_id, notify=True, reason=cmd.reason or "cancelled")
        self._tombstone(cmd.request_id)

    def _drop(self, request_id: str, *, notify: bool, reason: str) -> tuple[bool, bool]:
        """Remove a request (and its sender side). Returns (found, notified)."""
        found = notified = False
        out: list[Outbound] = []
        seq = self.scheduler.by_id.get(request_id)
        if seq is not None:
            found = True
            if seq.status is SeqStatus.PARKED:
                self._finish(seq, "cancelled")
            else:
                if notify:
                    ctx: GenerateCtx = seq.ctx
                    out.append(Outbound(ctx.stream_subject, Final(
                        request_id=request_id, finish_reason="cancelled",
                        usage=self._usage(seq) if ctx.include_usage else None, stop_reason=reason or None,
                        engine_id=self.config.engine_id), ctx.content_type))
                    notified = True
                    self._terminal_sent(request_id)
                self._finish(seq, "cancelled")
        send = self.scheduler.by_id.get(request_id + SEND_SUFFIX)
        if send is not None:
            found = True
            sctx: SendCtx = send.ctx
            sctx.aborted = True
            if sctx.writer is not None:
                sctx.writer._failed = TransferError("aborted")
            if not sctx.finishing:
                if send.status is SeqStatus.RUNNING and send.remaining == 0:
                    pass  # _finish_ready_sends will commit the (now failing) writer
                else:
                    sctx.finishing = True
                    sctx.reply(Error(code="transfer_failed", message="remote_send aborted", request_id=request_id))
                    self._finish(send, "error")
        if out:
            self.emit(out)
        return found, notified

    def _on_abort(self, msg: Abort) -> AbortReply:
        terminated = msg.request_id in self.terminal_sent
        found, notified = self._drop(msg.request_id, notify=msg.notify, reason=msg.reason)
        self._tombstone(msg.request_id)
        return AbortReply(request_id=msg.request_id, found=found, notified=notified, terminated=terminated)

    def _check_model_and_end(self, rid: str, model: str, end: int, prompt_len: int) -> Error | None:
        """What prep_recv and remote_send both check first: the model asked for, and end within the prompt."""
        if model and model != self.loaded.name:
            return Error(code="unknown_model", field="model", request_id=rid,
                         message=f"this engine serves {self.loaded.name!r}, not {model!r}")
        if end > prompt_len:
            return Error(code="invalid_request", field="end", request_id=rid,
                         message=f"end {end} is beyond the prompt ({prompt_len} tokens)")
        return None

    def _on_prep_recv(self, msg: PrepRecv, cmd: ActionCmd) -> PrepRecvReply | Error:
        rid = msg.request_id
        n = len(msg.prompt_token_ids)
        err = self._check_model_and_end(rid, msg.model, msg.end, n) or self._check_prompt(rid, n)
        if err is not None:
            return err
        if rid in self.tombstones:
            return Error(code="conflict", message="request was cancelled or aborted", request_id=rid)
        transport = msg.transport or next(iter(self.config.transports), None)
        if transport not in self.config.transports or transport not in self.transports:
            return Error(code="invalid_request", field="transport", request_id=rid,
                         message=f"transport {transport!r} not offered by engine {self.config.engine_id} "
                                 f"(offers {', '.join(self.transports) or 'none'})")
        seq = Sequence(request_id=rid, token_ids=list(msg.prompt_token_ids), max_tokens=msg.sampling.max_tokens)
        seq.ctx = self._gen_ctx(msg.stream_subject, msg.stream.content_type or cmd.content_type,
                                msg.stream.include_usage, msg.sampling, cmd.trace)
        try:
            matched = self.scheduler.park(seq, msg.end, time.monotonic() + msg.lease_s)
        except DuplicateRequest:
            return Error(code="conflict", message=f"duplicate prep_recv: {rid} is already on this engine",
                         request_id=rid)
        except OutOfPages as exc:
            return Error(code="overloaded", message=f"engine {self.config.engine_id}: {exc}", request_id=rid)
        lay = self.kv.layout
        addr = KVAddress(
            engine_id=self.config.engine_id, request_id=rid, transport=transport,  # type: ignore[arg-type]
            start=matched, end=msg.end, pages=seq.pages[matched // lay.page_size :], page_size=lay.page_size,
            num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
            dtype=dtype_name(lay.dtype), handle=self.transports[transport].receiver_handle(),
            pool_pages=lay.num_pages, expires_at=time.time() + msg.lease_s,
        )
        if transport == "bus":
            self.landing.open(addr)
        if self.on_prep_recv is not None:
            self.on_prep_recv(seq, matched, len(addr.pages), cmd.trace, cmd.received_ns)
        return PrepRecvReply(request_id=rid, matched=matched, kv_addr=addr)

    def _on_start_generate(self, msg: StartGenerate, cmd: ActionCmd) -> StartGenerateReply | Error:
        rid = msg.request_id
        seq = self.scheduler.parked.get(rid)
        if seq is None:
            live = self.scheduler.by_id.get(rid)
            why = "already started" if live is not None else (
                "cancelled, aborted or its lease expired" if rid in self.tombstones else "unknown here")
            return Error(code="unknown_request", request_id=rid,
                         message=f"no parked request {rid} on engine {self.config.engine_id} ({why})")
        if msg.begin != seq.parked_end:
            return Error(code="conflict", field="begin", request_id=rid,
                         message=f"start_generate begin={msg.begin} must equal prep_recv end={seq.parked_end}")
        self.landing.close(rid)
        self.scheduler.start_parked(rid, msg.begin, msg.prefill_chunk)
        # From here the request generates on this engine: its spans hang under the start_generate sub-request.
        ctx: GenerateCtx = seq.ctx
        ctx.trace, ctx.t_arrival_ns, ctx.t_scheduled_ns = cmd.trace, cmd.received_ns, 0
        return StartGenerateReply(request_id=rid, engine_id=self.config.engine_id)

    def _on_remote_send(self, msg: RemoteSend, cmd: ActionCmd) -> Error | None:
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
        if rid in self.tombstones:
            return Error(code="conflict", message="request was cancelled or aborted", request_id=rid)
        transport = self.transports.get(addr.transport)
        if transport is None:
            return Error(code="invalid_request", field="kv_addr.transport", request_id=rid,
                         message=f"engine {self.config.engine_id} cannot send over {addr.transport!r}")
        writer = None
        begin = max(msg.begin, addr.start)
        if msg.end > begin:
            try:
                writer = transport.open_writer(addr, self.kv)
            except TransferError as exc:
                return Error(code="transfer_failed", message=str(exc), request_id=rid)
        seq = Sequence(request_id=rid + SEND_SUFFIX, token_ids=list(msg.prompt_token_ids[: msg.end]),
                       kind=SeqKind.SEND, target=msg.end)
        seq.ctx = SendCtx(writer=writer, begin=begin, end=msg.end, next_pos=begin, reply=cmd.reply,
                          request_id=rid, trace=cmd.trace)
        try:
            self.scheduler.add(seq)
        except DuplicateRequest:
            return Error(code="conflict", message=f"a remote_send for {rid} is already running here", request_id=rid)
        return None

    def _expire_leases(self) -> None:
        if not self.scheduler.parked:
            return
        out: list[Outbound] = []
        for seq in self.scheduler.expired_parked(time.monotonic()):
            self._tombstone(seq.request_id)
            err = Error(code="lease_expired", request_id=seq.request_id,
                        message=f"request parked on engine {self.config.engine_id} was never started "
                                "(start_generate or abort did not come before its lease ended)")
            self._fail(seq, err, out)
        if out:
            self.emit(out)

    def _collect_kv_events(self, out: list[Outbound]) -> None:
        events = self.cache.drain_events()
        if events and self.kv_events_subject:
            self._kv_event_seq += 1
            out.append(Outbound(self.kv_events_subject, KVEventBatch(
                engine_id=self.config.engine_id, seq=self._kv_event_seq, events=events)))

    def kv_snapshot(self) -> KVEventBatch:
        """Every cached page hash, as of the last published batch (call on the compute thread)."""
        hashes = self.cache.page_hashes()
        return KVEventBatch(engine_id=self.config.engine_id, seq=self._kv_event_seq,
                            events=[KVCleared(), KVStored(page_hashes=hashes)])

    # ------------------------------------------------------------------ for the service and tests

    def call(self, fn: Callable[[], object], timeout: float = 30.0) -> object:
        """Run ``fn`` on the compute thread and return its result (blocking)."""
        done = threading.Event()
        box: list[object] = []

        def reply(value: object) -> None:
            box.append(value)
            done.set()

        self.submit(CallCmd(fn, reply))
        if not done.wait(timeout):
            raise TimeoutError("the engine did not answer")
        return box[0]

"""The engine's compute loop. It runs in its own thread and is the one authority over request state.

Every change — a new request, a cancel, a sub-request action, a finished KV transfer, a fence — arrives as a
command in the inbox and is applied between steps, in order, so replies are consistent with one another (a
start_generate is either accepted before a cancel, and then its terminal event comes from here, or it is refused).
One step::

    drain commands → expire leases and quarantines → schedule → run (per-layer KV sends hook in) → sample → publish

The sub-request protocol (parked receives, sends, leases, quarantine, probe) lives in ``subrequests.py`` and the
stream a client reads (detokenizing, stop handling, the terminal event) in ``outputs.py``; this module is the loop
and the request intake. Failures are data: a request that fails gets an Error on its stream and the loop goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from busserve.bus.codec import ContentType
from busserve.engine.attention_backends import DecodeBackend, attention_scale, prefill_backend_for, select_backend
from busserve.engine.decode_graphs import DecodeGraphs
from busserve.engine.detokenizer import Detokenizer
from busserve.engine.logits_processing import LogitsSettings, Row
from busserve.engine.logits_processing import process as process_logits
from busserve.engine.model_loader import LoadedModel
from busserve.engine.outputs import StreamWriter
from busserve.engine.requests import (
    ActionCmd,
    CallCmd,
    CancelCmd,
    Command,
    FenceCmd,
    GenerateCmd,
    GenerateCtx,
    MigrationCmd,
    Outbound,
    SendDoneCmd,
    WritesOverCmd,
    gen_ctx,
)
from busserve.engine.runner import ModelRunner, kv_layout_for
from busserve.engine.sampler import SamplingState, sample, token_logprobs
from busserve.engine.scheduler import DuplicateRequest, NeverFits, Scheduler, SchedulerConfig
from busserve.engine.sequence import SeqKind, SeqStatus, Sequence
from busserve.engine.step_rates import StepRates
from busserve.engine.subrequests import SubRequests
from busserve.kv.pool import PageAllocator
from busserve.kv.radix_cache import RadixCache
from busserve.kv.storage import KVStorage, shm_segment_name
from busserve.kv.transfer.base import KVTransport
from busserve.kv.transfer.bus import LandingZones
from busserve.messages import Error, KVCleared, KVEventBatch, KVStored, SamplingParams, TokenLogprob
from busserve.structured_output import Grammars

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # with work that cannot be scheduled (waiting for pages), wait this long for a command
_pools = itertools.count()


def _use_device(device: torch.device) -> None:
    """Make ``device`` this thread's current CUDA device (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


class PoolTooSmall(ValueError):
    """The KV pool cannot hold one request of the context length asked for."""


@dataclass
class EngineConfig:
    engine_id: str
    page_size: int = 16
    num_pages: int = 4096
    max_batch_tokens: int = 1024
    max_prefill_tokens: int = 0  # a step's budget while nobody decodes (SchedulerConfig); 0: max_batch_tokens
    max_running: int = 64
    max_model_len: int | None = None  # given: refused if the pool cannot hold it; None: the model's, within the pool
    max_queued: int = 256  # requests waiting or parked here; beyond it, new ones are refused as overloaded
    transports: list[str] = field(default_factory=lambda: ["shm", "bus"])
    shm_kv: bool = True  # keep the pool in /dev/shm (needed to receive over shm)
    attention: str = "auto"  # decode-attention backend: auto, torch, triton, flashinfer (engine/attention_backends.py)
    heartbeat_s: float = 1.0
    # Batch-invariant kernels and attention (engine/deterministic.py): the same greedy tokens whatever the batch.
    deterministic: bool = False
    cuda_graphs: bool = True  # GPU engines with the triton backend: decode steps as CUDA graphs (decode_graphs.py)


@dataclass
class EngineCounters:
    steps: int = 0
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    kv_bytes_sent: int = 0
    busy_s: float = 0.0
    fences: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, emit: Callable[[list[Outbound]], None],
                 kv_events_subject: str = "") -> None:
        self.config = config
        self.engine_id = config.engine_id
        self.loaded = loaded
        self.model_name = loaded.name
        self.emit = emit
        self.kv_events_subject = kv_events_subject
        self.max_queued = config.max_queued
        dtype = next(loaded.model.parameters()).dtype
        layout = kv_layout_for(loaded, config.num_pages, config.page_size, dtype)
        capacity = config.num_pages * config.page_size
        if config.max_model_len is not None and config.max_model_len > capacity:
            raise PoolTooSmall(
                f"--max-model-len {config.max_model_len} does not fit the KV pool: {config.num_pages} pages of "
                f"{config.page_size} tokens hold {capacity} tokens; give a larger --kv-memory / --kv-pages or a "
                "smaller --max-model-len")
        self.max_model_len = min(config.max_model_len or loaded.max_model_len, loaded.max_model_len, capacity)
        if self.max_model_len < loaded.max_model_len and config.max_model_len is None:
            log.info("context limited to %d tokens by the KV pool (the model allows %d)", self.max_model_len,
                     loaded.max_model_len)
        device = next(loaded.model.parameters()).device
        # The attention backend and, in the deterministic mode, the model's layers are settled before the pool (a
        # /dev/shm segment) exists, so a refusal leaves nothing behind.
        heads = int(loaded.model.config.num_attention_heads)
        scale = attention_scale(loaded.model, layout.head_dim)
        backend = select_backend(config.attention, device, num_heads=heads, num_kv_heads=layout.num_kv_heads,
                                 head_dim=layout.head_dim, dtype=dtype, scale=scale)
        prefill_backend = prefill_backend_for(backend, num_heads=heads, num_kv_heads=layout.num_kv_heads,
                                              head_dim=layout.head_dim, dtype=dtype, device=device, scale=scale)
        if config.deterministic:
            from busserve.engine.deterministic import make_batch_invariant

            if backend.name != "cpu":
                raise ValueError(f"--deterministic needs the cpu attention backend (busserve's paged decode kernel, "
                                 f"every row in one fixed order); this engine has {backend.name}")
            make_batch_invariant(loaded.model)  # in place: the model now serves this mode only
        shm_name = shm_segment_name(config.engine_id, os.getpid(), next(_pools)) if config.shm_kv else None
        self.kv = KVStorage(layout, device=device, shm_name=shm_name)
        self.allocator = PageAllocator(config.num_pages)
        self.cache = RadixCache(self.allocator, config.page_size)
        self.scheduler = Scheduler(
            SchedulerConfig(page_size=config.page_size, max_batch_tokens=config.max_batch_tokens,
                            max_prefill_tokens=config.max_prefill_tokens, max_running=config.max_running,
                            max_model_len=self.max_model_len),
            self.allocator, self.cache,
        )
        self.runner = ModelRunner(loaded, self.kv, backend, prefill_backend)
        if config.cuda_graphs and device.type == "cuda" and backend.name == "triton" and not config.deterministic:
            self.runner.graphs = self._capture_decode_graphs(backend)
        self.runner.deterministic = config.deterministic
        self.inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # On a GPU the transfer thread's current device is the pool's (Triton kernels launch on the current one).
        self.transfer_executor = ThreadPoolExecutor(1, thread_name_prefix=f"kv-transfer-{config.engine_id}",
                                                    initializer=_use_device, initargs=(device,))
        self.transports: dict[str, KVTransport] = {}
        self.landing = LandingZones(self.kv)
        self.outputs = StreamWriter(config.engine_id, loaded.eos_token_ids, self.max_model_len, config.heartbeat_s)
        self.grammars = Grammars(loaded.tokenizer, loaded.eos_token_ids)  # structured outputs' matchers
        self.protocol = SubRequests(self, self.kv, self.transports, self.landing, list(config.transports))
        self.counters = EngineCounters()
        self.rates = StepRates()  # published in heartbeats: what a prompt token and a decode step cost here
        self._kv_event_seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled = False  # the last step scheduled nothing although work was queued
        # Telemetry hook (see busserve.telemetry.engine_telemetry), called on the compute thread.
        self.on_finish: Callable[[Sequence, str], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def submit(self, cmd: Command) -> None:
        self.inbox.put(cmd)

    def _capture_decode_graphs(self, backend: DecodeBackend) -> DecodeGraphs | None:
        """The decode steps' CUDA graphs, or None (eager steps) if capturing fails — logged, never fatal."""
        ps = self.config.page_size
        graphs = DecodeGraphs(self.loaded.model, self.kv, backend, ps, max_batch=self.config.max_running,
                              max_pages=-(-self.max_model_len // ps), device=self.runner.device)
        try:
            graphs.capture()
        except Exception:
            log.exception("capturing decode steps as CUDA graphs failed; this engine decodes eagerly")
            with contextlib.suppress(Exception):  # let whatever the aborted capture queued finish first
                torch.cuda.synchronize(self.runner.device)
            return None
        return graphs

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"engine-{self.engine_id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to end after the current step (safe from a signal handler)."""
        self._stop.set()

    def holds_requests(self) -> int:
        """Requests and sub-requests this engine still holds (read from another thread: a count, not an audit)."""
        return len(self.scheduler.by_id) + len(self.protocol.migrations.active)

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
        _use_device(self.runner.device)
        while not self._stop.is_set():
            self._drain(block=not self.scheduler.has_work or self._stalled)
            self.protocol.expire(time.monotonic())
            if self.scheduler.has_work:
                t0 = time.monotonic()
                try:
                    self._stalled = not self.step()
                except Exception:
                    log.exception("engine step failed; failing the requests of that batch")
                    self._fail_running("engine step failed; see the engine log")
                self.counters.busy_s += time.monotonic() - t0
        self._close_requests()

    def _drain(self, *, block: bool) -> None:
        if not block:
            timeout = None
        elif self._stalled:
            timeout = IDLE_WAIT_S
        else:
            timeout = 0.25 if (self.scheduler.parked or self.protocol.quarantine) else 1.0
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

    def step(self) -> bool:
        """One batch; False when nothing could be scheduled (work waits for pages)."""
        batch = self.scheduler.schedule()
        out: list[Outbound] = []
        self.protocol.finish_ready_sends()
        if batch:
            sample_seqs = [s for s, n in batch if s.kind is SeqKind.GENERATE and s.num_computed + n == len(s.token_ids)]
            sends = [(s, n) for s, n in batch if s.kind is SeqKind.SEND]
            self._stamp_scheduled(batch.seqs)
            t0 = time.perf_counter()
            logits = self.runner.run(batch, sample_seqs, self.protocol.layer_hook(sends) if sends else None)
            prompt_tokens = sum(min(n, s.prompt_len - s.num_computed) for s, n in batch if s.is_prefill)
            decode_rows = sum(1 for s, _ in batch if not s.is_prefill)
            self.counters.prompt_tokens_computed += prompt_tokens
            self.scheduler.advance(batch)
            self.protocol.after_step(sends)
            if self.protocol.migrations.active:
                self.protocol.migrations.advance()
            ctxs = [gen_ctx(s) for s in sample_seqs]
            processed = logits
            if any(c.logits.active for c in ctxs):  # penalties, bias, min_tokens: rows only when someone asks
                processed = process_logits(logits, [
                    Row(c.logits, s.token_ids, len(s.token_ids) - c.output_offset - s.num_output)
                    for s, c in zip(sample_seqs, ctxs, strict=True)])
            failed: dict[int, str] = {}
            if any(c.grammar is not None for c in ctxs):  # structured outputs: the format's mask on its rows
                if processed is logits:
                    processed = logits.float().clone()
                processed, failed = self.grammars.constrain(processed, [c.grammar for c in ctxs])
            tokens = sample(processed, [c.sampling for c in ctxs])
            logprobs = token_logprobs(logits, tokens, [c.logprobs for c in ctxs])
            for i, (seq, tok, lp) in enumerate(zip(sample_seqs, tokens, logprobs, strict=True)):
                if i in failed:
                    self._fail_format(seq, failed[i], out)
                else:
                    self._append_token(seq, tok, out, lp)
            self.counters.steps += 1
            self.rates.observe(prompt_tokens, decode_rows, time.perf_counter() - t0)
        self._collect_kv_events(out)
        if out:
            self.emit(out)
        return bool(batch)

    def _stamp_scheduled(self, seqs: list[Sequence]) -> None:
        now_ns = time.time_ns()
        for s in seqs:
            if not s.ctx.t_scheduled_ns:
                s.ctx.t_scheduled_ns = now_ns

    def _append_token(self, seq: Sequence, tok: int, out: list[Outbound], logprob: TokenLogprob | None = None
                      ) -> None:
        ctx = gen_ctx(seq)
        if ctx.first_token_at is None:
            ctx.first_token_at = time.monotonic()
            ctx.t_first_token_ns = time.time_ns()
            ctx.cached_tokens = seq.num_cached
        self.counters.generated_tokens += 1
        if ctx.grammar is not None:
            problem = self.grammars.advance(ctx.grammar, tok)
            if problem is not None:
                self._fail_format(seq, problem, out)
                return
        finish = self.outputs.token(seq, tok, out, logprob)
        if finish is not None:
            self.finish(seq, finish)

    def _fail_format(self, seq: Sequence, problem: str, out: list[Outbound]) -> None:
        """A structured output that cannot go on (a grammar no router checked, or one that ran out of llguidance's
        limits): the request ends with an error naming the format, never with text outside it."""
        self.outputs.error(seq, Error(code="invalid_request", field="structured_output",
                                      message=f"structured output: {problem}"), out)
        self.finish(seq, "error")

    def finish(self, seq: Sequence, outcome: str, *, hold: bool = False) -> None:
        """Remove a sequence (its pages back, or ``hold``-ed for a quarantine) and count it."""
        if seq.kind is SeqKind.GENERATE:
            self.landing.close(seq.request_id)
            if seq.request_id in self.protocol.migrations.active:
                self.protocol.migrations.ended(seq, outcome)
        self.scheduler.finish(seq, hold=hold)
        if outcome == "error":
            self.counters.requests_failed += 1
        else:
            self.counters.requests_finished += 1
        if self.on_finish is not None:
            self.on_finish(seq, outcome)

    def _fail_running(self, message: str) -> None:
        out: list[Outbound] = []
        for seq in list(self.scheduler.running):
            if seq.kind is SeqKind.SEND:
                self.protocol.stop_send(seq, message)
                continue
            self.outputs.error(seq, Error(code="engine_failure", message=message), out)
            self.finish(seq, "error")
        if out:
            self.emit(out)

    # ------------------------------------------------------------------ commands

    def _apply(self, cmd: Command) -> None:
        if isinstance(cmd, ActionCmd):
            self.protocol.apply(cmd)
        elif isinstance(cmd, GenerateCmd):
            self._on_generate(cmd)
        elif isinstance(cmd, CancelCmd):
            self._on_cancel(cmd)
        elif isinstance(cmd, SendDoneCmd):
            self.counters.kv_bytes_sent += self.protocol.send_done(cmd)
        elif isinstance(cmd, WritesOverCmd):
            self.protocol.writes_over(cmd.request_id)
        elif isinstance(cmd, MigrationCmd):
            self.protocol.migrations.landed(cmd)
        elif isinstance(cmd, FenceCmd):
            self.counters.fences += 1
            n = self.protocol.fence(cmd.reason)
            log.warning("fenced: %s; dropped %d supervised request(s) for their routers to resume", cmd.reason, n)
        elif isinstance(cmd, CallCmd):
            cmd.reply(cmd.fn())

    def check_prompt(self, request_id: str, n: int) -> Error | None:
        if n >= self.max_model_len:
            return Error(code="prompt_too_long", field="prompt",
                         message=f"prompt has {n} tokens; this engine's context is {self.max_model_len} tokens "
                                 "and at least one must be left for the output", request_id=request_id)
        if n == 0:
            return Error(code="invalid_request", field="prompt", message="empty prompt", request_id=request_id)
        return None

    def generate_ctx(self, *, stream_subject: str, content_type: ContentType, include_usage: bool,
                     sampling: SamplingParams, trace: object, label: str, supervisor: str = "",
                     output_offset: int = 0, streamed: list[int] | None = None) -> GenerateCtx:
        detok = Detokenizer(self.loaded.tokenizer, sampling.stop, skip_special_tokens=sampling.skip_special_tokens,
                            include_stop=sampling.include_stop_str_in_output)
        if streamed:
            detok.prime(streamed)
        state = SamplingState.from_params(sampling, output_offset)
        ends = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.outputs.eos_token_ids))
        logits = LogitsSettings(presence_penalty=sampling.presence_penalty,
                                frequency_penalty=sampling.frequency_penalty,
                                repetition_penalty=sampling.repetition_penalty, min_tokens=sampling.min_tokens,
                                logit_bias=tuple(sorted(sampling.logit_bias.items())),
                                end_token_ids=tuple(sorted(ends)))
        return GenerateCtx(
            stream_subject=stream_subject, content_type=content_type, include_usage=include_usage,
            sampling=state, logits=logits, logprobs=sampling.logprobs, max_tokens=sampling.max_tokens,
            stop_token_ids=frozenset(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos, detok=detok, trace=trace, label=label, supervisor=supervisor,
            output_offset=output_offset,
            grammar=None if sampling.structured_output is None
            else self.grammars.matcher(sampling.structured_output, streamed or ()),
        )

    def _on_generate(self, cmd: GenerateCmd) -> None:
        rid = cmd.request_id
        err = self.check_prompt(rid, len(cmd.token_ids))
        if err is None and rid in self.protocol.dropped:
            err = Error(code="conflict", message="request was cancelled", request_id=rid)
        queued = len(self.scheduler.waiting) + len(self.scheduler.parked)
        if err is None and queued >= self.max_queued:
            err = Error(code="overloaded", request_id=rid,
                        message=f"engine {self.engine_id} has {queued} requests queued (its bound)")
        if err is None:
            seq = Sequence(request_id=rid, token_ids=list(cmd.token_ids), max_tokens=cmd.sampling.max_tokens)
            seq.ctx = self.generate_ctx(stream_subject=cmd.stream_subject, content_type=cmd.content_type,
                                        include_usage=cmd.include_usage, sampling=cmd.sampling, trace=cmd.trace,
                                        label=rid)
            try:
                self.scheduler.add(seq)
                return
            except DuplicateRequest as exc:
                err = Error(code="conflict", message=str(exc), request_id=rid)
            except NeverFits as exc:
                err = Error(code="prompt_too_long", field="prompt", message=str(exc), request_id=rid)
        self.emit([Outbound(cmd.stream_subject, err, cmd.content_type)])

    def _on_cancel(self, cmd: CancelCmd) -> None:
        """A client's cancel, by the id it knows: a direct request's id or a routed request's label. A running
        request ends here with Final(cancelled); a parked one is dropped quietly (its router ends the stream)."""
        cancelled = [s for s in list(self.scheduler.by_id.values()) if s.kind is SeqKind.GENERATE
                     and cmd.request_id in (s.request_id, gen_ctx(s).label)]
        out: list[Outbound] = []
        why = f"cancelled: {cmd.reason}" if cmd.reason else "cancelled"
        for seq in cancelled:
            if seq.status is SeqStatus.PARKED:
                self.protocol.drop_parked(seq, why)
                continue
            if seq.status is SeqStatus.FROZEN:  # migrating: whichever engine it runs on next ends it
                self.protocol.migrations.cancel_frozen(seq, cmd.reason or "cancelled")
                continue
            self.outputs.final(seq, "cancelled", out, stop_reason=cmd.reason or "cancelled")
            self.finish(seq, "cancelled")
            self.protocol.dropped.add(seq.request_id, why)
        if not cancelled:
            self.protocol.dropped.add(cmd.request_id, why)  # a cancel that overtook its request
        if out:
            self.emit(out)

    def _close_requests(self) -> None:
        """The loop is ending: supervised requests are dropped for their routers to resume elsewhere, direct ones
        get an Error, and every command still queued is answered."""
        self.protocol.fence("engine stopping")
        out: list[Outbound] = []
        for seq in [s for s in self.scheduler.by_id.values() if s.kind is SeqKind.GENERATE]:
            self.outputs.error(seq, Error(code="engine_failure", message=f"engine {self.engine_id} stopped"), out)
            self.finish(seq, "error")
        while True:
            try:
                cmd = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, ActionCmd):
                cmd.reply(Error(code="engine_failure", message=f"engine {self.engine_id} is stopping",
                                request_id=getattr(cmd.msg, "request_id", "")))
            elif isinstance(cmd, GenerateCmd):
                out.append(Outbound(cmd.stream_subject, Error(code="engine_failure", request_id=cmd.request_id,
                                                              message=f"engine {self.engine_id} is stopping"),
                                    cmd.content_type))
            elif isinstance(cmd, CallCmd):
                cmd.reply(None)
        if out:
            self.emit(out)

    # ------------------------------------------------------------------ KV events

    def _collect_kv_events(self, out: list[Outbound]) -> None:
        events = self.cache.drain_events()
        if events and self.kv_events_subject:
            self._kv_event_seq += 1
            out.append(Outbound(self.kv_events_subject, KVEventBatch(
                engine_id=self.engine_id, seq=self._kv_event_seq, events=events)))

    def kv_snapshot(self) -> KVEventBatch:
        """Every cached page hash, as of the last published batch (call on the compute thread)."""
        hashes = self.cache.page_hashes()
        return KVEventBatch(engine_id=self.engine_id, seq=self._kv_event_seq,
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

"""Every message that crosses the bus, as msgspec Structs — the wire contract of busserve.

Nothing else defines a payload. Rules that keep the contract stable:

* Each struct is tagged (``"type": "<tag>"``) so unions decode by tag; when a subject carries one type, the tag
  may be omitted by the sender (JSON clients in other languages need not spell it).
* Fields are keyword-only, appended last with defaults: old readers ignore new fields, new readers default
  missing ones.
* Ranges live in the type (``Annotated[..., Meta(...)]``) so that decoding *is* validation; cross-field rules
  live in ``__post_init__`` and raise :class:`InvalidField`, so the resulting :class:`Error` names the field.

See ``schemas/`` for the generated JSON Schema and AsyncAPI document, and ``busserve/bus/subjects.py`` for which
subject carries which message.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

# Identifiers that may appear inside NATS subjects must be single, wildcard-free tokens.
RequestId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-:]{1,128}$", description="Client- or router-chosen id")]
EngineId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="Engine id (a subject token)")]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default bound

MAX_PROMPT_TOKENS = 1 << 20
MAX_STOP_STRINGS = 16
MAX_GRAMMAR_CHARS = 1 << 16

FinishReason = Literal["stop", "length", "cancelled"]
ErrorCode = Literal[
    "invalid_request",  # a value is missing, of the wrong type or out of range (``field`` says which)
    "malformed",  # bytes that do not decode at all
    "payload_too_large",  # over the server's max_payload
    "prompt_too_long",  # prompt (plus max_tokens) does not fit the model's context
    "unknown_model",
    "unknown_request",  # a request id the engine does not hold
    "conflict",  # e.g. duplicate prep_recv, begin != end
    "no_engine",  # nobody serves the subject / no engine fits
    "overloaded",
    "timeout",
    "lease_expired",  # a parked request was never started
    "transfer_failed",
    "engine_failure",
    "router_failure",  # the router that accepted the request stopped before an engine took it
    "stream_gap",  # a consumer saw a token index out of order: an event was lost on the way
    "internal",
]
Role = Literal["prefill", "decode"]
Transport = Literal["shm", "bus", "nvshmem", "mooncake", "cuda_ipc"]


class InvalidField(ValueError):
    """Raised by ``__post_init__`` checks; keeps the name of the offending field for the Error reply."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidField(name, f"must be a finite number, got {value!r}")


class _Msg(Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every bus message (keyword-only, defaults omitted on the wire, tagged by ``type``)."""


# --------------------------------------------------------------------------------------------- requests


class StructuredOutput(_Msg, tag="structured_output"):
    """The output's format, enforced on the engine as a token mask (llguidance): exactly one of a JSON Schema
    (``{"type": "object"}`` for any JSON object), a regular expression, a list of choices, or a grammar (Lark, or
    GBNF as llama.cpp writes it). The output ends where the format is complete."""

    json_schema: dict[str, Any] | None = None
    regex: Annotated[str, Meta(min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None
    choice: Annotated[list[Annotated[str, Meta(min_length=1, max_length=4096)]],
                      Meta(min_length=1, max_length=1024)] | None = None
    grammar: Annotated[str, Meta(min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None
    # JSON only: the whitespace allowed between tokens of the value (a regex; vLLM's guided_whitespace_pattern).
    # None: none beyond ", " and ": " (a small model given free whitespace pads values with newlines).
    whitespace_pattern: Annotated[str, Meta(min_length=1, max_length=256)] | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise InvalidField("structured_output", f"give exactly one of json_schema, regex, choice, grammar (got {got})")
        if self.whitespace_pattern is not None and self.json_schema is None:
            raise InvalidField("structured_output.whitespace_pattern", "applies to json_schema only")


class SamplingParams(_Msg, tag="sampling"):
    """How to pick tokens and when to stop. Defaults follow the OpenAI API."""

    max_tokens: Annotated[int, Meta(ge=1, le=MAX_PROMPT_TOKENS)] = 256
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=-1, description="0 or -1: disabled")] = 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=512)]], Meta(max_length=MAX_STOP_STRINGS)] = (
        field(default_factory=list)
    )
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] = field(default_factory=list)
    ignore_eos: bool = False
    # Penalties on the logits, before temperature (the OpenAI and vLLM definitions): presence and frequency count
    # the output so far; repetition (HF / vLLM: divide positive logits, multiply negative ones) counts prompt and
    # output. 0, 0 and 1 leave the logits alone.
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    # No end of sequence (EOS or stop_token_ids) before this many output tokens.
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 0
    # Added to the logits of these token ids (OpenAI: -100 bans a token, 100 forces it).
    logit_bias: Annotated[dict[TokenId, Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=1024)] = (
        field(default_factory=dict)
    )
    # Log-probabilities on every TokenChunk: the sampled token's and the ``logprobs`` likeliest others' (0: the
    # sampled token's alone). From the model's own logits (log_softmax before penalties and temperature, as
    # vLLM reports them). None: none.
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    include_stop_str_in_output: bool = False  # the stop string that ended the output is part of its text
    skip_special_tokens: bool = True  # special tokens (EOS, chat markers) are left out of the text
    structured_output: StructuredOutput | None = None  # the format the output must have (None: free text)

    def __post_init__(self) -> None:
        _finite("temperature", self.temperature)
        _finite("top_p", self.top_p)
        _finite("min_p", self.min_p)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            _finite(name, getattr(self, name))
        for tok, bias in self.logit_bias.items():
            _finite(f"logit_bias[{tok}]", bias)
        if self.min_tokens > self.max_tokens:
            raise InvalidField("min_tokens", f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")


class StreamOptions(_Msg, tag="stream_options"):
    include_usage: bool = True
    # Encoding of events on the stream subject; None = the encoding the request arrived in.
    content_type: Literal["msgpack", "json"] | None = None


class ToolCall(_Msg, tag="tool_call"):
    """A function call the model made (an assistant message's), as OpenAI spells it: ``arguments`` is JSON text."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-.]{1,64}$")]
    arguments: Annotated[str, Meta(max_length=1 << 20)] = "{}"


class ChatMessage(_Msg, tag="chat_message"):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, Meta(max_length=4 * MAX_PROMPT_TOKENS)]
    tool_calls: Annotated[list[ToolCall], Meta(max_length=128)] | None = None  # an assistant's earlier calls
    tool_call_id: Annotated[str, Meta(max_length=128)] | None = None  # a tool message: the call it answers
    name: Annotated[str, Meta(max_length=128)] | None = None  # a tool message: the function's name


class GenerateRequest(_Msg, tag="generate"):
    """A client's request. Published on the generate subject; the NATS reply-to is the stream subject.

    Exactly one of ``prompt``, ``messages`` or ``prompt_token_ids`` is given.
    """

    request_id: RequestId | None = None
    model: Annotated[str, Meta(max_length=256)] = ""
    prompt: Annotated[str, Meta(min_length=1, max_length=4 * MAX_PROMPT_TOKENS)] | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=4096)] | None = None
    prompt_token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: StreamOptions = field(default_factory=StreamOptions)
    # How many times a router may resume the request on another engine if its engine is lost mid-stream
    # (None: the router's default, 2 unless configured).
    resume_limit: Annotated[int, Meta(ge=0, le=16)] | None = None
    # Run the whole request on this engine if it is up and serves the model, else as the strategy decides: where
    # an earlier request left the same prompt in the engine's prefix cache (the choices of an ``n`` > 1 request).
    engine_hint: EngineId | None = None
    # Function definitions for the chat template (OpenAI's ``tools``: {"type": "function", "function": {"name",
    # "description", "parameters"}}); with ``messages`` only, and only for a model whose template takes tools.
    tools: Annotated[list[dict[str, Any]], Meta(max_length=128)] | None = None

    def __post_init__(self) -> None:
        if self.tools is not None and self.messages is None:
            raise InvalidField("tools", "tools go with messages (the chat template renders them)")
        given = [n for n in ("prompt", "messages", "prompt_token_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InvalidField(
                "prompt", f"give exactly one of prompt, messages, prompt_token_ids (got {', '.join(given) or 'none'})"
            )


class Cancel(_Msg, tag="cancel"):
    request_id: RequestId
    reason: str = ""


class Resend(_Msg, tag="resend"):
    """A client missed part of its stream — a TokenChunk arrived past the index it expected, or its connection came
    back from an outage — and asks for the events again from output index ``from_index`` (on ``resend.<owner>``,
    like a cancel). ``request_id``: the client's id for the request. Events that come twice are the same events:
    a reader skips a TokenChunk that ends at or before the index it expects."""

    request_id: RequestId
    from_index: Annotated[int, Meta(ge=0)] = 0


class ResendStream(_Msg, tag="resend_stream"):
    """Router → engines (``busserve.v1.resend``): publish again the events this engine sent to ``stream_subject``,
    from output index ``from_index`` on (the engine that has them answers; the others have nothing to send)."""

    stream_subject: str
    from_index: Annotated[int, Meta(ge=0)] = 0


# --------------------------------------------------------------------------------------------- stream events


class Usage(_Msg, tag="usage"):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache or a transfer, not computed here


class TopLogprob(_Msg, tag="top_logprob"):
    token_id: int
    logprob: float


class TokenLogprob(_Msg, tag="token_logprob"):
    """One output token's log-probability and, likeliest first, those of the alternatives asked for."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


class TokenChunk(_Msg, tag="token"):
    """New output tokens. ``index`` is the position of ``token_ids[0]`` in the output. ``logprobs``: one per token
    when the request asked (``SamplingParams.logprobs``)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] | None = None


class Final(_Msg, tag="final"):
    """The last event of a successful (or cancelled) request."""

    request_id: str
    finish_reason: FinishReason
    usage: Usage | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended the request
    engine_id: str = ""


class Error(_Msg, tag="error"):
    """A failure, as data. On a stream it is terminal; as a reply it answers the request."""

    code: ErrorCode
    message: str
    field: str | None = None
    request_id: str = ""


class StreamStatus(_Msg, tag="status"):
    """Who holds the request now, so that a consumer can tell a dead owner from a slow one. Not terminal, carries
    no tokens; consumers that do not care skip it. A router sends one on accepting the request (``owner_kind``
    router), the engine that starts generating sends one before its first token (``owner_kind`` engine, with the
    router that supervises it)."""

    request_id: str
    owner: str
    owner_kind: Literal["router", "engine"]
    supervisor: str = ""  # the router that resumes the request if its engine dies
    heartbeat_s: float = 1.0  # the owner's heartbeat interval (routers.status / engines.status)


StreamEvent = TokenChunk | Final | Error | StreamStatus
TERMINAL_EVENTS = (Final, Error)


# --------------------------------------------------------------------------------------------- microserving actions


class KVAddress(_Msg, tag="kv_addr"):
    """Where a sender must write: the receiver's reserved pages for positions ``[start, end)``.

    Position ``p`` lives in page ``pages[(p - start) // page_size]`` at offset ``(p - start) % page_size``.
    ``layout`` names the axes of the receiver's pool; ``handle`` is transport-specific (the shared-memory segment
    name for ``shm``, the data subject for ``bus``).
    """

    engine_id: EngineId
    request_id: RequestId
    transport: Transport
    start: int
    end: int
    pages: list[int]
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layout: str = "layer,kv,page,slot,head,dim"
    handle: str = ""
    pool_pages: int = 0
    # Unix time after which no sender may write: a receive dropped before then keeps its pages in quarantine until
    # this moment (or until the sender is known to have stopped), so a late write never lands in reused pages.
    expires_at: float = 0.0
    # Transports the receiver also accepts for this reservation, in order: a sender that cannot use ``transport``
    # (the receiver's shm segment is not visible from where it runs) writes over the first of these it has.
    fallbacks: list[Transport] = []


class PrepRecv(_Msg, tag="prep_recv"):
    """On the receiver: match a cached prefix of ``prompt[:end]``, reserve the rest, park the request."""

    request_id: RequestId
    prompt_token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
    end: Annotated[int, Meta(ge=0)]
    stream_subject: Annotated[str, Meta(min_length=1, max_length=512)]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: StreamOptions = field(default_factory=StreamOptions)
    model: str = ""
    lease_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 30.0
    transport: Transport | None = None  # the transport the sender can use; None = the receiver's best
    # The id events on the stream carry (the client's request id); routers give engines ids of their own.
    label: Annotated[str, Meta(max_length=128)] = ""
    # Resuming a request elsewhere: the last ``output_offset`` tokens of ``prompt_token_ids`` are output already
    # streamed; the stream goes on at that index, and usage and ``max_tokens`` count them.
    output_offset: Annotated[int, Meta(ge=0)] = 0
    # How long a sender may write into the reservation (sets ``kv_addr.expires_at``); longer than any remote_send.
    write_window_s: Annotated[float, Meta(gt=0.0, le=86400.0)] = 900.0
    sender_pid: Annotated[int, Meta(ge=0)] = 0  # shm: the sender's process; once it is gone its writes are over
    supervisor: Annotated[str, Meta(max_length=128)] = ""  # the router that owns the request until it starts
    # A running request moving here (live migration): ``end`` may exceed the tokens given — it reserves room for
    # the tokens the source decodes while its KV is copied; start_generate brings them (``extend``).
    migration: bool = False

    def __post_init__(self) -> None:
        if self.end > len(self.prompt_token_ids) and not self.migration:
            raise InvalidField("end", f"end {self.end} is beyond the prompt ({len(self.prompt_token_ids)} tokens)")
        if self.output_offset >= len(self.prompt_token_ids):
            raise InvalidField("output_offset", f"output_offset ({self.output_offset}) must leave at least one "
                                                f"prompt token ({len(self.prompt_token_ids)} given)")


class PrepRecvReply(_Msg, tag="prep_recv_reply"):
    request_id: str
    matched: int
    kv_addr: KVAddress


class RemoteSend(_Msg, tag="remote_send"):
    """On the sender: compute (or take from cache) the KV of ``prompt[:end]`` and write ``[begin, end)`` to
    ``kv_addr``, layer by layer; reply once every byte has landed."""

    request_id: RequestId
    prompt_token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
    kv_addr: KVAddress
    begin: Annotated[int, Meta(ge=0)]
    end: Annotated[int, Meta(ge=0)]
    model: str = ""

    def __post_init__(self) -> None:
        if self.begin > self.end:
            raise InvalidField("begin", f"begin ({self.begin}) must not exceed end ({self.end})")


class RemoteSendReply(_Msg, tag="remote_send_reply"):
    request_id: str
    bytes_sent: int
    layers: int
    computed_tokens: int  # tokens the sender prefilled for this call
    cached_tokens: int  # tokens the sender took from its own prefix cache
    duration_s: float  # from the sender receiving remote_send to the last byte landing
    compute_s: float = 0.0  # from receiving remote_send to the last layer's KV being computed
    transfer_busy_s: float = 0.0  # time spent writing; (duration_s - compute_s) of it was not hidden by compute
    transport: Transport | None = None  # what carried the KV (a fallback of the reservation's when that failed)


class StartGenerate(_Msg, tag="start_generate"):
    """On the receiver: prefill ``prompt[begin:]`` over the received KV, then decode to the stream."""

    request_id: RequestId
    begin: Annotated[int, Meta(ge=0)]
    # At most this many of the request's prompt tokens per step while other requests decode on the engine (each
    # step stalls them for its whole prefill chunk); 0: the engine's own token budget.
    prefill_chunk: Annotated[int, Meta(ge=0)] = 0
    # Live migration: the tokens the source streamed after prep_recv (they follow prep_recv's tokens); ``begin``
    # then says how many positions of KV landed (at most prep_recv's ``end``).
    extend: Annotated[list[TokenId], Meta(max_length=MAX_PROMPT_TOKENS)] = field(default_factory=list)


class StartGenerateReply(_Msg, tag="start_generate_reply"):
    request_id: str
    engine_id: str


class Abort(_Msg, tag="abort"):
    """Drop a request on one engine. With ``notify`` the engine publishes the terminal event if it owns one.
    ``sender_stopped``: every engine that was writing KV into this request's reservation has stopped (the router
    aborted it first), so the pages need no quarantine."""

    request_id: RequestId
    notify: bool = False
    reason: str = ""
    sender_stopped: bool = False


class AbortReply(_Msg, tag="abort_reply"):
    request_id: str
    found: bool
    notified: bool  # this abort made the engine publish the request's terminal event
    terminated: bool = False  # the engine had already published the request's terminal event before


class Migrate(_Msg, tag="migrate"):
    """Live migration, on the source engine of a running request.

    ``start``: copy the request's KV into ``kv_addr`` (the target's reservation) in rounds while it keeps
    decoding — each round the positions computed since the last — then, once at most ``final_tokens`` are left (or
    after ``max_rounds``), stop it (no event on its stream), copy the rest and reply with its tokens. The request
    stays here, stopped, until ``release`` (it runs on the target now: drop it) or ``resume`` (the target failed:
    decode on here)."""

    request_id: RequestId
    phase: Literal["start", "release", "resume"] = "start"
    kv_addr: KVAddress | None = None
    final_tokens: Annotated[int, Meta(ge=1, le=4096)] = 16
    max_rounds: Annotated[int, Meta(ge=1, le=64)] = 8


class MigrateReply(_Msg, tag="migrate_reply"):
    """The request is stopped on the source: its tokens (prompt and output) and how many positions of KV landed."""

    request_id: str
    token_ids: list[int]
    end: int
    num_output: int  # output tokens streamed, resumed ones included
    rounds: int = 0
    bytes_sent: int = 0
    copy_s: float = 0.0  # from start to the last byte landed
    stopped_s: float = 0.0  # how long the request was stopped on the source before this reply


class Drain(_Msg, tag="drain"):
    """Ask an engine to drain (what SIGTERM does): it takes no new work, says ``draining`` in its heartbeat — routers
    then migrate its running requests elsewhere — and stops once it holds none, or after ``grace_s``."""

    grace_s: Annotated[float, Meta(gt=0.0, le=86400.0)] = 60.0


class Renew(_Msg, tag="renew"):
    """Extend the lease of a parked request (the router does, while its strategy is still working on it)."""

    request_id: RequestId
    lease_s: Annotated[float, Meta(gt=0.0, le=3600.0)]


class RenewReply(_Msg, tag="renew_reply"):
    request_id: str
    lease_s: float


ProbeState = Literal["waiting", "running", "parked", "sending", "ended", "dropped", "unknown"]


class Probe(_Msg, tag="probe"):
    """Ask an engine what it knows of a request (the router does when a stream goes quiet)."""

    request_id: RequestId


class ProbeReply(_Msg, tag="probe_reply"):
    """``ended``: this engine published the request's terminal event (``terminal`` says which); ``dropped``: it was
    cancelled, aborted, expired or fenced here without one (``reason``); ``unknown``: never seen, or forgotten."""

    request_id: str
    state: ProbeState
    num_output: int = 0  # output tokens streamed so far, resumed ones included
    terminal: Literal["final", "error"] | None = None
    reason: str = ""


# --------------------------------------------------------------------------------------------- KV data over the bus


class KVChunk(_Msg, tag="kv_chunk", gc=False):
    """Positions ``[begin, end)`` of one layer, K then V, each ``[end-begin, num_kv_heads, head_dim]``."""

    request_id: str
    layer: int
    begin: int
    end: int
    data: bytes


class KVCommit(_Msg, tag="kv_commit"):
    """Sent after the last chunk; the receiver replies once ``chunks`` chunks have been written. With ``transport``
    shm (published, no reply): the sender has stopped writing into the receiver's pool for this request."""

    request_id: str
    chunks: int
    nbytes: int
    transport: Transport = "bus"


class KVCommitReply(_Msg, tag="kv_commit_reply"):
    request_id: str
    chunks: int


class NvshmemIdRequest(_Msg, tag="nvshmem_id_request"):
    """A rank asks rank 0 of an NVSHMEM group for the group's unique id (bootstrap over the bus, no MPI)."""

    group: Annotated[str, Meta(min_length=1, max_length=128)]
    rank: Annotated[int, Meta(ge=1)]
    world_size: Annotated[int, Meta(ge=2, le=4096)]


class NvshmemId(_Msg, tag="nvshmem_id"):
    """Rank 0's answer: the opaque NVSHMEM unique id every rank passes to its ``init``."""

    group: str
    world_size: int
    unique_id: Annotated[bytes, Meta(max_length=4096)]


# --------------------------------------------------------------------------------------------- cluster state


class EngineStatus(_Msg, tag="engine_status"):
    """Heartbeat of one engine; the cluster view is built from these."""

    engine_id: EngineId
    model: str
    roles: list[Role]
    running: int
    waiting: int
    parked: int
    free_pages: int
    total_pages: int
    page_size: int
    max_model_len: int
    transports: list[Transport]
    host: str = ""
    pid: int = 0
    # Engines with equal non-empty shm domains see one /dev/shm (busserve.kv.locality); "" from older engines.
    shm_domain: str = ""
    cached_pages: int = 0
    prefix_hit_rate: float = 0.0
    interval_s: float = 1.0
    seq: int = 0
    metrics_url: str = ""
    draining: bool = False
    pending_prefill_tokens: int = 0  # prompt tokens queued or mid-prefill here
    decoding: int = 0  # requests past their prefill, generating
    # "stopped": the engine's last heartbeat; it has dropped every request a router supervises (they are the
    # routers' to resume) and takes nothing more.
    state: Literal["serving", "draining", "stopped"] = "serving"
    quarantined_pages: int = 0  # pages of dropped receives kept until no sender can still write into them
    prompt_tokens_computed: int = 0  # prompt tokens this engine has computed since it started (cache hits excluded)
    # Measured by the engine as it serves (busserve.engine.step_rates); 0 until measured.
    prefill_tokens_per_s: float = 0.0
    decode_step_s: float = 0.0
    prefill_share: float = 0.0  # of the last ~30 s spent computing prompts (a decoder here waits that share)


class KVStored(_Msg, tag="kv_stored"):
    """Pages now in the engine's prefix cache, as chained page hashes (see ``busserve.kv.page_hash``)."""

    page_hashes: list[int]
    parent_hash: int | None = None


class KVRemoved(_Msg, tag="kv_removed"):
    page_hashes: list[int]


class KVCleared(_Msg, tag="kv_cleared"):
    pass


KVEvent = KVStored | KVRemoved | KVCleared


class KVEventBatch(_Msg, tag="kv_events"):
    """KV events of one engine step. ``seq`` grows by one per batch; a snapshot carries the seq it reflects, so a
    listener applies only later batches on top of it."""

    engine_id: EngineId
    seq: int
    events: list[KVEvent]


class KVSnapshotRequest(_Msg, tag="kv_snapshot"):
    """Ask an engine for every page hash in its prefix cache (answered with a KVEventBatch)."""


StrategyParam = str | int | float | bool


class RoutedRequest(_Msg, tag="routed"):
    """A request a router has accepted and tokenized, handed to a strategy running as its own process."""

    request_id: RequestId
    prompt_token_ids: list[TokenId]
    stream_subject: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: StreamOptions = field(default_factory=StreamOptions)
    model: str = ""
    params: dict[str, StrategyParam] = field(default_factory=dict)
    label: str = ""  # the client's request id (what stream events carry)
    supervisor: str = ""  # the router that forwarded it and supervises it once started


class StrategyResult(_Msg, tag="strategy_result"):
    """A strategy process's answer: which engine owns the request now (start_generate accepted) and which
    engines it touched (for cleanup if it failed)."""

    request_id: str
    started_on: str | None = None
    touched: list[str] = field(default_factory=list)
    error: Error | None = None
    senders: list[str] = field(default_factory=list)  # the touched engines that were asked to remote_send


class SetStrategy(_Msg, tag="set_strategy"):
    """Switch the strategy for new requests; in-flight requests finish under their own."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    params: dict[str, StrategyParam] = field(default_factory=dict)


class StrategyState(_Msg, tag="strategy_state"):
    """The active strategy as stored in the config bucket (and the reply to SetStrategy)."""

    name: str
    params: dict[str, StrategyParam] = field(default_factory=dict)
    revision: int = 0
    updated_by: str = ""


class SetRoles(_Msg, tag="set_roles"):
    engine_id: EngineId
    roles: Annotated[list[Role], Meta(min_length=1)]


class RolesState(_Msg, tag="roles_state"):
    engine_id: str
    roles: list[Role]


class RouterStatus(_Msg, tag="router_status"):
    router_id: str
    strategy: str
    params: dict[str, StrategyParam] = field(default_factory=dict)
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    interval_s: float = 1.0
    metrics_url: str = ""
    resumed: int = 0  # requests resumed on another engine after theirs was lost
    migrated: int = 0  # running requests moved live to another engine (drains, rebalancing)


class Ack(_Msg, tag="ack"):
    """Generic positive reply to a control message."""

    detail: str = ""


# Every message type, for schema export and round-trip tests.
ALL_MESSAGES: tuple[type[Struct], ...] = (
    SamplingParams,
    StreamOptions,
    ChatMessage,
    GenerateRequest,
    Cancel,
    Resend,
    ResendStream,
    Usage,
    TokenChunk,
    Final,
    Error,
    KVAddress,
    PrepRecv,
    PrepRecvReply,
    RemoteSend,
    RemoteSendReply,
    StartGenerate,
    StartGenerateReply,
    Abort,
    AbortReply,
    Renew,
    RenewReply,
    Probe,
    ProbeReply,
    Migrate,
    MigrateReply,
    Drain,
    StreamStatus,
    KVChunk,
    KVCommit,
    KVCommitReply,
    NvshmemIdRequest,
    NvshmemId,
    EngineStatus,
    KVStored,
    KVRemoved,
    KVCleared,
    KVEventBatch,
    KVSnapshotRequest,
    RoutedRequest,
    StrategyResult,
    SetStrategy,
    StrategyState,
    SetRoles,
    RolesState,
    RouterStatus,
    Ack,
)


def error_from_exception(exc: BaseException, request_id: str = "") -> Error:
    """Turn a msgspec decode/validation failure (or an InvalidField) into an Error naming the field."""
    if isinstance(exc, InvalidField):
        return Error(code="invalid_request", message=str(exc), field=exc.field, request_id=request_id)
    if isinstance(exc, msgspec.ValidationError):
        cause = exc.__cause__
        text = str(exc)
        path = _path_of(text)
        if isinstance(cause, InvalidField):
            field_name = f"{path}.{cause.field}" if path else cause.field
            return Error(code="invalid_request", message=str(cause), field=field_name, request_id=request_id)
        return Error(code="invalid_request", message=text, field=path, request_id=request_id)
    if isinstance(exc, msgspec.DecodeError):
        return Error(code="malformed", message=f"payload does not decode: {exc}", request_id=request_id)
    return Error(code="internal", message=f"{type(exc).__name__}: {exc}", request_id=request_id)


def _path_of(text: str) -> str | None:
    """msgspec reports ``... - at `$.sampling.temperature```; return ``sampling.temperature``."""
    marker = " - at `$"
    at = text.rfind(marker)
    if at < 0:
        return None
    path = text[at + len(marker) :].rstrip("`")
    return path.lstrip(".") or None


def to_builtins(msg: Struct) -> Any:
    return msgspec.to_builtins(msg)

"""The OpenAI-compatible HTTP front: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``.

It is one more bus client: each HTTP request becomes a GenerateRequest on the generate subject and its stream is
read back — no shortcut into the router. Streaming responses are Server-Sent Events in OpenAI's chunk format,
with a usage chunk when ``stream_options.include_usage`` is set; a client that disconnects cancels its request.
Errors are OpenAI-shaped JSON with the status code their cause deserves (400, 404, 429, 503, 504).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.msg import Msg
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import busserve
from busserve import structured_output
from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.errors import BusserveError, MalformedMessage, http_status
from busserve.messages import (
    ChatMessage,
    EngineStatus,
    Error,
    Final,
    GenerateRequest,
    RouterStatus,
    StreamEvent,
    TokenChunk,
    TokenLogprob,
)
from busserve.router import openai_tools
from busserve.router.openai_choices import best, choice_requests, merged
from busserve.router.openai_logprobs import CompletionLogprobs, TokenTexts, chat_content
from busserve.router.openai_requests import (
    BadRequest,
    DetokenizeBody,
    TokenizeBody,
    chat_request,
    choices_asked,
    completion_request,
    decode,
    format_parameter,
    message_text,
)
from busserve.tokenization import prompt_token_ids, vocab_size

RETRY_AFTER_S = 1  # what a 429 or 503 tells a client to wait before trying again
ERROR_TYPE = {400: "invalid_request_error", 404: "not_found_error", 409: "invalid_request_error",
              413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
STALE_S = 3.5  # a heartbeat older than this is a process gone
HEADERS_AFTER_S = 0.5  # a stream with no first event by then gets its headers and keep-alives meanwhile
KEEPALIVE_S = 10.0
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(code: str, message: str, param: str | None = None) -> JSONResponse:
    status = http_status(code)
    body = {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": "model_not_found" if code == "unknown_model" else code}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------ the app


class Front:
    def __init__(self, bus: Bus, first_event_timeout_s: float = 600.0, tokenizer: Any = None) -> None:
        self.bus = bus
        self.tokenizer = tokenizer  # for /tokenize, /detokenize and log-probabilities' token texts (the router's)
        self.texts = TokenTexts(tokenizer) if tokenizer is not None else None
        self.first_event_timeout_s = first_event_timeout_s
        self.engines: dict[str, tuple[float, EngineStatus]] = {}
        self.routers: dict[str, tuple[float, RouterStatus]] = {}
        self.observers: list[Any] = []

    async def start(self) -> None:
        await self.bus.subscribe(self.bus.subjects.engines_status(), self._on_engine)
        await self.bus.subscribe(self.bus.subjects.routers_status(), self._on_router)

    async def _on_engine(self, msg: Msg) -> None:
        with contextlib.suppress(MalformedMessage):
            st = codec.decode(msg.data, EngineStatus, msg.headers)
            self.engines[st.engine_id] = (time.monotonic(), st)

    async def _on_router(self, msg: Msg) -> None:
        with contextlib.suppress(MalformedMessage):
            st = codec.decode(msg.data, RouterStatus, msg.headers)
            self.routers[st.router_id] = (time.monotonic(), st)

    def live_engines(self) -> list[EngineStatus]:
        now = time.monotonic()
        return [st for seen, st in self.engines.values() if now - seen < STALE_S]

    def live_routers(self) -> list[RouterStatus]:
        now = time.monotonic()
        return [st for seen, st in self.routers.values() if now - seen < STALE_S]

    # -------------------------------------------------------------- endpoints

    async def health(self, request: Request) -> JSONResponse:
        engines, routers = self.live_engines(), self.live_routers()
        ok = bool(engines) and bool(routers)
        body = {"status": "ok" if ok else "unavailable", "engines": len(engines), "routers": len(routers),
                "strategy": routers[0].strategy if routers else None}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def models(self, request: Request) -> JSONResponse:
        names = sorted({st.model for st in self.live_engines()})
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "busserve"} for n in names]})

    async def model(self, request: Request) -> JSONResponse:
        name = request.path_params["model"]
        if name not in {st.model for st in self.live_engines()}:
            return error_response("unknown_model", f"model {name!r} is not served here", "model")
        return JSONResponse({"id": name, "object": "model", "created": 0, "owned_by": "busserve"})

    async def version(self, request: Request) -> JSONResponse:
        return JSONResponse({"version": busserve.__version__})

    async def tokenize(self, request: Request) -> Response:
        if self.tokenizer is None:
            return error_response("no_engine", "this front has no tokenizer")
        try:
            body = decode(await request.body(), TokenizeBody)
            if (body.prompt is None) == (body.messages is None):
                raise BadRequest("give exactly one of prompt and messages", "prompt")
            gen = GenerateRequest(prompt=body.prompt, messages=None if body.messages is None else [
                ChatMessage(role=m.role, content=message_text(m, i)) for i, m in enumerate(body.messages)])
            loop = asyncio.get_running_loop()  # tokenizing is CPU work: off the event loop, as the router does
            if body.prompt is not None and not body.add_special_tokens:
                ids = await loop.run_in_executor(None, lambda: list(self.tokenizer(
                    body.prompt, add_special_tokens=False)["input_ids"]))
            else:
                ids = await loop.run_in_executor(None, prompt_token_ids, self.tokenizer, gen)
        except BadRequest as exc:
            return error_response("invalid_request", str(exc), exc.param)
        except BusserveError as exc:
            return error_response(exc.code, str(exc), exc.field)
        limits = [st.max_model_len for st in self.live_engines()]
        return JSONResponse({"count": len(ids), "max_model_len": min(limits) if limits else None, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        if self.tokenizer is None:
            return error_response("no_engine", "this front has no tokenizer")
        try:
            body = decode(await request.body(), DetokenizeBody)
        except BadRequest as exc:
            return error_response("invalid_request", str(exc), exc.param)
        vocab = vocab_size(self.tokenizer)
        for i, t in enumerate(body.tokens):
            if t >= vocab:
                return error_response("invalid_request", f"token id {t} is outside the vocabulary (size {vocab})",
                                      f"tokens[{i}]")
        return JSONResponse({"prompt": self.tokenizer.decode(body.tokens)})

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, chat_request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, completion_request, chat=False)

    async def _complete(self, request: Request, build: Any, chat: bool) -> Response:
        try:
            gen, body = build(await request.body())
            n, best_of = choices_asked(body)
        except BadRequest as exc:
            return error_response("invalid_request", str(exc), exc.param)
        tools = None
        if chat:
            try:
                tools = openai_tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls,
                                          getattr(self.tokenizer, "chat_template", None))
            except openai_tools.ToolsRefused as exc:
                return error_response("invalid_request", str(exc), exc.param)
        if tools is not None:
            gen.tools = tools.tools
            forced = tools.structured_output()
            if forced is not None:
                if gen.sampling.structured_output is not None:
                    return error_response("invalid_request", f"tool_choice={tools.choice!r} decides the output's "
                                          f"format; drop {format_parameter(body)}", format_parameter(body))
                gen.sampling = msgspec.structs.replace(gen.sampling, structured_output=forced)
        if gen.sampling.structured_output is not None:  # compiled here too, so that the 400 names the parameter
            try:
                await asyncio.get_running_loop().run_in_executor(None, structured_output.check,
                                                                 gen.sampling.structured_output)
            except structured_output.GrammarRejected as exc:
                return error_response("invalid_request", f"{format_parameter(body)}: {exc}", format_parameter(body))
        if body.user:
            trace.get_current_span().set_attribute("enduser.id", body.user)
        want_lp = gen.sampling.logprobs is not None
        if want_lp and self.texts is None:
            return error_response("invalid_request", "this front has no tokenizer to spell log-probabilities with",
                                  "logprobs")
        texts = self.texts.for_request(gen.sampling.skip_special_tokens) if want_lp and self.texts else None
        echo = ""
        if chat and body.echo:  # vLLM's: a last assistant message is repeated before what continues it
            last = gen.messages[-1] if gen.messages else None
            echo = last.content if last is not None and last.role == "assistant" else ""
        elif getattr(body, "echo", False):  # completions: the prompt's text comes first
            if gen.prompt is None and self.tokenizer is None:
                return error_response("invalid_request", "this front has no tokenizer to echo token ids with", "echo")
            echo = gen.prompt if gen.prompt is not None else self.tokenizer.decode(gen.prompt_token_ids)
        if best_of > n and not want_lp:  # best_of ranks by log-probability: asked of the engine, not shown
            gen.sampling = msgspec.structs.replace(gen.sampling, logprobs=0)
        stream = merged(self.bus, choice_requests(gen, best_of), self.first_event_timeout_s)
        model = body.model or next((st.model for st in self.live_engines()), "")
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + (gen.request_id or ""), "created": int(time.time()),
                "model": model}
        view = _View(chat, texts, echo, n, tools if tools is not None and tools.parses else None)
        first_task = asyncio.ensure_future(anext(stream))
        if body.stream:
            # A refusal that comes at once (overloaded, unknown model) keeps its HTTP status; a request that waits
            # longer (queued, a long prefill) gets its headers now and keep-alive comments until its first token,
            # so proxies and clients do not time it out.
            done, _ = await asyncio.wait({first_task}, timeout=HEADERS_AFTER_S)
            if not done:
                return StreamingResponse(self._sse_after_wait(first_task, stream, meta, view,
                                                              gen.stream.include_usage),
                                         media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            first = await first_task
        except (BusserveError, StopAsyncIteration) as exc:
            await stream.aclose()
            code = exc.code if isinstance(exc, BusserveError) else "internal"
            return error_response(code, str(exc) or "no response")
        if isinstance(first[1], Error):
            await stream.aclose()
            return error_response(first[1].code, first[1].message, first[1].field)
        if body.stream:
            return StreamingResponse(self._sse(first, stream, meta, view, gen.stream.include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await self._whole(first, stream, meta, view)

    async def _sse_after_wait(self, first_task: asyncio.Future[Tagged], stream: AsyncGenerator[Tagged, None],
                              meta: dict[str, Any], view: _View, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            yield KEEPALIVE
            while True:
                done, _ = await asyncio.wait({first_task}, timeout=KEEPALIVE_S)
                if done:
                    break
                yield KEEPALIVE
            try:
                first = first_task.result()
            except (BusserveError, StopAsyncIteration) as exc:
                code = exc.code if isinstance(exc, BusserveError) else "internal"
                yield _error_event(code, str(exc) or "no response")
                yield b"data: [DONE]\n\n"
                return
        except BaseException:
            first_task.cancel()
            await stream.aclose()  # the client went away while waiting: cancel the request
            raise
        async for part in self._sse(first, stream, meta, view, include_usage):
            yield part

    async def _whole(self, first: Tagged, stream: AsyncGenerator[Tagged, None], meta: dict[str, Any], view: _View
                     ) -> Response:
        got: dict[int, tuple[list[str], list[TokenLogprob], Final]] = {}
        text: dict[int, list[str]] = {}
        lps: dict[int, list[TokenLogprob]] = {}
        try:
            item: Tagged | None = first
            while item is not None:
                i, event = item
                if isinstance(event, TokenChunk):
                    text.setdefault(i, []).append(event.text)
                    lps.setdefault(i, []).extend(event.logprobs or [])
                elif isinstance(event, Final):
                    got[i] = (text.get(i, []), lps.get(i, []), event)
                elif isinstance(event, Error):
                    return error_response(event.code, event.message, event.field)
                item = await anext(stream, None)
        except BusserveError as exc:
            return error_response(exc.code, str(exc))
        finally:
            await stream.aclose()
        ranked = [got[i] for i in sorted(got)]
        keep = best(ranked, view.n) if len(ranked) > view.n else range(len(ranked))
        choices = []
        for index, i in enumerate(keep):
            parts, token_lps, final = ranked[i]
            choice: dict[str, Any] = {"index": index, "finish_reason": _finish(final), "logprobs": None}
            if view.texts is not None:
                choice["logprobs"] = ({"content": chat_content(token_lps, view.texts)} if view.chat
                                      else CompletionLogprobs(view.texts).part(token_lps))
            content: str | None = view.echo + "".join(parts)
            if view.chat:
                calls = []
                if view.tools is not None:
                    content, calls = openai_tools.parse(content or "")
                choice["message"] = {"role": "assistant", "content": content}
                if calls:
                    choice["message"]["tool_calls"] = openai_tools.openai_calls(calls)
                    choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = content
            choices.append(choice)
        return JSONResponse({**meta, "object": "chat.completion" if view.chat else "text_completion",
                             "choices": choices, "usage": _usage([f for _, _, f in ranked])})

    async def _sse(self, first: Tagged, stream: AsyncGenerator[Tagged, None], meta: dict[str, Any], view: _View,
                   include_usage: bool) -> AsyncIterator[bytes]:
        """Each choice's chunks under its index (one choice unless ``n`` > 1), usage after the last choice ends."""
        kind = "chat.completion.chunk" if view.chat else "text_completion"
        completion_lps = {i: CompletionLogprobs(view.texts) for i in range(view.n)} \
            if view.texts is not None and not view.chat else None

        def chunk(i: int, delta_text: str | None, finish: str | None, role: bool = False,
                  lps: list[TokenLogprob] | None = None) -> bytes:
            choice: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": None}
            if lps and view.texts is not None:
                choice["logprobs"] = ({"content": chat_content(lps, view.texts)} if completion_lps is None
                                      else completion_lps[i].part(lps))
            if view.chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if delta_text is not None:
                    delta["content"] = delta_text
                choice["delta"] = delta
            else:
                choice["text"] = delta_text or ""
            return _event({**meta, "object": kind, "choices": [choice]})

        finals: list[Final] = []
        started: set[int] = set()
        held: dict[int, list[str]] = {}  # with tools: each choice's text, parsed for calls when it ends
        try:
            item: Tagged | None = first
            while item is not None:
                i, event = item
                if i not in started:
                    started.add(i)
                    if view.chat:
                        yield chunk(i, view.echo, None, role=True)
                    elif view.echo:
                        yield chunk(i, view.echo, None)
                if isinstance(event, TokenChunk) and view.tools is not None:
                    held.setdefault(i, []).append(event.text)
                elif isinstance(event, TokenChunk):
                    if event.text or (view.texts is not None and view.texts.shown(event.logprobs or [])):
                        yield chunk(i, event.text, None, lps=event.logprobs)
                elif isinstance(event, Final):
                    if view.tools is not None:
                        content, calls = openai_tools.parse("".join(held.pop(i, [])))
                        delta: dict[str, Any] = {"content": content} if content else {}
                        if calls:
                            delta["tool_calls"] = openai_tools.openai_calls(calls, streamed=True)
                        yield _event({**meta, "object": kind, "choices": [
                            {"index": i, "delta": delta, "finish_reason": "tool_calls" if calls else _finish(event),
                             "logprobs": None}]})
                    else:
                        yield chunk(i, None if view.chat else "", _finish(event))
                    finals.append(event)
                    if include_usage and len(finals) == view.n:
                        yield _event({**meta, "object": kind, "choices": [], "usage": _usage(finals)})
                elif isinstance(event, Error):
                    yield _error_event(event.code, event.message, event.field)
                    break  # the other choices are cancelled as the stream closes
                item = await anext(stream, None)
        except BusserveError as exc:
            yield _event({"error": {"message": str(exc), "code": exc.code, "type": "server_error"}})
        finally:
            # Closing the stream cancels the request if it is still running (client went away).
            await stream.aclose()
        yield b"data: [DONE]\n\n"


Tagged = tuple[int, StreamEvent]  # an event and the index of the choice it belongs to


@dataclass(frozen=True)
class _View:
    """How a response spells its choices: chat or completions, log-probabilities (None: not asked), the echoed
    prompt, and how many choices the client sees."""

    chat: bool
    texts: TokenTexts | None
    echo: str
    n: int
    tools: openai_tools.ToolPlan | None = None  # calls are parsed out of the text (tool_choice other than none)


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _error_event(code: str, message: str, param: str | None = None) -> bytes:
    """An error inside a stream that has begun (its HTTP status is sent already), OpenAI-shaped."""
    kind = ERROR_TYPE.get(http_status(code), "server_error")
    return _event({"error": {"message": message, "code": code, "param": param, "type": kind}})


def _finish(final: Final) -> str:
    return "length" if final.finish_reason == "length" else "stop"


def _usage(finals: list[Final]) -> dict[str, Any]:
    """One request's usage over its choices (OpenAI's: the prompt once, every choice's completion tokens; cached:
    the fewest any choice found cached — the first choice's, as the others reuse what it computed)."""
    used = [f.usage for f in finals if f.usage is not None]
    if not used:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    prompt = used[0].prompt_tokens
    completion = sum(u.completion_tokens for u in used)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(u.cached_tokens for u in used)}}


def metrics_route(registry: Any) -> Route:
    """``/metrics`` in the Prometheus text format, from the process's OpenTelemetry metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(request: Request) -> Response:
        body = generate_latest(registry) if registry is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"])


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no such path, wrong method) as OpenAI-shaped JSON too."""
    status = getattr(exc, "status_code", 500)
    message = (f"no route {request.method} {request.url.path}" if status == 404 else
               f"{request.method} is not allowed on {request.url.path}" if status == 405 else str(exc))
    body = {"error": {"message": message, "type": "not_found_error" if status == 404 else "invalid_request_error",
                      "param": None, "code": "not_found" if status == 404 else "method_not_allowed"}}
    return JSONResponse(body, status_code=status)


def create_app(front: Front, extra_routes: list[Route] | None = None) -> Starlette:
    routes = [
        Route("/health", front.health, methods=["GET"]),
        Route("/v1/models", front.models, methods=["GET"]),
        Route("/v1/models/{model:path}", front.model, methods=["GET"]),
        Route("/version", front.version, methods=["GET"]),
        Route("/tokenize", front.tokenize, methods=["POST"]),
        Route("/detokenize", front.detokenize, methods=["POST"]),
        Route("/v1/chat/completions", front.chat, methods=["POST"]),
        Route("/v1/completions", front.completions, methods=["POST"]),
        *(extra_routes or []),
    ]
    return Starlette(routes=routes, exception_handlers={404: _http_error, 405: _http_error})


async def serve_http(front: Front, host: str, port: int, extra_routes: list[Route] | None = None,
                     guard: Callable[[Any], Any] | None = None) -> Any:
    """Run the app on uvicorn inside the current event loop; returns the uvicorn Server (call ``should_exit``).
    ``guard``: wraps the app (``http_guard.Guard``: keys and limits)."""
    app: Any = create_app(front, extra_routes)
    if guard is not None:
        app = guard(app)
    return await serve_asgi(app, host, port, "http-front")


async def serve_asgi(app: Any, host: str, port: int, name: str) -> Any:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(), name=name)
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
            raise RuntimeError("HTTP front stopped during start-up")
        await asyncio.sleep(0.02)
    server.task = task  # type: ignore[attr-defined]
    return server

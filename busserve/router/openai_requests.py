"""The OpenAI front's request bodies as msgspec Structs, one per endpoint, and their translation to bus messages.

Every parameter of OpenAI's API and of vLLM's extensions that a client may send is a field here, and each is
either *implemented* (it changes what the server does) or *refused* with a 400 naming it when given anything but
its neutral value: nothing is accepted and dropped. Keys that are neither are refused too
(``forbid_unknown_fields``), with the parameter's name. tests/router/test_openai_parameters.py walks both
parameter lists and fails on any silent ignore.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from busserve.messages import (
    MAX_LOGPROBS,
    ChatMessage,
    GenerateRequest,
    InvalidField,
    SamplingParams,
    StreamOptions,
    ToolCall,
)
from busserve.router.openai_choices import MAX_CHOICES


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Strict(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class StreamOptionsBody(_Strict, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # refused when true


class TextPart(_Strict, kw_only=True):
    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class MessageBody(_Strict, kw_only=True):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # a tool message: its function's name
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_calls: list[Any] | None = None  # an assistant message: its calls
    refusal: str | None = None  # refused when set
    reasoning_content: str | None = None  # refused when set


Number = float | int


class JsonSchemaBody(_Strict, kw_only=True):
    name: str = ""
    schema: dict[str, Any] | None = None  # none: any JSON value
    strict: bool | None = None  # busserve always enforces the schema (the mask does not know "loosely")
    description: str | None = None


class ResponseFormatBody(_Strict, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaBody | None = None


class StructuredOutputsBody(_Strict, kw_only=True):
    """vLLM's ``structured_outputs``: one format."""

    json: Any = None  # a JSON Schema, as an object or as JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool | None = None  # what busserve does anyway (refused when false)
    structural_tag: str | None = None  # refused


class _Sampling(_Strict, kw_only=True):
    """Parameters both endpoints share (OpenAI's, then vLLM's)."""

    model: str = ""
    max_tokens: int | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptionsBody | None = None
    stop: str | list[str] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    seed: int | None = None
    user: str | None = None  # implemented: recorded with the request (trace attribute); changes no output
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: Number | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputsBody | None = None
    response_format: ResponseFormatBody | None = None
    logits_processors: Any = None
    priority: int | None = None
    request_id: str | None = None
    return_tokens_as_token_ids: bool = False
    cache_salt: str | None = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    # OpenAI fields with no effect busserve can honour
    metadata: Any = None
    store: bool | None = None
    service_tier: str | None = None
    prediction: Any = None


class ChatCompletionBody(_Sampling, kw_only=True):
    messages: list[MessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None
    # vLLM's chat extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: Any = None


class CompletionBody(_Sampling, kw_only=True):
    prompt: str | list[Any]  # a string, token ids, or a batch of one of either
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    add_special_tokens: bool = True


class TokenizeBody(_Strict, kw_only=True):
    model: str = ""
    prompt: str | None = None
    messages: list[MessageBody] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeBody(_Strict, kw_only=True):
    model: str = ""
    tokens: list[Annotated[int, Meta(ge=0)]]


# What each parameter does here. ``IMPLEMENTED``: used. ``REFUSED``: its neutral values; anything else is a 400.
IMPLEMENTED = frozenset({
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream",
    "stream_options", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "user", "top_k", "min_p",
    "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "request_id", "logprobs", "top_logprobs",
    "include_stop_str_in_output", "skip_special_tokens", "response_format", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "guided_whitespace_pattern", "structured_outputs", "n", "best_of", "echo",
    "tools", "tool_choice", "parallel_tool_calls",  # checked against the model's template by the front
})
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "prompt_logprobs": (None,), "suffix": (None, ""),
    "functions": (None, []), "function_call": (None, "none"),
    "modalities": (None, ["text"]), "audio": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
    # Structured outputs are llguidance's: a client that names that backend (or lets the server pick) is served.
    "guided_decoding_backend": (None, "auto", "guidance", "llguidance"), "logits_processors": (None,),
    "spaces_between_special_tokens": (True,),
    "use_beam_search": (False,), "length_penalty": (None, 1, 1.0), "bad_words": (None, []),
    "allowed_token_ids": (None,), "truncate_prompt_tokens": (None,), "priority": (None, 0),
    "return_tokens_as_token_ids": (False,), "cache_salt": (None,), "kv_transfer_params": (None,),
    "vllm_xargs": (None,), "metadata": (None,), "store": (None, False), "service_tier": (None, "auto", "default"),
    "prediction": (None,), "add_generation_prompt": (True,), "continue_final_message": (False,),
    "add_special_tokens": (False, True), "documents": (None,), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "mm_processor_kwargs": (None,),
}
REFUSED = frozenset(_NEUTRAL)
# add_special_tokens: neutral is the endpoint's own default (False for chat, True for completions).
_DEFAULT_SPECIAL = {"chat": False, "completion": True}

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")


def _param(path: str) -> str:
    return path.lstrip(".") or "body"


def decode(raw: bytes, tp: type[Any]) -> Any:
    """The body as ``tp``; a 400 naming the parameter on any unknown key, wrong type or missing field."""
    try:
        return msgspec.json.decode(raw, type=tp)
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = _AT.search(text)
        path = _param(at.group("path")) if at else ""
        unknown = _UNKNOWN.search(text)
        if unknown:
            name = f"{path}.{unknown.group('field')}" if path and path != "body" else unknown.group("field")
            raise BadRequest(f"unknown parameter {name!r}: busserve does not implement it", name) from None
        missing = re.search(r"Object missing required field `(?P<field>[^`]+)`", text)
        if missing:
            name = f"{path}.{missing.group('field')}" if path and path != "body" else missing.group("field")
            raise BadRequest(f"{name} is required", name) from None
        raise BadRequest(f"{path}: {_AT.sub('', text)}" if path else text, path or None) from None
    except msgspec.DecodeError:
        raise BadRequest("the body is not valid JSON") from None


def _refuse_unsupported(body: Any, endpoint: str) -> None:
    for name in body.__struct_fields__:
        if name not in REFUSED:
            continue
        value = getattr(body, name)
        neutral = (_DEFAULT_SPECIAL[endpoint],) if name == "add_special_tokens" else _NEUTRAL[name]
        if value not in neutral:
            raise BadRequest(f"{name}={value!r} is not supported by busserve", name)
    if body.stream_options is not None and body.stream_options.continuous_usage_stats:
        raise BadRequest("stream_options.continuous_usage_stats is not supported by busserve",
                         "stream_options.continuous_usage_stats")


def _logprobs(body: _Sampling) -> int | None:
    """The alternatives per token the request asks for (None: no log-probabilities)."""
    if isinstance(body, ChatCompletionBody):
        if body.top_logprobs not in (None, 0) and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
        wanted: int | None = (body.top_logprobs or 0) if body.logprobs else None
        name = "top_logprobs"
    else:
        wanted, name = getattr(body, "logprobs", None), "logprobs"
    if wanted is not None and not 0 <= wanted <= MAX_LOGPROBS:
        raise BadRequest(f"{name} must be between 0 and {MAX_LOGPROBS}, got {wanted}", name)
    return wanted


def _structured_output(body: _Sampling) -> dict[str, Any] | None:
    """The one output format the request asks for, from whichever of OpenAI's or vLLM's spellings it used (a
    StructuredOutput's fields), or None. Two spellings in one request are refused: which would win is a guess."""
    asked: list[tuple[str, dict[str, Any]]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        asked.append(("response_format", {"json_schema": {"type": "object"}}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise BadRequest("response_format.json_schema is required with type json_schema",
                             "response_format.json_schema")
        asked.append(("response_format", {"json_schema": rf.json_schema.schema or {}}))
    if body.guided_json is not None:
        asked.append(("guided_json", {"json_schema": _schema(body.guided_json, "guided_json")}))
    for name, key in (("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if getattr(body, name) is not None:
            asked.append((name, {key: getattr(body, name)}))
    so = body.structured_outputs
    if so is not None:
        if so.structural_tag is not None:
            raise BadRequest("structured_outputs.structural_tag is not supported by busserve",
                             "structured_outputs.structural_tag")
        if so.disable_any_whitespace is False:
            raise BadRequest("structured_outputs.disable_any_whitespace=false: give whitespace_pattern instead",
                             "structured_outputs.disable_any_whitespace")
        formats = {"json": so.json, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                   "json_object": so.json_object or None}
        given = [k for k, v in formats.items() if v is not None]
        if len(given) != 1:
            raise BadRequest(f"structured_outputs takes exactly one of json, regex, choice, grammar, json_object "
                             f"(got {', '.join(given) or 'none'})", "structured_outputs")
        key = given[0]
        spec: dict[str, Any] = (
            {"json_schema": _schema(so.json, "structured_outputs.json")} if key == "json"
            else {"json_schema": {"type": "object"}} if key == "json_object" else {key: formats[key]})
        if so.whitespace_pattern is not None:
            spec["whitespace_pattern"] = so.whitespace_pattern
        asked.append(("structured_outputs", spec))
    if len(asked) > 1:
        raise BadRequest(f"{asked[1][0]} and {asked[0][0]} both ask for an output format; give one", asked[1][0])
    if body.guided_whitespace_pattern is not None:
        if not asked or "json_schema" not in asked[0][1]:
            raise BadRequest("guided_whitespace_pattern applies to a JSON format only", "guided_whitespace_pattern")
        asked[0][1]["whitespace_pattern"] = body.guided_whitespace_pattern
    return asked[0][1] if asked else None


def choices_asked(body: _Sampling) -> tuple[int, int]:
    """``(n, best_of)``: the choices the client sees, and how many are generated to pick them from."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"n must be between 1 and {MAX_CHOICES}, got {n}", "n")
    best_of = n if body.best_of is None else body.best_of
    if not n <= best_of <= MAX_CHOICES:
        raise BadRequest(f"best_of must be between n ({n}) and {MAX_CHOICES}, got {best_of}", "best_of")
    if best_of > n and body.stream:
        raise BadRequest("best_of > n cannot stream: the best choices are known only at the end", "best_of")
    return n, best_of


def format_parameter(body: _Sampling) -> str:
    """The parameter that asked for the request's output format (for errors found after translation)."""
    if body.response_format is not None and body.response_format.type != "text":
        return "response_format"
    given = [n for n in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
             if getattr(body, n) is not None]
    return given[0] if given else "response_format"


def _schema(value: Any, name: str) -> dict[str, Any]:
    """A JSON Schema given as an object or as JSON text."""
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value)
        except msgspec.DecodeError:
            raise BadRequest(f"{name} is not valid JSON", name) from None
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be a JSON Schema (an object)", name)
    return value


def _sampling(body: _Sampling, max_tokens: int | None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise BadRequest("stop takes at most 16 non-empty strings", "stop")
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise BadRequest(f"logit_bias keys are token ids, got {key!r}", "logit_bias")
        if not -100.0 <= float(value) <= 100.0:
            raise BadRequest(f"logit_bias[{key}] must be between -100 and 100, got {value}", f"logit_bias[{key}]")
        bias[int(key)] = float(value)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if body.temperature is not None and not 0.0 <= body.temperature <= 2.0:
        raise BadRequest(f"temperature must be between 0 and 2, got {body.temperature}", "temperature")
    given = {
        "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "min_p": body.min_p, "seed": body.seed, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
        "min_tokens": body.min_tokens, "logprobs": _logprobs(body), "structured_output": _structured_output(body),
    }
    try:
        return msgspec.convert({**{k: v for k, v in given.items() if v is not None}, "stop": stop,
                                "stop_token_ids": body.stop_token_ids or [], "ignore_eos": body.ignore_eos,
                                "include_stop_str_in_output": body.include_stop_str_in_output,
                                "skip_special_tokens": body.skip_special_tokens,
                                "logit_bias": bias, "max_tokens": max_tokens or 1024},
                               SamplingParams)
    except InvalidField as exc:
        raise BadRequest(str(exc), exc.field) from None
    except msgspec.ValidationError as exc:
        at = _AT.search(str(exc))
        named = re.match(r"(\w+): ", str(exc))  # a check of the message itself (InvalidField) names its field
        name = _param(at.group("path")) if at else named.group(1) if named else None
        text = _AT.sub("", str(exc))
        raise BadRequest(f"{name}: {text}" if name else text, name) from None


def message_text(m: MessageBody, i: int) -> str:
    """A message's text; a 400 naming what busserve cannot pass on (names, tool calls, non-text parts)."""
    for name in ("refusal", "reasoning_content"):
        if getattr(m, name) is not None:
            raise BadRequest(f"messages[{i}].{name} is not supported by busserve", f"messages[{i}].{name}")
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise BadRequest(f"only text content parts are supported (got {part.type!r})",
                             f"messages[{i}].content[{j}]")
        parts.append(part.text)
    return "".join(parts)


def _tool_calls(m: MessageBody, i: int) -> list[ToolCall] | None:
    """An assistant message's earlier calls (OpenAI's shape) as the bus carries them."""
    if m.tool_calls is None:
        return None
    out = []
    for j, c in enumerate(m.tool_calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(c.get("id"), str):
            raise BadRequest(f"messages[{i}].tool_calls[{j}] must be {{id, type: function, function: {{name, "
                             "arguments}}}", f"messages[{i}].tool_calls[{j}]")
        try:
            out.append(msgspec.convert({"id": c["id"], "name": fn["name"], "arguments": fn.get("arguments", "{}")},
                                       ToolCall))
        except msgspec.ValidationError as exc:
            raise BadRequest(f"messages[{i}].tool_calls[{j}]: {exc}", f"messages[{i}].tool_calls[{j}]") from None
    return out


def chat_request(raw: bytes) -> tuple[GenerateRequest, ChatCompletionBody]:
    body = decode(raw, ChatCompletionBody)
    _refuse_unsupported(body, "chat")
    if not body.messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    turns = [ChatMessage(role=m.role, content=message_text(m, i), tool_calls=_tool_calls(m, i),
                         tool_call_id=m.tool_call_id, name=m.name) for i, m in enumerate(body.messages)]
    return _generate(body, body.max_completion_tokens or body.max_tokens, messages=turns), body


def completion_request(raw: bytes) -> tuple[GenerateRequest, CompletionBody]:
    body = decode(raw, CompletionBody)
    _refuse_unsupported(body, "completion")
    if body.echo and body.logprobs is not None:
        raise BadRequest("echo with logprobs needs the prompt's log-probabilities, which busserve does not compute",
                         "echo")
    prompt: Any = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return _generate(body, body.max_tokens, prompt=prompt), body
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise BadRequest("token ids are not negative", "prompt")
        return _generate(body, body.max_tokens, prompt_token_ids=prompt), body
    raise BadRequest("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


def _generate(body: _Sampling, max_tokens: int | None, **prompt: Any) -> GenerateRequest:
    include_usage = (body.stream_options.include_usage if body.stream_options else False) if body.stream else True
    rid = body.request_id or uuid.uuid4().hex
    if not re.fullmatch(r"[A-Za-z0-9_\-:]{1,128}", rid):
        raise BadRequest("request_id takes 1-128 letters, digits, '_', '-', ':'", "request_id")
    try:
        return GenerateRequest(request_id=rid, model=body.model, sampling=_sampling(body, max_tokens),
                               stream=StreamOptions(include_usage=include_usage), **prompt)
    except InvalidField as exc:
        raise BadRequest(str(exc), exc.field) from None

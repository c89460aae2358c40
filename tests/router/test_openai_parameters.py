"""No silent ignores: every parameter of OpenAI's chat and completions APIs and of vLLM's extensions, sent with a
non-neutral value, is either implemented (the request goes on to the bus) or refused with a 400 naming it. The
lists are written from the two APIs' references, not from busserve's code, so a field added to the request
structs and then ignored makes this test fail. Driven through the real front app (ASGI) on a real nats-server
with no router: an implemented parameter gets past validation and finds no router (503)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import EmbeddedNats
from busserve.router.openai_front import Front, create_app
from busserve.router.openai_requests import IMPLEMENTED
from busserve.tokenization import load_tokenizer
from tests.helpers import asgi_call

# OpenAI's create-chat-completion parameters (API reference, 2026) with a non-default value each.
OPENAI_CHAT: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}], "logit_bias": {"42": 1.0}, "logprobs": True,
    "max_completion_tokens": 5, "max_tokens": 5, "metadata": {"k": "v"}, "modalities": ["text", "audio"], "n": 2,
    "parallel_tool_calls": False, "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.5,
    "prompt_cache_key": "k", "reasoning_effort": "low", "response_format": {"type": "json_object"},
    "safety_identifier": "s", "seed": 3, "service_tier": "flex", "stop": ["zz"], "store": True, "stream": True,
    "stream_options": {"include_usage": True}, "temperature": 0.5, "tool_choice": "required",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "top_logprobs": 2, "top_p": 0.5,
    "user": "someone", "verbosity": "low", "web_search_options": {},
}
OPENAI_COMPLETIONS: dict[str, Any] = {
    "best_of": 2, "echo": True, "frequency_penalty": 0.5, "logit_bias": {"42": 1.0}, "logprobs": 2, "max_tokens": 5,
    "n": 2, "presence_penalty": 0.5, "seed": 3, "stop": "zz", "stream": True, "stream_options": {"include_usage": True},
    "suffix": "end", "temperature": 0.5, "top_p": 0.5, "user": "someone",
}
# vLLM's extra sampling and request parameters (both endpoints unless said).
VLLM_EXTRA: dict[str, Any] = {
    "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [42],
    "include_stop_str_in_output": True, "skip_special_tokens": False, "spaces_between_special_tokens": False,
    "use_beam_search": True, "length_penalty": 0.5, "prompt_logprobs": 1, "bad_words": ["no"],
    "allowed_token_ids": [1, 2], "truncate_prompt_tokens": 4, "guided_json": {"type": "object"},
    "guided_regex": "a+", "guided_choice": ["a", "b"], "guided_grammar": 'root ::= "a"',
    "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " ", "structured_outputs": {"regex": "a+"},
    "logits_processors": ["x"], "priority": 1, "request_id": "my-id-1", "return_tokens_as_token_ids": True,
    "cache_salt": "salt", "kv_transfer_params": {"x": 1}, "vllm_xargs": {"x": 1}, "response_format":
    {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
}
VLLM_CHAT_EXTRA: dict[str, Any] = {
    "echo": True, "add_generation_prompt": False, "continue_final_message": True, "add_special_tokens": True,
    "documents": [{"title": "t", "text": "x"}], "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": False}, "mm_processor_kwargs": {"x": 1},
}
MESSAGE_FIELDS: dict[str, Any] = {"refusal": "no", "reasoning_content": "because"}

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(tiny_dir: Path) -> AsyncIterator[Any]:
    server = EmbeddedNats().start()
    bus = await Bus.connect(BusConfig(servers=[server.url], max_reconnect_attempts=0), name="params")
    try:
        yield create_app(Front(bus, first_event_timeout_s=5, tokenizer=load_tokenizer(tiny_dir)))
    finally:
        await bus.close()
        server.stop()


async def _status(app: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, out = await asgi_call(app, path, body=json.dumps(body).encode())
    return status, out


def _cases() -> list[tuple[str, str, Any]]:
    cases = [("/v1/chat/completions", k, v) for k, v in {**OPENAI_CHAT, **VLLM_EXTRA, **VLLM_CHAT_EXTRA}.items()]
    cases += [("/v1/completions", k, v) for k, v in {**OPENAI_COMPLETIONS, **VLLM_EXTRA}.items()]
    return cases


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("path", "name", "value"), _cases(), ids=[f"{'chat' if 'chat' in p else 'completions'}-{n}" for p, n, _ in _cases()])
async def test_every_parameter_is_implemented_or_refused_by_name(app: Any, path: str, name: str, value: Any) -> None:
    base = CHAT if "chat" in path else COMPLETION
    if name == "top_logprobs":
        base = {**base, "logprobs": True}  # OpenAI: top_logprobs goes with logprobs=true
    if name == "guided_whitespace_pattern":
        base = {**base, "guided_json": {"type": "object"}}  # vLLM: the whitespace of a JSON format
    status, out = await _status(app, path, {**base, name: value})
    if name in ("tools", "tool_choice"):  # implemented, but this model's template takes no tools: refused by name
        assert status == 400 and out["error"]["param"] == name, out
    elif name in IMPLEMENTED:
        assert status == 503, out  # past validation, on the bus: no router here
    else:
        assert status == 400, f"{name}={value!r} answered {status}: silently ignored? {out}"
        assert out["error"]["param"] == name and name in out["error"]["message"], out


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", list(MESSAGE_FIELDS))
async def test_message_fields_that_cannot_reach_the_template_are_refused(app: Any, name: str) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "hi", name: MESSAGE_FIELDS[name]}]}
    status, out = await _status(app, "/v1/chat/completions", body)
    assert status == 400 and out["error"]["param"] == f"messages[0].{name}", out


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {**COMPLETION, "stop_token_ids": 5}, "stop_token_ids"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": 9}, "temperature"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {**COMPLETION, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"5": 300}}, "logit_bias[5]"),
    ("/v1/completions", {**COMPLETION, "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ("/v1/completions", {**COMPLETION, "request_id": "a b"}, "request_id"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1}, "echo"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ("/v1/completions", {"model": "m"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}}, "response_format"),
    ("/v1/completions", {**COMPLETION, "guided_regex": "a(b"}, "guided_regex"),
    ("/v1/completions", {**COMPLETION, "guided_json": "{not json"}, "guided_json"),
    ("/v1/completions", {**COMPLETION, "guided_choice": []}, "structured_output.choice"),
    ("/v1/completions", {**COMPLETION, "guided_grammar": "root ::= ("}, "guided_grammar"),
    ("/v1/completions", {**COMPLETION, "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}, "guided_regex": "a"},
     "guided_regex"),
    ("/v1/completions", {**COMPLETION, "structured_outputs": {}}, "structured_outputs"),
    ("/v1/completions", {**COMPLETION, "structured_outputs": {"regex": "a", "structural_tag": "{}"}},
     "structured_outputs.structural_tag"),
    ("/v1/completions", {**COMPLETION, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {**COMPLETION, "n": 1, "best_of": 2, "stream": True}, "best_of"),
])
async def test_bad_values_get_a_400_naming_the_field(app: Any, path: str, body: dict[str, Any], param: str) -> None:
    status, out = await _status(app, path, body)
    assert status == 400 and out["error"]["param"] == param, out


@pytest.mark.asyncio(loop_scope="module")
async def test_errors_are_openai_json_everywhere(app: Any) -> None:
    status, _, out = await asgi_call(app, "/v1/nowhere", body=b"{}")
    assert status == 404 and out["error"]["code"] == "not_found", out
    status, _, out = await asgi_call(app, "/v1/models", body=b"{}")  # POST where only GET is
    assert status == 405 and out["error"]["code"] == "method_not_allowed", out
    status, _, out = await asgi_call(app, "/v1/completions", body=b"{not json")
    assert status == 400 and "JSON" in out["error"]["message"], out
    status, _, out = await asgi_call(app, "/version", method="GET", body=b"")
    assert status == 200 and out["version"], out

"""Tool calling through the OpenAI front (busserve/router/openai_tools.py) with the official ``openai`` client, on
a real router and engine: a random-weight model whose chat template takes tools (Hermes style, ``<tool_call>``).
A random model calls nothing on its own, so ``required`` and a named function returning valid calls — the right
names, arguments valid against their schemas — is the format's mask at work; parsing is checked on its own."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from busserve.bus.embedded import free_port
from busserve.router.openai_tools import ToolsRefused, parse, plan
from busserve.testing import ProcessCluster

pytestmark = pytest.mark.slow

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
    "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}  # type: ignore[index]


@pytest.fixture(scope="module")
def front(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = tmp_path_factory.mktemp("tool-model")
    shutil.copytree(tiny_dir, model, dirs_exist_ok=True)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    port = free_port()
    with ProcessCluster() as c:
        c.start_engine("A", "--model", str(model), "--dtype", "float32", "--kv-pages", "256", threads=1)
        c.start("router", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(model),
                "--http-port", str(port))
        c.wait_engines({"A"})
        deadline = time.monotonic() + 60
        while True:  # the front is up once /health says the engine and the router are
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the HTTP front never became healthy"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"


def _check_calls(calls: Any, allowed: set[str]) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_forced_calls_are_valid_streamed_and_not(front: str) -> None:
    client = openai.OpenAI(base_url=front, api_key="none", max_retries=0, timeout=120)
    ask: dict[str, Any] = {"model": "", "messages": [{"role": "user", "content": "Weather in Oslo?"}],
                           "tools": [WEATHER, TIME], "max_tokens": 120, "temperature": 0.7, "seed": 1}
    out = client.chat.completions.create(tool_choice="required", **ask)
    assert out.choices[0].finish_reason == "tool_calls", repr(out.choices[0].message.content)
    _check_calls(out.choices[0].message.tool_calls, {"get_weather", "get_time"})
    named = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "get_time"}}, **ask)
    assert named.choices[0].finish_reason == "tool_calls"
    _check_calls(named.choices[0].message.tool_calls, {"get_time"})
    assert len(named.choices[0].message.tool_calls or []) == 1
    streamed = client.chat.completions.create(tool_choice="required", stream=True, parallel_tool_calls=False, **ask)
    deltas = [ch for c in streamed for ch in c.choices]
    assert deltas[-1].finish_reason == "tool_calls"
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    _check_calls(calls, {"get_weather", "get_time"})
    # A conversation that carries an earlier call and its result renders and is served; auto and none answer.
    history = [*ask["messages"], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"}]
    for choice in ("auto", "none"):
        answered = client.chat.completions.create(**{**ask, "messages": history, "max_tokens": 8},
                                                  tool_choice=choice)
        assert answered.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "nope"}}, **ask)
    assert bad.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as both:
        client.chat.completions.create(tool_choice="required", response_format={"type": "json_object"}, **ask)
    assert both.value.body["param"] == "response_format"  # type: ignore[index]


def test_plans_and_parsing() -> None:
    with pytest.raises(ToolsRefused) as refused:  # SmolLM2's template takes no tools: a 400, not a silent ignore
        plan([WEATHER], "auto", None, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert refused.value.param == "tools"
    with pytest.raises(ToolsRefused) as other:
        plan([WEATHER], "auto", None, "{{ tools }} [TOOL_CALLS]")
    assert other.value.param == "tools"
    with pytest.raises(ToolsRefused) as shape:
        plan([{"type": "function", "function": {"name": "bad name"}}], "auto", None, TEMPLATE)
    assert shape.value.param == "tools[0].function.name"
    assert plan(None, None, None, TEMPLATE) is None
    p = plan([WEATHER], None, None, TEMPLATE)
    assert p is not None and p.choice == "auto" and p.structured_output() is None
    content, calls = parse('Let me look. <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    assert content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {"zone": "UTC"})]
    assert parse("no calls here") == ("no calls here", [])
    assert parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])

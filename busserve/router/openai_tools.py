"""Tool calling for the OpenAI front: ``tools`` and ``tool_choice`` in, ``message.tool_calls`` out.

The tools reach the model through its own chat template (the router renders ``GenerateRequest.tools``); what
the model writes back is parsed by the tool-call format of its family. One family is known today — Hermes /
Qwen style, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` — chosen when the template spells
``<tool_call>``; a model whose template takes no tools, or spells calls another way, gets a 400 naming ``tools``
rather than a silent ignore.

``tool_choice``: ``none`` renders the tools and parses nothing; ``auto`` parses whatever calls the model makes;
``required`` and a named function constrain the output (a structured-output grammar) to one call — or, with
``parallel_tool_calls``, one or more — of the allowed functions with arguments valid against their schemas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from busserve.messages import StructuredOutput, ToolCall
from busserve.structured_output import JSON_LAYOUT

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")


class ToolsRefused(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # as the client sent them (OpenAI's shape): what the template renders
    choice: str  # "none", "auto", "required" or the name of the one function to call
    parallel: bool

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    def structured_output(self) -> StructuredOutput | None:
        """The grammar that forces a call (``required`` / a named function); None for ``auto`` and ``none``."""
        if self.choice in ("none", "auto"):
            return None
        allowed = [t["function"] for t in self.tools if self.choice == "required" or t["function"]["name"] == self.choice]
        schema = {"anyOf": [{"type": "object", "properties": {
            "name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False} for f in allowed],
            "x-guidance": JSON_LAYOUT}  # one line, as structured outputs write JSON (no padding by newlines)
        repeat = "+" if self.parallel and self.choice == "required" else ""
        lark = (f'start: (call "\\n"?){repeat}\n'
                f'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
                f"body: %json {json.dumps(schema)}\n")
        return StructuredOutput(grammar=lark)


def plan(tools: list[Any] | None, tool_choice: Any, parallel: bool | None, chat_template: str | None
         ) -> ToolPlan | None:
    """The request's tools checked (a ToolsRefused naming the parameter otherwise), or None without tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolsRefused("tool_choice needs tools", "tool_choice")
        return None
    if not chat_template or "tools" not in chat_template:
        raise ToolsRefused("this model's chat template does not take tools", "tools")
    if "<tool_call>" not in chat_template:
        raise ToolsRefused("this model's chat template spells tool calls in a way busserve does not parse "
                           "(it parses <tool_call>{...}</tool_call>)", "tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ToolsRefused(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise ToolsRefused(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-', '.'",
                               f"tools[{i}].function.name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ToolsRefused(f"tools[{i}].function.parameters must be a JSON Schema object",
                               f"tools[{i}].function.parameters")
        names.append(fn["name"])
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise ToolsRefused(f"tool_choice names a function that is not in tools: {name!r}", "tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise ToolsRefused(f"tool_choice must be none, auto, required or a function, got {choice!r}", "tool_choice")
    return ToolPlan(tools=list(tools), choice=str(choice), parallel=True if parallel is None else parallel)


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """The text outside the calls (None when there is none) and the calls the model wrote. A ``<tool_call>`` whose
    body is not a call (not JSON, no name) stays in the text, as the model wrote it."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for m in _CALL.finditer(text):
        try:
            body = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not _NAME.match(body["name"]):
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        arguments = body.get("arguments", {})
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=body["name"],
                              arguments=arguments if isinstance(arguments, str) else json.dumps(arguments)))
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def openai_calls(calls: list[ToolCall], streamed: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(calls):
        call: dict[str, Any] = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        if streamed:
            call["index"] = i
        out.append(call)
    return out

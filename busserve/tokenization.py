"""Turning a GenerateRequest into prompt token ids: the chat template for ``messages``, the tokenizer for ``prompt``,
a range check for ``prompt_token_ids``. Used by routers (which tokenize once for the whole cluster) and by engines
on the direct data-parallel path. Errors name the field at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from busserve import structured_output
from busserve.errors import BusserveError
from busserve.messages import ChatMessage, ErrorCode, GenerateRequest, SamplingParams


class RequestRejected(BusserveError):
    def __init__(self, code: ErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.code = code


def load_tokenizer(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


_VOCAB_SIZES: dict[int, tuple[Any, int]] = {}


def vocab_size(tokenizer: Any) -> int:
    """``len(tokenizer)``, computed once per tokenizer: some transformers releases (5.0) rebuild the whole vocabulary
    on every call, holding the GIL for tens of milliseconds — per request, that starved a router's event loop."""
    entry = _VOCAB_SIZES.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        entry = _VOCAB_SIZES[id(tokenizer)] = (tokenizer, len(tokenizer))
    return entry[1]


def prompt_token_ids(tokenizer: Any, req: GenerateRequest) -> list[int]:
    if req.prompt_token_ids is not None:
        vocab = vocab_size(tokenizer)
        for i, t in enumerate(req.prompt_token_ids):
            if t >= vocab:
                raise RequestRejected("invalid_request", f"token id {t} is outside the vocabulary (size {vocab})",
                                      field=f"prompt_token_ids[{i}]")
        return list(req.prompt_token_ids)
    if req.messages is not None:
        if tokenizer.chat_template is None:
            raise RequestRejected("invalid_request", "this model has no chat template; send prompt instead",
                                  field="messages")
        if req.tools and "tools" not in tokenizer.chat_template:
            raise RequestRejected("invalid_request", "this model's chat template does not take tools", field="tools")
        turns = [_turn(m) for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(turns, tools=req.tools or None, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:  # templates raise on unsupported role orders etc.
            raise RequestRejected("invalid_request", f"chat template refused the messages: {exc}",
                                  field="messages") from exc
        # The template already spells the special tokens.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert req.prompt is not None
    return list(tokenizer(req.prompt)["input_ids"])


def _turn(m: ChatMessage) -> dict[str, Any]:
    """A message as Hugging Face chat templates take it (tool calls with their arguments as objects)."""
    turn: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                arguments = json.loads(c.arguments)
            except ValueError:
                raise RequestRejected("invalid_request", f"tool call {c.id}: arguments are not JSON",
                                      field="messages.tool_calls") from None
            calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
        turn["tool_calls"] = calls
    if m.tool_call_id is not None:
        turn["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        turn["name"] = m.name
    return turn


def check_sampling(tokenizer: Any, sampling: SamplingParams) -> None:
    """Token ids in the sampling settings (``stop_token_ids``, ``logit_bias``) must be in the vocabulary, and a
    structured output must compile (milliseconds for a small schema; run it off an event loop)."""
    try:
        structured_output.check(sampling.structured_output)
    except structured_output.GrammarRejected as exc:
        raise RequestRejected("invalid_request", str(exc), field=exc.field) from None
    vocab = vocab_size(tokenizer)
    for i, t in enumerate(sampling.stop_token_ids):
        if t >= vocab:
            raise RequestRejected("invalid_request", f"token id {t} is outside the vocabulary (size {vocab})",
                                  field=f"stop_token_ids[{i}]")
    for t in sampling.logit_bias:
        if t >= vocab:
            raise RequestRejected("invalid_request", f"token id {t} is outside the vocabulary (size {vocab})",
                                  field=f"logit_bias[{t}]")

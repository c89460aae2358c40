"""Structured outputs on a real engine core (busserve/structured_output.py): a random-weight model would write
anything, so whatever it writes under a format passing that format's check is the mask at work. Formats are run
in one batch with free requests, resumed mid-output, and refused by name when they do not compile."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from busserve.engine.model_loader import LoadedModel
from busserve.messages import Error, Final, InvalidField, SamplingParams, StructuredOutput
from busserve.structured_output import GrammarRejected, check
from busserve.tokenization import RequestRejected, check_sampling
from tests.helpers import running_core

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "minItems": 1,
                 "maxItems": 3},
        "point": {"type": "object", "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "boolean"}},
                  "required": ["x", "y"], "additionalProperties": False}},
     "required": ["colour", "tags", "point"], "additionalProperties": False},
]


def _sampling(so: StructuredOutput, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 120), temperature=kw.pop("temperature", 0.8),
                          seed=kw.pop("seed", 7), structured_output=so, **kw)


def test_every_format_holds_on_a_random_model_in_one_batch(tiny: LoadedModel) -> None:
    prompt = list(range(300, 330))
    with running_core(tiny) as h:
        asks: list[tuple[str, Any]] = []
        for i, schema in enumerate(SCHEMAS):
            asks.append((h.submit(prompt, _sampling(StructuredOutput(json_schema=schema), seed=i)), schema))
        asks.append((h.submit(prompt, _sampling(StructuredOutput(json_schema={"type": "object"}))), "object"))
        asks.append((h.submit(prompt, _sampling(StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,4}"))), "regex"))
        asks.append((h.submit(prompt, _sampling(StructuredOutput(choice=["yes", "no", "maybe not"]))), "choice"))
        asks.append((h.submit(prompt, _sampling(StructuredOutput(grammar='root ::= "(" [ab]+ ")"'))), "gbnf"))
        free = h.submit(prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        for rid, want in asks:
            events = h.wait(rid)
            assert isinstance(events[-1], Final) and events[-1].finish_reason == "stop", (want, events[-1])
            text = h.text(rid)
            if isinstance(want, dict):
                jsonschema.validate(json.loads(text), want)
            elif want == "object":
                assert isinstance(json.loads(text), dict), text
            elif want == "regex":
                assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
            elif want == "choice":
                assert text in ("yes", "no", "maybe not"), text
            else:
                assert re.fullmatch(r"\([ab]+\)", text), text
        # The free request in the same batches wrote what it liked, and all the way to max_tokens.
        assert len(h.tokens(free)) == 40


def test_a_resumed_request_continues_its_format(tiny: LoadedModel) -> None:
    """A request resumed on another engine carries its streamed output: the matcher is advanced over it, so the
    rest still completes the same JSON value."""
    schema = SCHEMAS[0]
    prompt = list(range(400, 420))
    with running_core(tiny) as h:
        whole = h.tokens(h.submit(prompt, _sampling(StructuredOutput(json_schema=schema), temperature=0.0)))
        assert len(whole) > 4
        so = StructuredOutput(json_schema=schema)
        head = whole[:3]

        def resume() -> Any:
            return h.core.generate_ctx(stream_subject="x", content_type="msgpack", include_usage=True,
                                       sampling=_sampling(so), trace=None, label="r", output_offset=len(head),
                                       streamed=head)
        ctx = h.core.call(resume)
        assert ctx.grammar is not None and not ctx.grammar.is_error()
        # Exactly the tokens the format allows after the head: the greedy rest of the original is one of them.
        assert ctx.grammar.validate_tokens(whole[3:]) == len(whole) - 3


def test_a_bad_format_is_refused_by_name(tiny: LoadedModel) -> None:
    for so, name in ((StructuredOutput(regex="a(b"), "structured_output.regex"),
                     (StructuredOutput(json_schema={"type": "objectx"}), "structured_output.json_schema"),
                     (StructuredOutput(grammar="root ::= ("), "structured_output.grammar")):
        with pytest.raises(GrammarRejected) as bad:
            check(so)
        assert bad.value.field == name
        with pytest.raises(RequestRejected) as rejected:
            check_sampling(tiny.tokenizer, SamplingParams(structured_output=so))
        assert rejected.value.field == name and rejected.value.code == "invalid_request"
    with pytest.raises(InvalidField) as two:
        StructuredOutput(regex="a", choice=["b"])
    assert two.value.field == "structured_output"
    # An engine given a format nobody checked (a forged sub-request) ends that request with an error naming
    # the format, and goes on serving.
    with running_core(tiny) as h:
        bad = h.submit(list(range(10, 20)), _sampling(StructuredOutput(regex="a(b")))
        events = h.wait(bad)
        assert isinstance(events[-1], Error) and events[-1].field == "structured_output"
        assert not any(getattr(e, "token_ids", None) for e in events)
        assert len(h.tokens(h.submit(list(range(10, 20)), SamplingParams(max_tokens=5, ignore_eos=True)))) == 5

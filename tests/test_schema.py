"""schemas/ is generated from the code and must not drift; the AsyncAPI document covers every subject."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from busserve import messages as m
from busserve import schema_export
from busserve.bus.subjects import ENGINE_ACTIONS, Subjects

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def test_committed_schemas_match_the_code() -> None:
    stale = schema_export.stale_files(SCHEMAS)
    assert not stale, f"run `busserve schema export`: {stale} differ from the code"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_ref_resolves() -> None:
    for doc in (schema_export.asyncapi(), schema_export.json_schema()):
        for ref in _refs(doc):
            assert _resolve(doc, ref) is not None, ref


def test_asyncapi_lists_every_subject_and_message() -> None:
    doc = schema_export.asyncapi()
    addresses = {c["address"] for c in doc["channels"].values()}
    s = Subjects()
    expected = {
        s.generate(), s.cancel(), s.stream("{requestId}"), s.strategy("{strategyName}"), s.control_strategy(),
        s.engines_status(), s.engine_kv_events("{engineId}"), s.kv_data("{engineId}"), s.routers_status(),
        *(s.engine_action("{engineId}", a) for a in ENGINE_ACTIONS),
    }
    assert expected <= addresses
    assert doc["asyncapi"].startswith("3.")
    # Every wire message a channel carries has a schema.
    assert set(doc["components"]["messages"]) <= {t.__name__ for t in m.ALL_MESSAGES}
    for channel in doc["channels"].values():
        for token in channel["address"].split("."):
            if token.startswith("{"):
                assert token.strip("{}") in channel["parameters"]

"""schemas/ is generated from the code and must not drift; the AsyncAPI document covers every subject."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from busserve import messages as m
from busserve.bus import schema_export
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
        s.generate(), s.cancel(), s.resend(), s.resend("{owner}"), s.stream("{requestId}"), s.strategy("{strategyName}"), s.control_strategy(),
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


def test_schemas_do_not_depend_on_how_msgspec_renders_docstrings_or_unions(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """msgspec 0.18 copies docstrings as written and lists ``T | None`` as null first; later releases dedent and
    list T first. Whatever a release does, the files come out the same."""
    import copy
    import inspect

    import msgspec

    expected = schema_export.rendered()
    real = msgspec.json.schema_components
    by_name = {t.__name__: t for t in m.ALL_MESSAGES}

    def as_written(types, ref_template):  # type: ignore[no-untyped-def]
        out, components = real(types, ref_template=ref_template)
        components = copy.deepcopy(components)
        for name, schema in components.items():
            doc = by_name[name].__doc__ if name in by_name else None
            if doc and "description" in schema:
                assert schema["description"] in (doc.strip(), inspect.cleandoc(doc))
                schema["description"] = doc.strip()  # as msgspec 0.18 gives it: inner lines still indented
        _reverse_any_of(components)
        return out, components

    monkeypatch.setattr(msgspec.json, "schema_components", as_written)
    assert schema_export.rendered() == expected


def _reverse_any_of(node: Any) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("anyOf"), list):
            node["anyOf"].reverse()
        for v in node.values():
            _reverse_any_of(v)
    elif isinstance(node, list):
        for v in node:
            _reverse_any_of(v)


def test_the_lowest_supported_msgspec_gives_the_committed_schemas(tmp_path: Path) -> None:
    """The real thing: a venv with the lowest msgspec that pyproject.toml allows renders the committed files."""
    import os
    import subprocess
    import sys
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((SCHEMAS.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "msgspec")
    lowest = next(s.version for s in req.specifier if s.operator == ">=")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = tmp_path / "site"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                          "--target", str(target), f"msgspec=={lowest}"], capture_output=True, text=True,
                         timeout=300, env=env)
    if got.returncode != 0:
        pytest.skip(f"msgspec=={lowest} cannot be downloaded here: {got.stderr.strip()[-300:]}")
    script = ("import sys, msgspec; from busserve.bus import schema_export; "
              f"assert msgspec.__version__.startswith({lowest!r}), msgspec.__version__; "
              "sys.exit(1 if schema_export.stale_files(schema_export.Path(sys.argv[1])) else 0)")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", script, str(SCHEMAS)], capture_output=True, text=True,
                         timeout=120, env={**env, "PYTHONPATH": f"{target}:{SCHEMAS.parent}"})
    assert run.returncode == 0, f"msgspec {lowest} renders other schemas than committed: {run.stderr}"

"""The command line: version, schema export, and --help on every command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from busserve import __version__

COMMANDS = [
    [], ["version"], ["schema", "export"], ["nats"], ["up"], ["engine"], ["router"], ["generate"],
    ["strategy"], ["strategy", "set"], ["strategy", "show"], ["strategy", "serve"], ["strategy", "roles"],
    ["status"], ["bench"],
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "busserve.cli", *args], capture_output=True, text=True, timeout=60)


def test_version() -> None:
    out = _run("version")
    assert out.returncode == 0 and out.stdout.strip() == f"busserve {__version__}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "busserve")
def test_help_everywhere(cmd: list[str]) -> None:
    out = _run(*cmd, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: busserve" in out.stdout


def test_schema_export_check_passes_on_the_repo() -> None:
    out = _run("schema", "export", "--check", "--out", "schemas")
    assert out.returncode == 0, out.stderr


def test_schema_export_check_fails_on_drift(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert _run("schema", "export", "--out", str(tmp_path)).returncode == 0
    (tmp_path / "asyncapi.json").write_text("{}")
    out = _run("schema", "export", "--check", "--out", str(tmp_path))
    assert out.returncode == 1 and "asyncapi.json" in out.stderr


def test_engine_refuses_an_attention_backend_that_cannot_run_here() -> None:
    """Refused up front, with the reason, before any model is loaded or bus dialled."""
    out = _run("engine", "--attention", "flashinfer", "--nats", "nats://127.0.0.1:1")
    assert out.returncode == 2
    assert "--attention flashinfer" in out.stdout and "CUDA" in out.stdout

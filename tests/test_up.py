"""``busserve up`` for real — embedded NATS, two SmolLM2 engines, the router and the HTTP front — driven by the
official ``openai`` client and by ``busserve generate``, then stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from busserve.bus.embedded import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    state = tmp_path_factory.mktemp("up-state")
    port = free_port()
    env = {**os.environ, "BUSSERVE_STATE_DIR": str(state), "BUSSERVE_MODEL_CACHE": os.environ.get(
        "BUSSERVE_MODEL_CACHE", str(Path(os.environ.get("BUSSERVE_STATE_DIR", "/tmp")) / "models"))}
    log = open(state / "up.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "busserve.cli", "up", "--http-port", str(port), "--kv-memory",
                             "256MiB", "--strategy", "pd"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 300
    while "ready:" not in (state / "up.log").read_text(errors="replace"):
        assert proc.poll() is None, (state / "up.log").read_text()
        assert time.monotonic() < deadline, (state / "up.log").read_text()
        time.sleep(0.3)
    yield f"http://127.0.0.1:{port}/v1", env
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does
    try:
        rc = proc.wait(timeout=60)
    finally:
        log.close()
    text = (state / "up.log").read_text(errors="replace")
    assert rc == 0, text
    assert "stopped" in text
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the HTTP front is still listening"
    assert not (state / "up.json").exists()


def _client(up: tuple[str, dict[str, str]]) -> openai.OpenAI:
    return openai.OpenAI(base_url=up[0], api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture
def client(up: tuple[str, dict[str, str]]) -> Iterator[openai.OpenAI]:
    with _client(up) as c:
        yield c


def test_chat_completion(up: tuple[str, dict[str, str]], client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=30,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (out.choices[0].message.content or "")
    assert out.choices[0].finish_reason == "stop" and out.usage is not None and out.usage.completion_tokens > 0


def test_chat_completion_streaming_with_usage(up: tuple[str, dict[str, str]], client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


def test_completions_streaming_and_not(up: tuple[str, dict[str, str]], client: openai.OpenAI) -> None:
    whole = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
        if c.choices)
    assert whole.choices[0].text == streamed and "Paris" in streamed
    assert whole.choices[0].finish_reason == "length"


def test_models_and_health(up: tuple[str, dict[str, str]], client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    import json
    import urllib.request

    with urllib.request.urlopen(up[0].removesuffix("/v1") + "/health", timeout=10) as resp:
        health = json.load(resp)
    assert health["status"] == "ok" and health["engines"] == 2 and health["strategy"] == "pd"


def test_openai_shaped_errors(up: tuple[str, dict[str, str]], client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=5.0,
                                       messages=[{"role": "user", "content": "hi"}])
    assert bad.value.status_code == 400 and "temperature" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="word " * 9000, max_tokens=4)
    assert "context" in str(long.value)


def test_busserve_generate_finds_the_cluster(up: tuple[str, dict[str, str]]) -> None:
    out = subprocess.run([sys.executable, "-m", "busserve.cli", "generate", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=120, env=up[1], cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout

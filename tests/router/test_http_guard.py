"""The HTTP front's guard (busserve/router/http_guard.py) as ASGI: keys, body limit, rate and concurrency, driven
with real ASGI messages; then a real router process with the front, a real engine and keys from a file."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from busserve.bus.embedded import free_port
from busserve.engine.model_loader import LoadedModel
from busserve.router.http_guard import Guard, Limits, load_api_keys
from busserve.testing import ProcessCluster
from tests.helpers import asgi_call


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers its length; ``/slow`` holds the request a while (a long stream)."""
    size = 0
    while True:
        msg = await receive()
        size += len(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.asyncio
async def test_keys_are_required_once_configured() -> None:
    guard = Guard(_echo_app, {"sk-good": "alice"})
    assert (await asgi_call(guard, key="sk-good"))[0] == 200
    for key in (None, "sk-bad", ""):
        status, headers, body = await asgi_call(guard, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
        assert headers["www-authenticate"] == "Bearer"
    assert (await asgi_call(guard, path="/health"))[0] == 200  # probes need no key
    assert guard.refused == {401: 3}


@pytest.mark.asyncio
async def test_bodies_over_the_limit_get_413_declared_or_not() -> None:
    guard = Guard(_echo_app, {}, Limits(max_body_bytes=1000))
    assert (await asgi_call(guard, body=b"x" * 1000))[2] == {"size": 1000}
    status, _, body = await asgi_call(guard, body=b"x" * 1001)
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    status, _, body = await asgi_call(guard, body=b"x" * 5000, chunks=10, declare=False)  # chunked: counted
    assert status == 413, body
    assert (await asgi_call(guard, body=b"x" * 900, chunks=3, declare=False))[2] == {"size": 900}


@pytest.mark.asyncio
async def test_rate_per_key_with_retry_after() -> None:
    now = [0.0]
    guard = Guard(_echo_app, {"ka": "a", "kb": "b"}, Limits(rate_per_s=2.0, burst=2), clock=lambda: now[0])
    assert [(await asgi_call(guard, key="ka"))[0] for _ in range(3)] == [200, 200, 429]
    status, headers, body = await asgi_call(guard, key="ka")
    assert status == 429 and headers["retry-after"] == "1" and body["error"]["type"] == "rate_limit_error"
    assert (await asgi_call(guard, key="kb"))[0] == 200  # another key has its own bucket
    now[0] += 0.5  # one token back at 2/s
    assert [(await asgi_call(guard, key="ka"))[0] for _ in range(2)] == [200, 429]


@pytest.mark.asyncio
async def test_concurrency_per_key() -> None:
    guard = Guard(_echo_app, {"ka": "a", "kb": "b"}, Limits(max_concurrent=2))
    results = await asyncio.gather(*(asgi_call(guard, "/slow", key="ka") for _ in range(3)),
                                   asgi_call(guard, "/slow", key="kb"))
    assert sorted(r[0] for r in results[:3]) == [200, 200, 429] and results[3][0] == 200
    assert (await asgi_call(guard, "/slow", key="ka"))[0] == 200  # the slots came back


def test_keys_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# team keys\nalice sk-a\nsk-b  # unnamed\n\n")
    assert load_api_keys(str(f), "sk-c, ") == {"sk-a": "alice", "sk-b": "key-2", "sk-c": "env-1"}
    f.write_text("a b c\n")
    with pytest.raises(ValueError, match="keys:1"):
        load_api_keys(str(f))


def _post(url: str, body: bytes, key: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_front(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the front did not come up"
            time.sleep(0.2)


@pytest.mark.slow
def test_a_real_front_with_keys_and_limits(tiny_dir: Path, tiny: LoadedModel, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alice sk-alice\nbob sk-bob\n")
    port = free_port()
    with ProcessCluster(log_dir=str(tmp_path)) as c:
        c.start_engine("A", "--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "256", threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir), "--http-port",
                str(port), "--api-keys-file", str(keys), "--max-body-bytes", "20000", "--rate-limit", "1",
                "--rate-burst", "2")
        c.wait_engines({"A"})
        base = f"http://127.0.0.1:{port}"
        _wait_front(port)  # /health is open to probes, no key
        ok = json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0}).encode()
        assert _post(f"{base}/v1/completions", ok, None)[0] == 401
        assert _post(f"{base}/v1/completions", ok, "sk-mallory")[0] == 401
        status, body = _post(f"{base}/v1/completions", ok, "sk-alice")
        assert status == 200 and body["usage"]["completion_tokens"] == 3, body
        huge = json.dumps({"prompt": "x" * 30000, "max_tokens": 1}).encode()
        assert _post(f"{base}/v1/completions", huge, "sk-alice")[0] == 413
        statuses = [_post(f"{base}/v1/completions", ok, "sk-alice")[0] for _ in range(3)]
        assert 429 in statuses, statuses
        # Bob is unaffected by Alice's bucket, and the front serves on.
        status, body = _post(f"{base}/v1/completions", ok, "sk-bob")
        assert status == 200, body
        status, body = _post(f"{base}/v1/nowhere", ok, "sk-bob")
        assert status == 404 and body["error"]["code"] == "not_found", body


@pytest.mark.slow
def test_a_waiting_stream_gets_its_headers_and_keepalives_at_once(tiny_dir: Path, tiny: LoadedModel,
                                                                  tmp_path: Path) -> None:
    """The engine is stopped (SIGSTOP) when the request comes: the client still gets 200, the SSE headers and a
    keep-alive comment within a second; once the engine runs again the tokens follow and the stream ends."""
    import http.client
    import signal

    port = free_port()
    with ProcessCluster(log_dir=str(tmp_path)) as c:
        engine = c.start_engine("A", "--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "256", threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir), "--http-port",
                str(port), "--progress-s", "120")
        c.wait_engines({"A"})
        _wait_front(port)
        engine.send_signal(signal.SIGSTOP)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            t0 = time.monotonic()
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hello", "max_tokens": 4, "stream": True,
                                                                "temperature": 0}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/event-stream")
            first = resp.readline()
            assert first.startswith(b": keep-alive"), first
            assert time.monotonic() - t0 < 2.0
        finally:
            engine.send_signal(signal.SIGCONT)
        rest = resp.read().decode()
        conn.close()
        assert rest.rstrip().endswith("data: [DONE]"), rest
        assert sum(1 for line in rest.splitlines() if line.startswith("data: {")) >= 2, rest

"""``busserve up`` for real — embedded NATS, two SmolLM2 engines, the router and the HTTP front — driven by the
official ``openai`` client and by ``busserve generate``; an engine killed under 16 streams (every stream completes,
the engine comes back); then stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from busserve.bus.embedded import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
Up = tuple[str, dict[str, str], Path]  # the API's URL, the environment that finds the stack, its log


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
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
    yield f"http://127.0.0.1:{port}/v1", env, state / "up.log"
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


def _client(up: Up) -> openai.OpenAI:
    return openai.OpenAI(base_url=up[0], api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture
def client(up: Up) -> Iterator[openai.OpenAI]:
    with _client(up) as c:
        yield c


def test_chat_completion(up: Up, client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=30,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (out.choices[0].message.content or "")
    assert out.choices[0].finish_reason == "stop" and out.usage is not None and out.usage.completion_tokens > 0


def test_chat_completion_streaming_with_usage(up: Up, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


def test_completions_streaming_and_not(up: Up, client: openai.OpenAI) -> None:
    whole = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
        if c.choices)
    assert whole.choices[0].text == streamed and "Paris" in streamed
    assert whole.choices[0].finish_reason == "length"


def test_models_and_health(up: Up, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    import json
    import urllib.request

    with urllib.request.urlopen(up[0].removesuffix("/v1") + "/health", timeout=10) as resp:
        health = json.load(resp)
    assert health["status"] == "ok" and health["engines"] == 2 and health["strategy"] == "pd"


def test_openai_shaped_errors(up: Up, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=5.0,
                                       messages=[{"role": "user", "content": "hi"}])
    assert bad.value.status_code == 400 and "temperature" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="word " * 9000, max_tokens=4)
    assert "context" in str(long.value)


def test_busserve_generate_finds_the_cluster(up: Up) -> None:
    out = subprocess.run([sys.executable, "-m", "busserve.cli", "generate", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=120, env=up[1], cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_sampling_parameters_and_tokenizer_endpoints(up: Up, client: openai.OpenAI) -> None:
    """Parameters the front implements change the output (a forced token), those it does not are refused by
    name, and /tokenize, /detokenize, /v1/models/{id}, /version answer as vLLM's do."""
    import json
    import urllib.request

    base = up[0].removesuffix("/v1")

    def post(path: str, body: dict[str, object]) -> dict[str, object]:
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    ids = post("/tokenize", {"prompt": " banana", "add_special_tokens": False})["tokens"]
    assert isinstance(ids, list) and len(ids) == 1
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=3, temperature=0,
                                         logit_bias={str(ids[0]): 100},
                                         messages=[{"role": "user", "content": "Name a city."}])
    assert out.choices[0].message.content == post("/detokenize", {"tokens": ids * 3})["prompt"] == " banana" * 3
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat["count"] == len(chat["tokens"]) > 3  # type: ignore[arg-type]
    out2 = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8,
                                     temperature=0, frequency_penalty=2.0, presence_penalty=1.0,
                                     extra_body={"min_tokens": 8, "repetition_penalty": 1.2})
    assert out2.usage is not None and out2.usage.completion_tokens == 8
    echoed = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                       max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                      max_tokens=4, temperature=0)
    assert echoed.choices[0].text == "The capital of France is" + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=4, temperature=0, echo=True,
        stream=True) if c.choices)
    assert streamed == echoed.choices[0].text
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=2, suffix="end")
    assert "suffix" in str(refused.value)
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with urllib.request.urlopen(base + "/version", timeout=10) as resp:
        assert json.loads(resp.read())["version"]


def test_logprobs_streamed_and_not(up: Up, client: openai.OpenAI) -> None:
    """OpenAI's shapes: chat ``logprobs.content`` (token, bytes, top alternatives, likeliest first) spelling the
    answer, streamed and not the same; completions' parallel lists with text offsets."""
    ask = {"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
           "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    whole = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)  # type: ignore[call-overload]
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob  # greedy: the top one
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token or "\ufffd" in t.token
    streamed = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True)  # type: ignore
    parts = [lp for c in streamed if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [p.token for p in parts] == [t.token for t in content]
    assert all(abs(p.logprob - t.logprob) < 1e-5 for p, t in zip(parts, content, strict=True))
    comp = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                     max_tokens=6, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert lp is not None and "".join(lp.tokens) == comp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) >= tl - 1e-6 for top, tl in zip(lp.top_logprobs,
                                                                                  lp.token_logprobs, strict=True))


STRUCTURED_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                      "country": {"type": "string", "maxLength": 40}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {
        "answer": {"enum": ["yes", "no"]},
        "reasons": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 1, "maxItems": 3},
        "source": {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1000, "maximum": 2100},
                                                    "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"}},
                   "required": ["year", "code"], "additionalProperties": False}},
     "required": ["answer", "reasons", "source"], "additionalProperties": False},
]


def test_structured_outputs_on_the_real_model(up: Up, client: openai.OpenAI) -> None:
    """response_format json_schema (nested objects, enums, arrays, a regex pattern) and json_object, and vLLM's
    guided_choice and guided_regex, streamed and not, through the pd strategy: every output parses and validates."""
    ask: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "max_tokens": 160, "temperature": 0}
    question = [{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON."}]
    for schema in STRUCTURED_SCHEMAS:
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        whole = client.chat.completions.create(messages=question, response_format=fmt, **ask)  # type: ignore
        assert whole.choices[0].finish_reason == "stop", whole
        jsonschema.validate(json.loads(whole.choices[0].message.content or ""), schema)
        streamed = client.chat.completions.create(messages=question, response_format=fmt, stream=True,  # type: ignore
                                                  **ask)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == whole.choices[0].message.content  # greedy: the same value either way
    obj = client.chat.completions.create(messages=question, response_format={"type": "json_object"}, **ask)
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    choice = client.completions.create(prompt="Is Paris in France? Answer:", extra_body={
        "guided_choice": ["yes", "no"]}, **ask)
    assert choice.choices[0].text in ("yes", "no")
    date = client.completions.create(prompt="The date today, as YYYY-MM-DD:", extra_body={
        "guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}, **ask)
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", date.choices[0].text)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(messages=question, response_format={  # type: ignore[call-overload]
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, **ask)
    assert bad.value.body["param"] == "response_format"  # type: ignore[index]
    assert client.chat.completions.create(messages=question, **ask).choices[0].message.content  # still serving


def test_chat_echo_repeats_the_last_assistant_message(up: Up, client: openai.OpenAI) -> None:
    """vLLM's chat echo: a last assistant message comes back before what follows it, streamed and not; with a
    user message last there is nothing to repeat."""
    turns: Any = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ask: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "max_tokens": 5, "temperature": 0,
                           "extra_body": {"echo": True}}
    whole = client.chat.completions.create(messages=turns, **ask)
    assert (whole.choices[0].message.content or "").startswith("Blue.")
    streamed = client.chat.completions.create(messages=turns, stream=True, **ask)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    plain = client.chat.completions.create(messages=turns[:1], **ask)
    assert plain.choices[0].message.content == client.chat.completions.create(
        messages=turns[:1], model=ask["model"], max_tokens=5, temperature=0).choices[0].message.content


def test_the_default_stack_is_secured(up: Up) -> None:
    """No anonymous access, the local client identity cannot read cluster state or others' inboxes, the operator's
    commands work, and no password is on any child's command line."""
    import asyncio
    import json

    from busserve.bus.client import Bus
    from busserve.bus.config import BusConfig
    from busserve.security.server_config import Credentials

    state = json.loads((up[2].parent / "up.json").read_text())
    creds_file = Path(state["credentials"])
    assert creds_file.stat().st_mode & 0o077 == 0, oct(creds_file.stat().st_mode)
    creds = Credentials.load(creds_file)

    async def check() -> list[str]:
        with pytest.raises(ConnectionError, match="refused an anonymous connection"):
            await Bus.connect(BusConfig(servers=[state["nats_url"]], connect_attempts=1), name="anonymous")
        client = await Bus.connect(creds.of_role("client").bus_config(BusConfig(servers=[state["nats_url"]])),
                                   name="t")
        errors: list[str] = []
        client.nc._error_cb = lambda exc: _append(errors, exc)  # type: ignore[attr-defined]
        for subject in ("_INBOX.>", client.subjects.engines_status(), client.subjects.all_kv_events()):
            await client.nc.subscribe(subject)
        await client.nc.flush()
        await asyncio.sleep(0.3)
        await client.close()
        return errors

    errors = asyncio.run(check())
    assert sum("permissions violation" in e for e in errors) == 3, errors
    status = subprocess.run([sys.executable, "-m", "busserve.cli", "status", "--once"], capture_output=True,
                            text=True, timeout=60, env=up[1], cwd=REPO)
    assert status.returncode == 0 and "e0" in status.stdout, status.stdout + status.stderr
    secrets = [i.password for i in creds.identities.values()]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert not any(p in cmdline for p in secrets), f"a password on the command line of pid {pid}"


async def _append(errors: list[str], exc: Exception) -> None:
    errors.append(str(exc))


def test_a_killed_engine_costs_no_stream_and_comes_back(up: Up) -> None:
    """16 streaming completions of 160 tokens; one engine SIGKILLed mid-way: all 16 finish whole (the router
    resumes the lost ones on the other engine), and `busserve up` starts the dead engine again."""
    import re
    import threading

    log = up[2]
    pids = dict(re.findall(r"engine (e\d): pid (\d+)", log.read_text()))
    results: list[tuple[str, str | None, int]] = [("", None, 0)] * 16

    def one(i: int) -> None:
        with _client(up) as c:
            text, finish, chunks = "", None, 0
            for chunk in c.completions.create(model="SmolLM2-135M-Instruct", prompt=f"Story {i}: once upon a time",
                                              max_tokens=160, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True}):
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                    chunks += 1
            results[i] = (text, finish, chunks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    os.kill(int(pids["e1"]), signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    assert all(finish == "length" for _, finish, _ in results), results
    text = log.read_text(errors="replace")
    assert "resumed on e0" in text, "no stream was on the killed engine: the test proved nothing"
    deadline = time.monotonic() + 120
    while "e1 restarted" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    with _client(up) as c:  # and the stack serves on
        out = c.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8,
                                   temperature=0)
        assert "Paris" in out.choices[0].text


def test_rolling_restart_under_16_streams(up: Up) -> None:
    """SIGHUP to `busserve up` restarts its engines one by one, each draining first: 16 streams started before it
    all finish whole, their requests moved live off each engine in turn, and the stack serves on."""
    import json
    import threading

    log = up[2]
    before = log.read_text(errors="replace")
    pid = json.loads((log.parent / "up.json").read_text())["pid"]
    results: list[tuple[str | None, int]] = [(None, 0)] * 16
    started = threading.Semaphore(0)

    def one(i: int) -> None:
        with _client(up) as c:
            finish, chunks = None, 0
            for chunk in c.completions.create(model="SmolLM2-135M-Instruct", prompt=f"Tale {i}: a long time ago",
                                              max_tokens=200, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True}):
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
                    chunks += 1
                    if chunks == 1:
                        started.release()
            results[i] = (finish, chunks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for _ in threads:  # every stream decoding (on a fast machine 200 tokens take a few seconds)
        assert started.acquire(timeout=120)
    os.kill(pid, signal.SIGHUP)
    for t in threads:
        t.join(timeout=300)
    assert all(finish == "length" for finish, _ in results), results
    deadline = time.monotonic() + 180
    while "rolling restart done" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    new = log.read_text(errors="replace")[len(before):]
    assert "rolling restart: e0 serving again" in new and "rolling restart: e1 serving again" in new, new[-4000:]
    assert "migration of" in new, "no request moved: the test proved nothing"
    with _client(up) as c:
        out = c.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8,
                                   temperature=0)
        assert "Paris" in out.choices[0].text

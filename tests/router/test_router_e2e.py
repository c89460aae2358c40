"""The router with real processes: two engines (tiny model), a router with its HTTP front, strategy processes.

Every built-in strategy gives the greedy output of one engine; strategies switch live (also under load, with no
failed request); a strategy written in a test file serves requests from its own process; engine roles change at
run time; a request with no engine gets a prompt error; a cancel frees pages on every engine involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.micro.service import EndpointStats, ServiceStats

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.bus.embedded import free_port
from busserve.bus.subjects import ENGINE_ACTIONS
from busserve.engine.model_loader import LoadedModel
from busserve.messages import (
    Cancel,
    EngineStatus,
    Error,
    Final,
    GenerateRequest,
    RouterStatus,
    SamplingParams,
    SetStrategy,
    StrategyState,
    TokenChunk,
)
from busserve.router.dispatcher import ROUTER_QUEUE
from busserve.testing import ProcessCluster, prompt_tokens_computed
from busserve.tokenization import vocab_size
from tests.helpers import assert_greedy_equal, live_view, wait_idle_no_leaks

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tiny_dir: Path) -> Iterator[tuple[ProcessCluster, int]]:
    port = free_port()
    with ProcessCluster() as c:
        for eid in ("A", "B"):
            c.start_engine(eid, "--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "256",
                           "--max-batch-tokens", "64", threads=1)
        c.start("router", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir),
                "--http-port", str(port))
        c.wait_engines({"A", "B"})
        yield c, port


def _prompt(tiny: LoadedModel, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    vocab = vocab_size(tiny.tokenizer)
    return [rng.randrange(100, vocab) for _ in range(n)]


async def _tokens(bus: Bus, prompt: list[int], subject: str | None = None, n: int = 10) -> tuple[list[int], Final]:
    req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=n, temperature=0,
                                                                           ignore_eos=True))
    events = [e async for e in bus.generate(req, subject=subject, first_event_timeout_s=60)]
    assert isinstance(events[-1], Final), events[-1]
    assert sum(isinstance(e, (Final, Error)) for e in events) == 1
    return [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids], events[-1]


async def _set(bus: Bus, name: str, **params: object) -> StrategyState:
    return await bus.request(bus.subjects.control_strategy(), SetStrategy(name=name, params=params),  # type: ignore[arg-type]
                             StrategyState, timeout_s=10)


async def _connect(c: ProcessCluster) -> Bus:
    bus = await Bus.connect(c.bus_config(), name="t")
    await live_view(bus, {"A", "B"})
    await _wait_router(bus)
    return bus


async def _wait_router(bus: Bus, router_id: str = "r0", strategy: str | None = None) -> RouterStatus:
    sub = await bus.nc.subscribe(bus.subjects.routers_status())
    try:
        for _ in range(200):
            st = codec.decode((await sub.next_msg(timeout=30)).data, RouterStatus)
            if st.router_id == router_id and (strategy is None or st.strategy == strategy):
                return st
        raise AssertionError(f"router {router_id} never reported strategy {strategy}")
    finally:
        await sub.unsubscribe()


async def _gather(bus: Bus, subject: str, wait_s: float = 0.5) -> list[dict[str, Any]]:
    """Every answer to a NATS services discovery request, as ``nats micro ls`` collects them."""
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish(subject, b"", reply=inbox)
    answers = []
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            answers.append(json.loads((await sub.next_msg(timeout=wait_s)).data))
    await sub.unsubscribe()
    return answers


async def _endpoint_stats(bus: Bus, name: str, sid: str) -> dict[str, EndpointStats]:
    reply = await bus.nc.request(f"$SRV.STATS.{name}.{sid}", b"", timeout=2)
    return {e.name: e for e in ServiceStats.from_dict(json.loads(reply.data)).endpoints}


STRATEGIES = [("least_loaded", {}), ("round_robin", {}), ("pd", {}), ("balanced_pd", {"f": 0.1}),
              ("balanced_pd", {"f": 0.5}), ("prefix_aware", {}), ("migrate", {"busy": 0, "min_prefix": 16}),
              ("adaptive", {}), ("least_loaded", {"prefill_chunk": 16}), ("adaptive", {"prefill_chunk": 16})]


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "params"), STRATEGIES, ids=[f"{n}{p}" for n, p in STRATEGIES])
async def test_every_strategy_matches_one_engine(cluster: tuple[ProcessCluster, int], tiny: LoadedModel, name: str,
                                                 params: dict[str, object]) -> None:
    c, _ = cluster
    bus = await _connect(c)
    try:
        state = await _set(bus, name, **params)
        assert state.name == name and state.revision > 0
        prompt = _prompt(tiny, 70, seed=hash((name, str(params))) % 1000)
        want, _ = await _tokens(bus, prompt, subject=bus.subjects.engine_action("A", "generate"))
        await asyncio.sleep(0.2)
        for _ in range(2):  # cold, then with the prompt cached somewhere
            got, final = await _tokens(bus, prompt)
            assert_greedy_equal(tiny, prompt, got, want)
            assert final.engine_id in {"A", "B"}
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_the_http_front_serves_every_strategy(cluster: tuple[ProcessCluster, int], tiny: LoadedModel) -> None:
    import openai

    c, port = cluster
    bus = await _connect(c)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    try:
        prompt = _prompt(tiny, 40, seed=5)
        want, _ = await _tokens(bus, prompt, subject=bus.subjects.engine_action("A", "generate"), n=8)
        want_text = tiny.tokenizer.decode(want, skip_special_tokens=True)
        for name in ("least_loaded", "pd", "balanced_pd"):
            await _set(bus, name)
            out = await client.completions.create(model="", prompt=prompt, max_tokens=8, temperature=0,
                                                  extra_body={"ignore_eos": True})
            assert out.choices[0].text == want_text and out.usage.completion_tokens == 8
    finally:
        await client.close()
        await bus.close()


@pytest.mark.asyncio
async def test_switching_strategies_under_load_fails_nothing(cluster: tuple[ProcessCluster, int],
                                                              tiny: LoadedModel) -> None:
    c, _ = cluster
    bus = await _connect(c)
    stop = asyncio.Event()

    async def switcher() -> int:
        n = 0
        while not stop.is_set():
            name, params = STRATEGIES[n % len(STRATEGIES)]
            await _set(bus, name, **params)
            n += 1
            await asyncio.sleep(0.05)
        return n

    async def one(i: int) -> Final:
        await asyncio.sleep(random.Random(i).random() * 2)
        return (await _tokens(bus, _prompt(tiny, 20 + i % 50, seed=1000 + i), n=6))[1]

    try:
        switching = asyncio.create_task(switcher())
        finals = await asyncio.gather(*(one(i) for i in range(48)))
        stop.set()
        switches = await switching
        assert switches > 10
        assert all(f.finish_reason == "length" for f in finals)
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        stop.set()
        await bus.close()


@pytest.mark.asyncio
async def test_cancel_frees_pages_on_every_engine_involved(cluster: tuple[ProcessCluster, int],
                                                            tiny: LoadedModel) -> None:
    c, _ = cluster
    bus = await _connect(c)
    try:
        await _set(bus, "pd")
        req = GenerateRequest(request_id="cancel-me", prompt_token_ids=_prompt(tiny, 120, seed=77),
                              sampling=SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0))
        events = []
        async for event in bus.generate(req, first_event_timeout_s=60):
            events.append(event)
            if len(events) == 3:
                await bus.publish(bus.subjects.cancel(), Cancel(request_id="cancel-me"))
        assert isinstance(events[-1], Final) and events[-1].finish_reason == "cancelled"
        assert sum(isinstance(e, (Final, Error)) for e in events) == 1
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_cancel_while_the_strategy_runs(cluster: tuple[ProcessCluster, int], tiny: LoadedModel) -> None:
    """A cancel that lands during prefill-side work still ends the request once and leaks nothing."""
    c, _ = cluster
    bus = await _connect(c)
    try:
        await _set(bus, "pd")
        for i in range(6):
            rid = f"early-cancel-{i}"
            req = GenerateRequest(request_id=rid, prompt_token_ids=_prompt(tiny, 600, seed=900 + i),
                                  sampling=SamplingParams(max_tokens=50, temperature=0))
            async with bus.open_stream() as stream:
                await bus.publish(bus.subjects.generate(), req, reply=stream.subject)
                await asyncio.sleep(0.01 * i)
                await bus.publish(bus.subjects.cancel(), Cancel(request_id=rid))
                events = [e async for e in stream.events(first_event_timeout_s=30)]
            terminals = [e for e in events if isinstance(e, (Final, Error))]
            assert len(terminals) == 1, events
            assert isinstance(terminals[0], Final) and terminals[0].finish_reason in {"cancelled", "stop", "length"}
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_a_strategy_process_serves_when_active(cluster: tuple[ProcessCluster, int], tiny: LoadedModel) -> None:
    c, _ = cluster
    proc = c.start("strategy-custom", "strategy", "serve", "tests.router.custom_strategy:pinned", "--name", "custom",
                   "--nats", c.url)
    bus = await _connect(c)
    try:
        for _ in range(100):  # wait until the process listens
            try:
                await _set(bus, "custom", target="B")
                break
            except Exception:
                await asyncio.sleep(0.1)
        for i in range(4):
            _, final = await _tokens(bus, _prompt(tiny, 30, seed=i))
            assert final.engine_id == "B"
        await _set(bus, "custom", target="A")
        _, final = await _tokens(bus, _prompt(tiny, 30, seed=9))
        assert final.engine_id == "A"
        await _set(bus, "least_loaded")
        # Listed as a NATS service, its requests (five routed, the routers' pings besides) counted.
        [stats] = [ServiceStats.from_dict(d) for d in await _gather(bus, "$SRV.STATS.busserve-strategy")]
        assert stats.metadata["strategy"] == "custom"
        [route] = stats.endpoints
        assert route.subject == bus.subjects.strategy("custom") and route.num_requests >= 5 and not route.num_errors
    finally:
        c.kill("strategy-custom", sig=15)
        await bus.close()
    assert proc.returncode is not None


@pytest.mark.asyncio
async def test_the_cluster_is_listed_as_nats_services(cluster: tuple[ProcessCluster, int], tiny: LoadedModel) -> None:
    """Engines and routers answer the NATS services protocol: listed, their endpoints named with their subjects, each
    request counted, a refused one counted as an error and carrying the protocol's error headers."""
    c, _ = cluster
    bus = await _connect(c)
    try:
        await _set(bus, "least_loaded")
        listed = {(p["name"], p["id"]) for p in await _gather(bus, "$SRV.PING")}
        assert {("busserve-engine", "A"), ("busserve-engine", "B"), ("busserve-router", "r0")} <= listed
        info = json.loads((await bus.nc.request("$SRV.INFO.busserve-engine.A", b"", timeout=2)).data)
        assert info["metadata"]["engine_id"] == "A"
        subjects = {e["name"]: e["subject"] for e in info["endpoints"]}
        assert subjects["start_generate"] == bus.subjects.engine_action("A", "start_generate")
        assert set(ENGINE_ACTIONS) <= set(subjects)

        router_before = await _endpoint_stats(bus, "busserve-router", "r0")
        engines_before = [await _endpoint_stats(bus, "busserve-engine", e) for e in ("A", "B")]
        await _tokens(bus, _prompt(tiny, 60, seed=11), n=4)
        # The engine that prefilled it publishes its measured prefill rate in its heartbeats.
        statuses = await bus.nc.subscribe(bus.subjects.engines_status())
        for _ in range(20):
            status = codec.decode((await statuses.next_msg(timeout=5)).data, EngineStatus)
            if status.prefill_tokens_per_s > 0 and status.decode_step_s > 0:
                break
        else:
            raise AssertionError("no engine published a measured prefill rate")
        await statuses.unsubscribe()
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox)
        bad = GenerateRequest(prompt_token_ids=[vocab_size(tiny.tokenizer) + 7], sampling=SamplingParams(max_tokens=2))
        await bus.publish(bus.subjects.generate(), bad, reply=inbox)
        refused = await sub.next_msg(timeout=30)
        await sub.unsubscribe()
        assert isinstance(codec.decode(refused.data, Error, refused.headers), Error)
        assert refused.headers is not None and refused.headers["Nats-Service-Error-Code"] == "400"
        assert refused.headers["Nats-Service-Error"].startswith("invalid_request: ")

        router_after = await _endpoint_stats(bus, "busserve-router", "r0")
        gen0, gen1 = router_before["generate"], router_after["generate"]
        assert (gen1.num_requests - gen0.num_requests, gen1.num_errors - gen0.num_errors) == (2, 1)
        assert gen1.queue_group == ROUTER_QUEUE
        engines_after = [await _endpoint_stats(bus, "busserve-engine", e) for e in ("A", "B")]
        served = sum(a.num_requests - b.num_requests for before, after in zip(engines_before, engines_after, strict=True)
                     for b, a in zip(before.values(), after.values(), strict=True))
        assert served >= 1
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_a_bad_prefill_chunk_fails_the_request_by_name(cluster: tuple[ProcessCluster, int],
                                                             tiny: LoadedModel) -> None:
    c, _ = cluster
    bus = await _connect(c)
    try:
        await _set(bus, "least_loaded", prefill_chunk=-1)
        req = GenerateRequest(prompt_token_ids=_prompt(tiny, 20, seed=5), sampling=SamplingParams(max_tokens=4))
        events = [e async for e in bus.generate(req, first_event_timeout_s=60)]
        assert len(events) == 1 and isinstance(events[0], Error) and "prefill_chunk" in events[0].message
        await _set(bus, "least_loaded")
        got, _ = await _tokens(bus, _prompt(tiny, 20, seed=5), n=8)  # and it goes on serving
        assert len(got) == 8
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_unknown_strategy_is_refused(cluster: tuple[ProcessCluster, int]) -> None:
    c, _ = cluster
    bus = await _connect(c)
    try:
        with pytest.raises(Exception, match="unknown strategy"):
            await _set(bus, "warp_drive")
        with pytest.raises(Exception, match="no parameter"):
            await _set(bus, "pd", f=0.3)
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_roles_change_at_run_time_and_pd_follows(cluster: tuple[ProcessCluster, int],
                                                        tiny: LoadedModel) -> None:
    c, _ = cluster
    bus = await _connect(c)

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "busserve.cli", "strategy", *args, "--nats", c.url],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return out.stdout

    try:
        assert "decode" in cli("roles", "B", "decode")
        cli("roles", "A", "prefill")
        view = await live_view(bus, {"A", "B"})
        for _ in range(40):
            if view.get("A").roles == ["prefill"] and view.get("B").roles == ["decode"]:
                break
            await asyncio.sleep(0.1)
        for name in ("pd", "adaptive"):  # adaptive may not run a request whole on a prefill-only engine either
            cli("set", name)
            assert name in cli("show")
            for i in range(3):
                prompt = _prompt(tiny, 50, seed=40 + i + len(name))
                got, final = await _tokens(bus, prompt)  # cold: B gets the prompt's KV from A
                want, _ = await _tokens(bus, prompt, subject=bus.subjects.engine_action("B", "generate"))
                assert final.engine_id == "B"  # the only decode engine
                assert_greedy_equal(tiny, prompt, got, want)
    finally:
        cli("roles", "A", "prefill,decode")
        cli("roles", "B", "prefill,decode")
        await bus.close()


@pytest.mark.asyncio
async def test_a_second_router_agrees_on_the_strategy(cluster: tuple[ProcessCluster, int], tiny_dir: Path) -> None:
    c, _ = cluster
    c.start("router2", "router", "--nats", c.url, "--id", "r1", "--tokenizer", str(tiny_dir))
    bus = await _connect(c)
    try:
        await _wait_router(bus, "r1")
        await _set(bus, "balanced_pd", f=0.3)
        st = await _wait_router(bus, "r1", strategy="balanced_pd")
        assert st.params == {"f": 0.3}
    finally:
        c.kill("router2", sig=15)
        await bus.close()


@pytest.mark.asyncio
async def test_no_engine_means_a_prompt_error(tiny_dir: Path) -> None:
    with ProcessCluster() as c:
        c.start("router", "router", "--nats", c.url, "--id", "lonely", "--tokenizer", str(tiny_dir))
        bus = await Bus.connect(c.bus_config(), name="t")
        try:
            await _wait_router(bus, "lonely")
            events = [e async for e in bus.generate(GenerateRequest(prompt="anyone?"), first_event_timeout_s=5)]
            assert len(events) == 1 and isinstance(events[0], Error) and events[0].code == "no_engine"
        finally:
            await bus.close()


def _example_command(lang: str, tmp: Path) -> list[str]:
    """How to run examples/<lang>'s client, built into ``tmp``; skips with the reason where its toolchain or
    packages are missing."""
    import shutil
    import subprocess

    root = REPO / "examples" / lang
    if lang == "typescript":
        tsc = root / "node_modules" / ".bin" / "tsc"
        if shutil.which("node") is None or not tsc.exists():
            pytest.skip("node or the example's npm packages are missing (scripts/setup.sh runs npm ci there)")
        # Built beside its node_modules (dist/, ignored by git): node resolves "nats" from there.
        built = subprocess.run([str(tsc), "-p", str(root)], capture_output=True, text=True, timeout=120)
        assert built.returncode == 0, built.stdout + built.stderr
        return ["node", str(root / "dist" / "client.js")]
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain on this machine (the Go example needs go 1.21 or newer)")
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    got = subprocess.run(["go", "build", "-o", str(tmp / "client"), "."], cwd=root, capture_output=True, text=True,
                         timeout=300, env=env)
    if got.returncode != 0 and ("proxy.golang.org" in got.stderr or "dial tcp" in got.stderr):
        pytest.skip(f"the nats.go module cannot be fetched here: {got.stderr.strip()[:200]}")
    assert got.returncode == 0, got.stderr
    return [str(tmp / "client")]


@pytest.mark.asyncio
@pytest.mark.parametrize("lang", ["typescript", "go"])
async def test_examples_in_other_languages(cluster: tuple[ProcessCluster, int], lang: str, tmp_path: Path) -> None:
    """'Any service, in any language': examples/typescript and examples/go, no busserve code — publish a request,
    read its stream to the terminal event checking every index, and cancel one mid-stream."""
    import json

    command = _example_command(lang, tmp_path)
    c, _ = cluster
    bus = await _connect(c)
    try:
        await _set(bus, "pd")
        for extra, want in (([], "final"), (["400", "3"], "cancelled")):
            out = await asyncio.create_subprocess_exec(*command, c.url, "Say hello", *(extra or ["12"]),
                                                       stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
            stdout, stderr = await asyncio.wait_for(out.communicate(), timeout=120)
            assert out.returncode == 0, stderr.decode()
            result = json.loads(stdout)
            terminal = result["terminal"]
            assert terminal["type"] == "final", result
            if want == "cancelled":  # the client's own cancel: ended early, and said so
                assert terminal["finish_reason"] == "cancelled" and 3 <= result["tokens"] < 400, result
            else:
                assert terminal["usage"]["completion_tokens"] >= 1 and result["tokens"] >= 1
    finally:
        await bus.close()


def test_busserve_bench_against_the_cluster(cluster: tuple[ProcessCluster, int], tmp_path: Path) -> None:
    """The load generator end to end: two strategies switched live, JSON with per-request arrays, CDF plot."""
    import json

    c, port = cluster
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    run = subprocess.run([sys.executable, "-m", "busserve.cli", "bench", "--nats", c.url, "--dataset", "mixed",
                          "--num-prompts", "8", "--rate", "20", "--warmup", "1", "--strategy", "least_loaded",
                          "--strategy", "balanced_pd:f=0.3", "--out", str(out), "--plot", str(png), "--no-progress",
                          "--slo-ttft-ms", "60000"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "balanced_pd(f=0.3)" in run.stdout and "least_loaded" in run.stdout
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["runs"]] == ["least_loaded", "balanced_pd(f=0.3)"]
    for r in result["runs"]:
        assert r["summary"]["completed"] == 8 and r["summary"]["goodput"] > 0
        assert len(r["requests"]["ttft"]) == 8 and all(t is not None for t in r["requests"]["e2e"])
    assert png.stat().st_size > 10_000
    http = subprocess.run([sys.executable, "-m", "busserve.cli", "bench", "--nats", c.url, "--http",
                           f"http://127.0.0.1:{port}/v1", "--dataset", "chat", "--num-prompts", "4",
                           "--output-len", "fixed:8", "--no-progress"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert http.returncode == 0, http.stdout + http.stderr


@pytest.mark.asyncio
async def test_n_choices_share_one_prefill(cluster: tuple[ProcessCluster, int], tiny: LoadedModel) -> None:
    """n=4 through the HTTP front: four different choices (seeds seed..seed+3), usage counting the prompt once,
    and the engines computing the prompt once — the other choices find it in the prefix cache (at most its last,
    partial page and one token each). Streamed: every choice's chunks under its index, each finished. best_of
    picks from more choices than it returns."""
    import openai

    c, port = cluster
    bus = await _connect(c)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        await _set(bus, "least_loaded")
        prompt = _prompt(tiny, 200, seed=41)
        before = await prompt_tokens_computed(bus, {"A", "B"})
        out = await client.completions.create(model="", prompt=prompt, max_tokens=12, temperature=1.0, seed=3, n=4,
                                              extra_body={"ignore_eos": True})
        after = await prompt_tokens_computed(bus, {"A", "B"})
        assert [ch.index for ch in out.choices] == [0, 1, 2, 3]
        assert len({ch.text for ch in out.choices}) > 1, out.choices  # their own seeds: not four copies
        assert out.usage is not None and out.usage.prompt_tokens == 200 and out.usage.completion_tokens == 48
        assert 200 <= after - before <= 200 + 3 * 16, after - before  # one prefill, not four
        # The same seed gives the same four choices again.
        again = await client.completions.create(model="", prompt=prompt, max_tokens=12, temperature=1.0, seed=3,
                                                n=4, extra_body={"ignore_eos": True})
        assert [ch.text for ch in again.choices] == [ch.text for ch in out.choices]
        streamed = await client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=6, temperature=1.0, n=3, stream=True,
                                                        stream_options={"include_usage": True})
        finished: dict[int, str] = {}
        usage = None
        async for chunk in streamed:
            for ch in chunk.choices:
                assert ch.index not in finished, "a chunk after its choice finished"
                if ch.finish_reason:
                    finished[ch.index] = ch.finish_reason
            usage = chunk.usage or usage
        assert set(finished) == {0, 1, 2}
        assert usage is not None and usage.completion_tokens <= 18
        best = await client.completions.create(model="", prompt=prompt, max_tokens=6, temperature=1.0, n=1,
                                               extra_body={"best_of": 3, "ignore_eos": True})
        assert len(best.choices) == 1 and best.choices[0].logprobs is None  # ranked by them, not shown
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="", prompt=prompt, max_tokens=6, n=2, stream=True,
                                            extra_body={"best_of": 3})
    finally:
        await client.close()
        await bus.close()

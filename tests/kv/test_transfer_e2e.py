"""prep_recv / remote_send / start_generate between two engine processes on one real nats-server.

Every orchestration pattern of DESIGN.md — data parallel, PD (end = L-1), balanced PD (f = 0.1, 0.5) and context
migration — must give the greedy output of one engine doing the whole request, over ``shm`` and ``bus``, with and
without prefix hits on either side; then failures (a sender killed mid-transfer, bad sub-requests) must end
cleanly, leak nothing, and leave both engines serving.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.engine.model_loader import LoadedModel
from busserve.errors import BusserveError, RemoteError
from busserve.messages import (
    EngineStatus,
    Error,
    Final,
    GenerateRequest,
    InvalidField,
    PrepRecv,
    PrepRecvReply,
    RemoteSend,
    RemoteSendReply,
    SamplingParams,
    TokenChunk,
)
from busserve.router.cluster import Engine, Timeouts
from busserve.router.request import Request
from busserve.testing import ProcessCluster
from busserve.tokenization import vocab_size
from tests.helpers import assert_greedy_equal, live_view, wait_idle_no_leaks

pytestmark = pytest.mark.slow

Pattern = Callable[[Request, Engine, Engine, str], Awaitable[RemoteSendReply | None]]


# ------------------------------------------------------------------ the patterns, as a strategy would write them


async def data_parallel(req: Request, other: Engine, target: Engine, transport: str) -> None:
    await target.prep_recv(req, end=0, transport=transport)  # type: ignore[arg-type]
    await target.start_generate(req, begin=0)


def disaggregated(f: float) -> Pattern:
    """PD with the decode engine prefilling the last fraction ``f`` of the prompt (f = 0: plain PD, end = L-1)."""

    async def run(req: Request, prefill: Engine, decode: Engine, transport: str) -> RemoteSendReply | None:
        end = req.prompt_len - 1 if f == 0 else math.floor((1 - f) * req.prompt_len)
        recv = await decode.prep_recv(req, end=end, transport=transport)  # type: ignore[arg-type]
        sent = None
        if recv.matched < end:
            sent = await prefill.remote_send(req, recv.kv_addr, begin=recv.matched, end=end)
        await decode.start_generate(req, begin=end)
        return sent

    return run


async def migrate(req: Request, holder: Engine, target: Engine, transport: str) -> RemoteSendReply | None:
    """The target pulls the prefix the holder has cached (no recompute), then generates."""
    end = min(holder.cached_prefix(req), req.prompt_len - 1)
    assert end > 0, "the holder should have the context cached"
    recv = await target.prep_recv(req, end=end, transport=transport)  # type: ignore[arg-type]
    sent = None
    if recv.matched < end:
        sent = await holder.remote_send(req, recv.kv_addr, begin=recv.matched, end=end)
        assert sent.computed_tokens == 0, "migration must not recompute the prefix"
    await target.start_generate(req, begin=end)
    return sent


PATTERNS: dict[str, Pattern] = {
    "data_parallel": data_parallel,
    "pd": disaggregated(0.0),
    "balanced_pd_0.1": disaggregated(0.1),
    "balanced_pd_0.5": disaggregated(0.5),
    "migrate": migrate,
}


# ------------------------------------------------------------------ driving one request


async def run_pattern(bus: Bus, pattern: Pattern, a: Engine, b: Engine, prompt: list[int], transport: str,
                      max_tokens: int = 12) -> tuple[list[int], RemoteSendReply | None]:
    req = Request(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, stream_subject="",
                  sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    async with bus.open_stream() as stream:
        req.stream_subject = stream.subject
        sent = await pattern(req, a, b, transport)
        events = [e async for e in stream.events(first_event_timeout_s=60)]
    assert isinstance(events[-1], Final), events[-1]
    assert sum(isinstance(e, (Final, Error)) for e in events) == 1
    return [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids], sent


async def one_engine(bus: Bus, engine_id: str, prompt: list[int], max_tokens: int = 12) -> list[int]:
    req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                           ignore_eos=True))
    events = [e async for e in bus.generate(req, subject=bus.subjects.engine_action(engine_id, "generate"))]
    assert isinstance(events[-1], Final), events[-1]
    return [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids]


def prompt_of(loaded: LoadedModel, n_tokens: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size(loaded.tokenizer), (n_tokens,), generator=g).tolist()


# ------------------------------------------------------------------ tiny model: every pattern × transport × cache


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir: Path) -> Iterator[ProcessCluster]:
    with ProcessCluster() as cluster:
        for eid in ("A", "B"):
            cluster.start_engine(eid, "--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "256",
                                 "--max-batch-tokens", "48", threads=1)
        cluster.wait_engines({"A", "B"})
        yield cluster


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["shm", "bus"])
@pytest.mark.parametrize("name", list(PATTERNS))
async def test_pattern_matches_one_engine(tiny_pair: ProcessCluster, tiny: LoadedModel, name: str,
                                          transport: str) -> None:
    bus = await Bus.connect(tiny_pair.bus_config(), name="t")
    try:
        view = await live_view(bus, {"A", "B"})
        a, b = view.get("A"), view.get("B")
        # 87 tokens: five full pages and a partial one; distinct per case so caches start cold.
        prompt = prompt_of(tiny, 87, seed=hash((name, transport)) % 10_000)
        want = await one_engine(bus, "A", prompt)  # A now holds the prompt in its cache (the migration source)
        await asyncio.sleep(0.3)  # KV events reach the view
        a = view.get("A")
        cold, sent_cold = await run_pattern(bus, PATTERNS[name], a, b, prompt, transport)
        assert_greedy_equal(tiny, prompt, cold, want)
        if sent_cold is not None:
            assert sent_cold.bytes_sent > 0
        # Again: now B has the prompt cached as well (a prefix hit on both sides).
        await asyncio.sleep(0.3)
        warm, sent_warm = await run_pattern(bus, PATTERNS[name], view.get("A"), view.get("B"), prompt, transport)
        assert_greedy_equal(tiny, prompt, warm, want)
        if sent_warm is not None:  # the sender's cache served all but the partial last page
            assert sent_warm.computed_tokens < view.get("A").status.page_size
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        await bus.close()


# ------------------------------------------------------------------ bad sub-requests


async def _expect_error(coro: Awaitable[object], code: str, field: str | None = None) -> None:
    with pytest.raises(RemoteError) as info:
        await coro
    assert info.value.error.code == code, info.value.error
    if field is not None:
        assert info.value.error.field == field, info.value.error


@pytest.mark.asyncio
async def test_bad_sub_requests_get_clear_errors_and_leak_nothing(tiny_pair: ProcessCluster,
                                                                   tiny: LoadedModel) -> None:
    bus = await Bus.connect(tiny_pair.bus_config(), name="t")
    try:
        view = await live_view(bus, {"A", "B"})
        a, b = view.get("A"), view.get("B")
        prompt = prompt_of(tiny, 40, seed=4242)
        req = Request(request_id="bad-1", prompt_token_ids=prompt, stream_subject="_INBOX.nobody",
                      sampling=SamplingParams(max_tokens=4, temperature=0))
        # unknown request id
        await _expect_error(b.start_generate(Request(request_id="never-seen", prompt_token_ids=prompt,
                                                     stream_subject="x", sampling=req.sampling), begin=0),
                            "unknown_request")
        # end beyond the prompt: the client refuses to build it, and the engine refuses one sent anyway
        with pytest.raises(InvalidField, match="beyond the prompt") as bad_end:
            await b.prep_recv(req, end=41)
        assert bad_end.value.field == "end"
        forged_end = PrepRecv(request_id="bad-0", prompt_token_ids=prompt, end=41, stream_subject="_INBOX.nobody",
                              migration=True)
        forged_end.migration = False  # past the constructor's check, as a non-Python client could send it
        await _expect_error(bus.request(bus.subjects.engine_action("B", "prep_recv"), forged_end, PrepRecvReply,
                                        timeout_s=10), "invalid_request", "end")
        recv = await b.prep_recv(req, end=30, transport="shm")
        # duplicate prep_recv
        await _expect_error(b.prep_recv(req, end=30), "conflict")
        # begin != end
        await _expect_error(b.start_generate(req, begin=29), "conflict", "begin")
        # a kv_addr meant for another request
        other = Request(request_id="bad-2", prompt_token_ids=prompt, stream_subject="x", sampling=req.sampling)
        await _expect_error(a.remote_send(other, recv.kv_addr, 0, 30), "invalid_request", "kv_addr.request_id")
        # a kv_addr whose shared-memory handle belongs to another engine
        forged = msgspec.structs.replace(recv.kv_addr, engine_id="A")
        await _expect_error(a.remote_send(req, forged, 0, 30), "invalid_request", "kv_addr.handle")
        # remote_send past the prompt it was given
        raw = RemoteSend(request_id="bad-1", prompt_token_ids=prompt[:10], kv_addr=recv.kv_addr, begin=0, end=30)
        await _expect_error(bus.request(bus.subjects.engine_action("A", "remote_send"), raw, RemoteSendReply,
                                        timeout_s=10), "invalid_request", "end")
        # begin past the receiver's matched prefix would leave positions unwritten
        await _expect_error(a.remote_send(req, recv.kv_addr, 8, 30), "invalid_request", "begin")
        # KV chunks over the bus for a reservation the receiver does not hold
        bus_req = Request(request_id="bad-3", prompt_token_ids=prompt, stream_subject="x", sampling=req.sampling)
        r3 = await b.prep_recv(bus_req, end=30, transport="bus")
        await b.abort(bus_req)
        await _expect_error(a.remote_send(bus_req, r3.kv_addr, 0, 30), "transfer_failed")
        # clean up the parked request: with no word that its sender stopped, its shm pages wait in quarantine (a
        # sender may still be writing) until the router says so, the sender process is gone, or the window ends
        assert (await b.abort(req)).found
        await wait_quarantined(bus, "B", 2)
        assert not (await b.abort(req, sender_stopped=True)).found  # nothing left to drop, and the pages come back
        await wait_idle_no_leaks(bus, {"A", "B"})
        for eid in ("A", "B"):
            assert len(await one_engine(bus, eid, prompt, max_tokens=3)) == 3
    finally:
        await bus.close()


async def wait_quarantined(bus: Bus, engine_id: str, pages: int, timeout_s: float = 10.0) -> None:
    sub = await bus.nc.subscribe(bus.subjects.engines_status())
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            st = codec.decode((await sub.next_msg(timeout=timeout_s)).data, EngineStatus)
            if st.engine_id == engine_id and st.quarantined_pages == pages:
                return
        raise AssertionError(f"engine {engine_id} never reported {pages} quarantined pages")
    finally:
        await sub.unsubscribe()


@pytest.mark.asyncio
async def test_unstarted_request_lease_expires(tiny_pair: ProcessCluster, tiny: LoadedModel) -> None:
    bus = await Bus.connect(tiny_pair.bus_config(), name="t")
    try:
        view = await live_view(bus, {"B"}, timeouts=Timeouts(lease_s=1.0))
        req = Request(request_id="lease-1", prompt_token_ids=prompt_of(tiny, 50, 5), stream_subject="",
                      sampling=SamplingParams(max_tokens=4))
        async with bus.open_stream() as stream:
            req.stream_subject = stream.subject
            await view.get("B").prep_recv(req, end=49)
            events = [e async for e in stream.events(first_event_timeout_s=10)]
        assert len(events) == 1 and isinstance(events[0], Error) and events[0].code == "lease_expired"
        await wait_idle_no_leaks(bus, {"B"})
    finally:
        await bus.close()


# ------------------------------------------------------------------ the real model, and a sender that dies


@pytest.fixture(scope="module")
def smol_pair() -> Iterator[ProcessCluster]:
    with ProcessCluster() as cluster:
        for eid in ("P", "D"):
            cluster.start_engine(eid, "--dtype", "float32", "--kv-memory", "192MiB", threads=1)
        cluster.start_engine("S", "--dtype", "float32", "--kv-memory", "192MiB", "--max-batch-tokens", "16",
                             threads=1)
        cluster.wait_engines({"P", "D", "S"})
        yield cluster


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["shm", "bus"])
@pytest.mark.parametrize("name", ["pd", "balanced_pd_0.5", "migrate"])
async def test_smollm2_patterns_match_one_engine(smol_pair: ProcessCluster, smol: LoadedModel, chat_ids: list[int],
                                                 name: str, transport: str) -> None:
    bus = await Bus.connect(smol_pair.bus_config(), name="t")
    try:
        view = await live_view(bus, {"P", "D"})
        prompt = chat_ids + prompt_of(smol, 60 + len(name) + len(transport), seed=7)  # distinct per case
        want = await one_engine(bus, "P", prompt, max_tokens=10)
        await asyncio.sleep(0.3)
        got, _ = await run_pattern(bus, PATTERNS[name], view.get("P"), view.get("D"), prompt, transport, 10)
        assert_greedy_equal(smol, prompt, got, want)
        await wait_idle_no_leaks(bus, {"P", "D"})
    finally:
        await bus.close()


# A receiver behind its own /dev/shm (a mount namespace with a fresh tmpfs: what a container on the same host, or
# an identically named host, looks like to shm): its shm domain differs, routers choose the bus, and a sender told
# to use shm anyway falls back to the bus for that request.
_OWN_SHM = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"]


def _can_unshare() -> bool:
    import subprocess

    try:
        return subprocess.run([*_OWN_SHM, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def split_shm_pair(tiny_dir: Path) -> Iterator[ProcessCluster]:
    if not _can_unshare():
        pytest.skip("cannot make a mount namespace with its own /dev/shm here (needs root or user namespaces)")
    with ProcessCluster() as cluster:
        args = ("--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "256", "--max-batch-tokens", "48")
        cluster.start_engine("H", *args, threads=1)
        cluster.start_engine("N", *args, threads=1, launcher=_OWN_SHM)
        cluster.wait_engines({"H", "N"})
        yield cluster


@pytest.mark.asyncio
async def test_shm_across_separate_dev_shm_falls_back_to_bus(split_shm_pair: ProcessCluster,
                                                             tiny: LoadedModel) -> None:
    bus = await Bus.connect(split_shm_pair.bus_config(), name="t")
    try:
        view = await live_view(bus, {"H", "N"})
        h, n = view.get("H"), view.get("N")
        assert h.host == n.host and h.status.shm_domain and n.status.shm_domain
        assert h.status.shm_domain != n.status.shm_domain
        assert n.transport_from(h) == "bus" and h.transport_from(n) == "bus"  # one host name, yet no shm
        for sender, receiver, seed in ((h, n, 1), (n, h, 2)):
            prompt = prompt_of(tiny, 70, seed=300 + seed)
            want = await one_engine(bus, sender.id, prompt, max_tokens=8)
            got, sent = await run_pattern(bus, disaggregated(0), sender, receiver, prompt, "shm", 8)
            assert got == want
            assert sent is not None and sent.transport == "bus" and sent.bytes_sent > 0, sent
        await wait_idle_no_leaks(bus, {"H", "N"})
    finally:
        await bus.close()


@pytest.fixture(scope="module")
def mooncake_pair(tiny_dir: Path) -> Iterator[ProcessCluster]:
    from busserve.kv.transfer.mooncake import unavailable

    why = unavailable()
    if why is not None:
        pytest.skip(why)
    with ProcessCluster() as cluster:
        args = ("--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "256", "--max-batch-tokens", "48",
                "--transport", "mooncake", "--transport", "bus")
        for eid in ("M1", "M2"):
            cluster.start_engine(eid, *args, threads=1)
        cluster.wait_engines({"M1", "M2"})
        yield cluster


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["pd", "balanced_pd_0.5", "migrate"])
async def test_mooncake_patterns_match_one_engine(mooncake_pair: ProcessCluster, tiny: LoadedModel,
                                                  name: str) -> None:
    """Mooncake's Transfer Engine (TCP) as the KV transport: the router picks it between engines that both offer
    it and share no /dev/shm, and every pattern gives one engine's tokens."""
    bus = await Bus.connect(mooncake_pair.bus_config(), name="t")
    try:
        view = await live_view(bus, {"M1", "M2"})
        a, b = view.get("M1"), view.get("M2")
        assert b.transport_from(a) == "mooncake"
        prompt = prompt_of(tiny, 80 + len(name), seed=41 + len(name))  # no prefix shared across cases
        want = await one_engine(bus, "M1", prompt, max_tokens=8)
        if name == "migrate":
            await asyncio.sleep(0.3)  # M1's KV events (its cached prompt) reach the view
        got, sent = await run_pattern(bus, PATTERNS[name], a, b, prompt, "mooncake", 8)
        assert got == want
        assert sent is not None and sent.transport == "mooncake" and sent.bytes_sent > 0, sent
        await wait_idle_no_leaks(bus, {"M1", "M2"})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_sender_dies_mid_transfer(smol_pair: ProcessCluster, smol: LoadedModel) -> None:
    """S is killed while prefilling for D: D's lease expires, the stream gets an Error, and the pages S was writing
    come back as soon as D sees S's process gone (they wait in quarantine until then)."""
    bus = await Bus.connect(smol_pair.bus_config(), name="t")
    try:
        view = await live_view(bus, {"S", "D"}, timeouts=Timeouts(lease_s=4.0, remote_send_s=6.0))
        prompt = prompt_of(smol, 700, seed=99)  # ~44 steps of 16 tokens on S: seconds of work
        req = Request(request_id="doomed", prompt_token_ids=prompt, stream_subject="",
                      sampling=SamplingParams(max_tokens=4))
        async with bus.open_stream() as stream:
            req.stream_subject = stream.subject
            sender = view.get("S")
            recv = await view.get("D").prep_recv(req, end=len(prompt) - 1, sender=sender, transport="shm")
            send = asyncio.create_task(sender.remote_send(req, recv.kv_addr, recv.matched, len(prompt) - 1))
            await asyncio.sleep(1.0)
            assert not send.done(), "the transfer finished before the sender could be killed"
            smol_pair.kill("S")
            events = [e async for e in stream.events(first_event_timeout_s=30)]
        assert len(events) == 1 and isinstance(events[0], Error) and events[0].code == "lease_expired"
        with pytest.raises(BusserveError):
            await send  # the strategy learns the sender is gone (no responders or time-out)
        await wait_idle_no_leaks(bus, {"D"})
        assert len(await one_engine(bus, "D", prompt[:50], max_tokens=3)) == 3  # D keeps serving
    finally:
        await bus.close()


def test_prep_recv_reply_carries_everything_a_sender_needs() -> None:
    fields = set(PrepRecvReply.__struct_fields__) | set(PrepRecv.__struct_fields__)
    assert {"matched", "kv_addr", "sampling", "lease_s", "end"} <= fields

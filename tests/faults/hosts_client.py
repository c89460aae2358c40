"""A client run *on* one of the test's hosts (``busserve.bench.hosts``): it sends greedy requests through the routers
(or straight to one engine with ``--engine``), all at once, reads every stream to its terminal event, checks it
(one terminal, indices without gap), and prints one JSON object: per request its tokens and how it ended.

    python -m tests.faults.hosts_client --prompts FILE --tokens 24 [--engine D] [--signal]
    python -m tests.faults.hosts_client --routers 3

The identity comes from the environment (BUSSERVE_NATS_*), as for any busserve process. ``--signal`` prints
``STREAMING <port>`` once every request has its first token (``port``: of the node this client is connected to;
the test then injects its fault) and the JSON at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from nats.aio.msg import Msg

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.messages import Error, Final, GenerateRequest, RouterStatus, SamplingParams, TokenChunk
from busserve.testing import Wire


async def routers(bus: Bus, listen_s: float) -> dict[str, object]:
    """Router id → the strategy its heartbeats name, heard for ``listen_s``."""
    seen: dict[str, object] = {}

    async def on_status(msg: Msg) -> None:
        st = codec.decode(msg.data, RouterStatus, msg.headers)
        seen[st.router_id] = st.strategy

    sub = await bus.nc.subscribe(bus.subjects.routers_status(), cb=on_status)
    await asyncio.sleep(listen_s)
    await sub.unsubscribe()
    return seen


async def main(args: argparse.Namespace) -> dict[str, object]:
    bus = await Bus.connect(BusConfig.from_env(), name="hosts-client")
    if args.routers:
        try:
            return await routers(bus, args.routers)
        finally:
            await bus.close()
    prompts: list[list[int]] = json.loads(Path(args.prompts).read_text())
    try:
        if args.engine:
            return await _direct(bus, prompts, args)
        return await _routed(bus, prompts, args)
    finally:
        await bus.close()


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)


async def _routed(bus: Bus, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, object]:
    """Through the routers, as any client does (``Bus.generate``: a loss on the way is asked again, a gap that
    stays is a ``stream_gap`` Error): every stream's events, checked here once more."""
    firsts = 0
    all_first = asyncio.Event()

    async def one(label: str, prompt: list[int]) -> dict[str, object]:
        nonlocal firsts
        events = []
        seen_first = False
        async for event in bus.generate(GenerateRequest(request_id=label, prompt_token_ids=prompt,
                                                        sampling=_sampling(args)), first_event_timeout_s=args.timeout):
            events.append(event)
            if not seen_first and isinstance(event, (TokenChunk, Final, Error)):
                seen_first, firsts = True, firsts + 1
                if firsts == len(prompts):
                    all_first.set()
        if not seen_first:
            firsts += 1
        tokens = [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids]
        indices = [e.index for e in events if isinstance(e, TokenChunk)]
        expected = [sum(len(e.token_ids) for e in events[:i] if isinstance(e, TokenChunk))
                    for i, e in enumerate(events) if isinstance(e, TokenChunk)]
        terminal = events[-1] if events else None
        return {"tokens": tokens, "problem": "" if indices == expected else f"indices {indices}",
                "final": terminal.finish_reason if isinstance(terminal, Final) else None,
                "error": f"{terminal.code}: {terminal.message}" if isinstance(terminal, Error) else None}

    tasks = {f"q{i}": asyncio.create_task(one(f"q{i}", p)) for i, p in enumerate(prompts)}
    if args.signal:
        await asyncio.wait_for(all_first.wait(), args.timeout)
        url = bus.nc.connected_url
        print(f"STREAMING {url.port if url is not None else ''}", flush=True)  # the port names our node
    return {label: await task for label, task in tasks.items()}


async def _direct(bus: Bus, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, object]:
    """Straight to one engine (a reference), read on the wire."""
    async with Wire(bus) as wire:
        for i, prompt in enumerate(prompts):
            _, reply = wire.listen(f"q{i}")
            req = GenerateRequest(request_id=f"q{i}", prompt_token_ids=prompt, sampling=_sampling(args))
            await bus.publish(bus.subjects.engine_action(args.engine, "generate"), req, reply=reply)
        await wire.all_ended(args.timeout, linger_s=1.0)
        out: dict[str, object] = {}
        for label, s in wire.streams.items():
            try:
                s.check()
                problem = ""
            except AssertionError as exc:
                problem = str(exc)
            t = s.terminal
            out[label] = {"tokens": s.tokens, "problem": problem,
                          "final": t.finish_reason if isinstance(t, Final) else None,
                          "error": None if isinstance(t, Final) or t is None else f"{t.code}: {t.message}"}
        return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="")
    ap.add_argument("--routers", type=float, default=0.0, metavar="S",
                    help="print the strategy each router's heartbeats name, heard for S seconds, and exit")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--engine", default="")
    ap.add_argument("--signal", action="store_true")
    ap.add_argument("--timeout", type=float, default=120.0)
    result = asyncio.run(main(ap.parse_args()))
    print(json.dumps(result), flush=True)
    sys.exit(0)

"""``busserve generate "prompt"``: send one request and stream its answer to the terminal.

It goes to the router (the generate subject). ``--engine ID`` sends it straight to one engine instead (the
data-parallel path, no router involved). With no router running, the least-loaded engine seen on the bus takes it,
and a note says so.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import msgspec
import nats.errors

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.cli.options import add_bus_args, bus_config
from busserve.errors import BusserveError, NoResponders
from busserve.messages import ChatMessage, EngineStatus, Error, Final, GenerateRequest, SamplingParams, TokenChunk


async def pick_engine(bus: Bus, listen_s: float = 1.5) -> str | None:
    """The least-loaded engine heard from within one heartbeat interval (plus a margin)."""
    sub = await bus.nc.subscribe(bus.subjects.engines_status())
    seen: dict[str, EngineStatus] = {}
    deadline = time.monotonic() + listen_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            st = codec.decode(msg.data, EngineStatus, msg.headers)
            seen[st.engine_id] = st
    finally:
        await sub.unsubscribe()
    return min(seen.values(), key=lambda s: s.running + s.waiting).engine_id if seen else None


def build_request(args: argparse.Namespace) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=list(args.stop))
    if args.raw:
        return GenerateRequest(prompt=args.prompt, model=args.model, sampling=sampling)
    messages = [ChatMessage(role="system", content=args.system)] if args.system else []
    messages.append(ChatMessage(role="user", content=args.prompt))
    return GenerateRequest(messages=messages, model=args.model, sampling=sampling)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="stream a completion through the router")
    add_bus_args(p)
    p.add_argument("prompt", help="the user's message (chat template applied unless --raw)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--model", default="")
    p.add_argument("--engine", default=None, help="send straight to this engine id, bypassing the router")
    p.add_argument("--json", action="store_true", help="print every event as JSON")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the first token")
    p.set_defaults(func=run)


async def _generate(args: argparse.Namespace) -> int:
    cfg = bus_config(args, role="operator" if args.engine else "client")
    cfg.max_reconnect_attempts = 0
    try:
        # Validate locally first, so a bad flag is reported as such, not as a server error.
        req = msgspec.convert(msgspec.to_builtins(build_request(args)), GenerateRequest)
    except msgspec.ValidationError as exc:
        print(f"invalid request: {exc}", file=sys.stderr)
        return 2
    bus = await Bus.connect(cfg, name="busserve-generate")
    try:
        subject = bus.subjects.engine_action(args.engine, "generate") if args.engine else None
        for attempt in range(2):
            try:
                return await _stream(bus, req, subject, args)
            except NoResponders:
                if attempt or args.engine:
                    raise
                engine = await pick_engine(bus)
                if engine is None:
                    print("no router and no engine on the bus; start them with `busserve up`", file=sys.stderr)
                    return 1
                print(f"(no router running; sending straight to engine {engine})", file=sys.stderr)
                subject = bus.subjects.engine_action(engine, "generate")
        return 1
    except BusserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await bus.close()


async def _stream(bus: Bus, req: GenerateRequest, subject: str | None, args: argparse.Namespace) -> int:
    async for event in bus.generate(req, subject=subject, first_event_timeout_s=args.timeout):
        if args.json:
            print(msgspec.json.encode(event).decode(), flush=True)
        elif isinstance(event, TokenChunk):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Final):
            sys.stdout.write("\n")
            if event.usage:
                print(f"[{event.finish_reason}; {event.usage.prompt_tokens} prompt + "
                      f"{event.usage.completion_tokens} completion tokens]", file=sys.stderr)
        elif isinstance(event, Error):
            where = f" ({event.field})" if event.field else ""
            print(f"\nerror: {event.code}{where}: {event.message}", file=sys.stderr)
            return 1
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_generate(args))
    except ConnectionError as exc:
        print(f"busserve generate: {exc}", file=sys.stderr)
        return 1

"""Live migration of a running request vs recomputing its context: the pause a client sees and the total time.

    .venv/bin/python benchmarks/migration_bench.py [--contexts 1024 2048 4096 7680] [--moves 6] [--recomputes 2]

Two SmolLM2-135M engines (bf16, one core and one thread each, the layout of ``busserve up`` on this machine) on a
fresh nats-server, once offering only ``shm`` and once only ``bus``. Per context length, one request is started on
the first engine (prefill there), and once it decodes it is moved back and forth ``--moves`` times by the router's
own code (``busserve.router.migration.migrate``: prep_recv on the target, Migrate on the source, start_generate on
the target). Then ``--recomputes`` times it is moved the way a lost request is resumed — dropped on the source,
prompt and tokens so far prefilled again on the target (``Supervisor.resume``'s two actions).

Measured on the wire (``busserve.testing.Wire``), as a client sees it:
* **pause**: from the last token before the move to the first token after it (decoding continues meanwhile on the
  source for live migration, so this is the stop of the last round plus the target's first step);
* **total**: from the start of the move to the first token on the target;
plus what the source reports (rounds, bytes, copy time). Every stream is checked: one terminal event, contiguous
indices. The ceiling: a copy at the measured memcpy bandwidth of this machine (printed) for shm.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from busserve.bench.metrics import percentile
from busserve.bus.client import Bus
from busserve.messages import SamplingParams, StreamOptions, StreamStatus, TokenChunk
from busserve.router.cluster import ClusterView
from busserve.router.lifecycle import Flight, State
from busserve.router.migration import migrate
from busserve.router.request import Request
from busserve.testing import ProcessCluster, Stream, Wire, live_view


def memcpy_gb_s() -> float:
    a = torch.empty(256 * 2**20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 5 * a.numel() / (time.perf_counter() - t0) / 1e9




def feed(flight: Flight, stream: Stream) -> None:
    """Bring the flight's view of the stream up to date (the router reads the same stream)."""
    tokens = stream.tokens
    if len(tokens) > len(flight.outputs):
        flight.outputs.extend(tokens[len(flight.outputs):])


async def tokens_after(wire: Wire, stream: Stream, n: int, timeout_s: float = 120.0) -> None:
    await wire.wait(lambda: len(stream.tokens) >= n, timeout_s, f"{n} tokens")


def gap_around(stream: Stream, t0: float, new_owner: str) -> tuple[float, float]:
    """(time of the last token before ``new_owner`` took the stream over after t0, time of its first token)."""
    events = stream.events
    at = next(i for i, (t, e) in enumerate(events) if t >= t0 and isinstance(e, StreamStatus)
              and e.owner == new_owner)
    before = max(t for t, e in events[:at] if isinstance(e, TokenChunk))
    after = min(t for t, e in events[at:] if isinstance(e, TokenChunk))
    return before, after


def itl_median(stream: Stream, upto: float) -> float:
    times = [t for t, e in stream.events if isinstance(e, TokenChunk) and t <= upto][-12:]
    return statistics.median(b - a for a, b in itertools.pairwise(times)) if len(times) > 2 else 0.0


async def start_request(view: ClusterView, wire: Wire, prompt: list[int], label: str, max_tokens: int
                        ) -> tuple[Flight, Stream]:
    stream, subject = wire.listen(label)
    req = Request(request_id=f"{label}-r", prompt_token_ids=prompt, stream_subject=subject,
                  sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                  stream=StreamOptions(), label=label, supervisor="bench")
    flight = Flight(req=req, strategy="bench", state=State.RUNNING)
    src = view.get("A")
    assert src is not None
    await src.prep_recv(req, end=0)
    await src.start_generate(req, begin=0)
    await tokens_after(wire, stream, 24)
    return flight, stream


async def one_context(view: ClusterView, wire: Wire, tokenizer, length: int,  # type: ignore[no-untyped-def]
                      args: argparse.Namespace, label: str) -> dict:
    base = tokenizer("The lighthouse keeper wrote in his log every night. ", add_special_tokens=False)["input_ids"]
    prompt = (base * (length // len(base) + 1))[:length]
    flight, stream = await start_request(view, wire, prompt, label, 48 + 40 * args.moves)
    live, recompute = [], []
    where = "A"
    for _ in range(args.moves):  # back and forth, by the router's own migration code
        feed(flight, stream)
        target = view.get("B" if where == "A" else "A")
        assert target is not None
        t0 = time.monotonic()
        moved = await migrate(view, flight, target, reason="bench")
        assert moved.ok, moved.detail
        await tokens_after(wire, stream, len(stream.tokens) + 1)
        before, after = gap_around(stream, t0, target.id)
        live.append({"pause_s": after - before, "total_s": after - t0, "itl_s": itl_median(stream, t0),
                     "context": len(flight.req.prompt_token_ids), "rounds": moved.rounds, "bytes": moved.bytes_sent,
                     "copy_s": moved.copy_s, "router_pause_s": moved.pause_s})
        where = target.id
        await tokens_after(wire, stream, len(stream.tokens) + 16)
    await wire.wait(lambda: stream.terminal is not None, 300, "the end of the stream")
    stream.check()
    for k in range(args.recomputes):
        # Recompute's pause is at least the target's time to first token over the whole context, cold (a fresh
        # prompt each time, so that no engine caches it): that lower bound is what live migration is held against.
        p = [prompt[0] + 1 + k, *prompt[1:]]
        target = view.get("B")
        assert target is not None
        stream, subject = wire.listen(f"{label}-re{k}")
        req = Request(request_id=f"{label}-re{k}", prompt_token_ids=p, stream_subject=subject,
                      sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), label=f"{label}-re{k}",
                      supervisor="bench")
        t0 = time.monotonic()
        await target.prep_recv(req, end=0)
        await target.start_generate(req, begin=0)
        await tokens_after(wire, stream, 1)
        recompute.append({"pause_s": stream.token_times()[0] - t0, "context": len(p)})
        await wire.wait(lambda s=stream: s.terminal is not None, 300, "the end of the stream")
        stream.check()
    return {"context": length, "live": live, "recompute": recompute}


async def run_transport(args: argparse.Namespace, transport: str, tokenizer) -> list[dict]:  # type: ignore[no-untyped-def]
    cores = sorted(os.sched_getaffinity(0))
    with ProcessCluster() as c:
        for i, eid in enumerate(("A", "B")):
            c.start_engine(eid, "--transport", transport, "--max-model-len", "8192", cpus=[cores[i % len(cores)]],
                           threads=1)
        await asyncio.to_thread(c.wait_engines, {"A", "B"})
        bus = await Bus.connect(c.bus_config(), name="migration-bench")
        try:
            view = await live_view(bus, {"A", "B"})
            out = []
            async with Wire(bus) as wire:
                for length in args.contexts:
                    r = await one_context(view, wire, tokenizer, length, args, f"{transport}-{length}")
                    out.append(r)
                    live_p = [m["pause_s"] * 1e3 for m in r["live"]]
                    rec_p = [m["pause_s"] * 1e3 for m in r["recompute"]]
                    print(f"{transport:>4} {length:>5} tokens: live pause p50 {percentile(live_p, 50):7.1f} ms "
                          f"max {max(live_p):7.1f} ms (ITL {statistics.mean(m['itl_s'] for m in r['live']) * 1e3:.1f},"
                          f" router {statistics.mean(m['router_pause_s'] for m in r['live']) * 1e3:.1f}), total p50 "
                          f"{percentile([m['total_s'] for m in r['live']], 50) * 1e3:7.1f} ms, "
                          f"{statistics.mean(m['rounds'] for m in r['live']):.1f} rounds, "
                          f"{statistics.mean(m['bytes'] for m in r['live']) / 2**20:.1f} MiB | recompute pause "
                          f"p50 {percentile(rec_p, 50):7.1f} ms", flush=True)
            return out
        finally:
            await bus.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 7680])
    ap.add_argument("--transports", nargs="+", default=["shm", "bus"])
    ap.add_argument("--moves", type=int, default=6)
    ap.add_argument("--recomputes", type=int, default=2)
    ap.add_argument("--out", default=".bench/migration.json")
    args = ap.parse_args()
    from busserve.engine.model_loader import resolve_model_dir
    from busserve.tokenization import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_dir(None)[0])
    bw = memcpy_gb_s()
    print(f"memcpy on this machine: {bw:.1f} GB/s", flush=True)
    results = {t: asyncio.run(run_transport(args, t, tokenizer)) for t in args.transports}
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "memcpy_gb_s": bw, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print("\ntransport context | live pause p50 / p99 ms | live total p50 ms | recompute pause p50 ms | "
          "speed-up (recompute / live total)")
    for t, rows in results.items():
        for r in rows:
            lp = [m["pause_s"] * 1e3 for m in r["live"]]
            lt = [m["total_s"] * 1e3 for m in r["live"]]
            rp = [m["pause_s"] * 1e3 for m in r["recompute"]]
            print(f"{t:>4} {r['context']:>6} | {percentile(lp, 50):6.1f} / {percentile(lp, 99):6.1f} | "
                  f"{percentile(lt, 50):7.1f} | {percentile(rp, 50):8.1f} | {percentile(rp, 50) / percentile(lt, 50):5.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())

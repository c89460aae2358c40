"""Issue #5 benchmark: what the router adds, at light load (one request at a time).

    .venv/bin/python benchmarks/router_bench.py [--n 60] [--prompt 64] [--out .bench/router.json]

* TTFT through the router (strategy ``pd``, and ``least_loaded``) minus TTFT of the same-size request sent straight
  to an engine — p50 and p99 over fresh prompts (so neither side hits a prefix cache). For ``pd`` also minus the same
  PD sequence driven by this client straight to the engines: that difference is the router alone (the rest is the
  PD pattern itself — the decode engine's extra forward pass for the last prompt token, and the KV transfer);
* the round trip of one sub-request on loopback (an ``abort`` of an unknown id: bus + engine compute-thread hop),
  beside a bare NATS request-reply echo for scale.
Two SmolLM2 engines (default dtype) and one router, all on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from busserve.bus.client import Bus
from busserve.messages import Abort, AbortReply, GenerateRequest, SamplingParams, SetStrategy, StrategyState, TokenChunk
from busserve.testing import ProcessCluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from busserve.testing import live_view


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def ttft(bus: Bus, prompt: list[int], subject: str | None) -> float:
    req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=1, temperature=0))
    t = time.perf_counter()
    async for ev in bus.generate(req, subject=subject, first_event_timeout_s=120):
        if isinstance(ev, TokenChunk):
            return time.perf_counter() - t
    raise RuntimeError("no token")


async def ttft_manual_pd(bus: Bus, view: Any, prompt: list[int]) -> float:
    """The same PD sequence the ``pd`` strategy runs, issued by this client straight to the engines."""
    from busserve.router.request import Request
    from busserve.router.strategies.common import disaggregate

    async with bus.open_stream() as stream:
        req = Request(request_id=f"manual-{time.monotonic_ns()}", prompt_token_ids=prompt, stream_subject=stream.subject,
                      sampling=SamplingParams(max_tokens=1, temperature=0))
        t = time.perf_counter()
        await disaggregate(req, view.get("P"), view.get("D"), end=len(prompt) - 1)
        async for ev in stream.events(first_event_timeout_s=120):
            if isinstance(ev, TokenChunk):
                return time.perf_counter() - t
    raise RuntimeError("no token")


async def run(cluster: ProcessCluster, n: int, plen: int) -> dict[str, Any]:
    bus = await Bus.connect(cluster.bus_config(), name="router-bench")
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    try:
        view = await live_view(bus, {"P", "D"})
        direct = bus.subjects.engine_action("D", "generate")
        for strat in ("pd", "least_loaded"):
            await bus.request(bus.subjects.control_strategy(), SetStrategy(name=strat), StrategyState, timeout_s=10)
            diffs, routed, straight, manual, vs_manual = [], [], [], [], []
            for i in range(n + 3):
                a, b, c = (torch.randint(100, 40000, (plen,), generator=g).tolist() for _ in range(3))
                t_direct = await ttft(bus, a, direct)
                t_router = await ttft(bus, b, None)
                t_manual = await ttft_manual_pd(bus, view, c) if strat == "pd" else t_direct
                if i >= 3:  # warm-up
                    straight.append(t_direct)
                    routed.append(t_router)
                    manual.append(t_manual)
                    diffs.append(t_router - t_direct)
                    vs_manual.append(t_router - t_manual)
            out[strat] = {"vs_direct_p50_ms": statistics.median(diffs) * 1e3, "vs_direct_p99_ms": pct(diffs, 99) * 1e3,
                          "router_only_p50_ms": statistics.median(vs_manual) * 1e3,
                          "router_only_p99_ms": pct(vs_manual, 99) * 1e3,
                          "ttft_router_p50_ms": statistics.median(routed) * 1e3,
                          "ttft_same_pattern_without_router_p50_ms": statistics.median(manual) * 1e3,
                          "ttft_direct_p50_ms": statistics.median(straight) * 1e3}
        rtts = []
        for i in range(500):
            t = time.perf_counter()
            await bus.request(bus.subjects.engine_action("D", "abort"), Abort(request_id=f"nobody-{i}"), AbortReply,
                              timeout_s=5)
            rtts.append(time.perf_counter() - t)

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await bus.nc.subscribe("bench.echo", cb=echo)
        echoes = []
        for _ in range(500):
            t = time.perf_counter()
            await bus.nc.request("bench.echo", b"x" * 64, timeout=5)
            echoes.append(time.perf_counter() - t)
        out["sub_request_rtt"] = {"p50_ms": statistics.median(rtts) * 1e3, "p99_ms": pct(rtts, 99) * 1e3}
        out["nats_echo_rtt"] = {"p50_ms": statistics.median(echoes) * 1e3, "p99_ms": pct(echoes, 99) * 1e3}
    finally:
        await bus.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--out", default=".bench/router.json")
    args = ap.parse_args()
    with ProcessCluster() as cluster:
        for eid in ("P", "D"):
            cluster.start_engine(eid, "--kv-memory", "256MiB", threads=1)
        cluster.start("router", "router", "--nats", cluster.url, "--id", "bench-router", "--strategy", "pd")
        cluster.wait_engines({"P", "D"})
        time.sleep(2)
        result = {"date": time.strftime("%Y-%m-%d"), "requests": args.n, "prompt_tokens": args.prompt,
                  **asyncio.run(run(cluster, args.n, args.prompt))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

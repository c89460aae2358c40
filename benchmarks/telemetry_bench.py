"""Issue #6 benchmark: throughput with tracing and metrics on vs off, same workload, alternating clusters.

    .venv/bin/python benchmarks/telemetry_bench.py [--rounds 2] [--out .bench/telemetry.json]

"On": every process exports spans over OTLP/HTTP to a receiver in another process (default batching), engines and
the router serve /metrics, and a scraper reads all of them every second. "Off": BUSSERVE_TELEMETRY=off. Workload:
16 requests × (128 prompt, 64 output tokens), concurrency 16, through the router (strategy pd, so every request
makes ~12 spans across three processes). Two SmolLM2 engines, one router.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from busserve.bus.client import Bus
from busserve.bus.embedded import free_port
from busserve.messages import Final, GenerateRequest, SamplingParams
from busserve.testing import ProcessCluster

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from busserve.testing import live_view  # noqa: E402


async def workload(bus: Bus, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, 40000, (128,), generator=g).tolist() for _ in range(16)]

    async def one(p: list[int]) -> None:
        req = GenerateRequest(prompt_token_ids=p, sampling=SamplingParams(max_tokens=64, temperature=0,
                                                                          ignore_eos=True))
        events = [e async for e in bus.generate(req, first_event_timeout_s=300)]
        assert isinstance(events[-1], Final), events[-1]

    t = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return 16 * 64 / (time.perf_counter() - t)


def one_round(on: bool, seed: int) -> list[float]:
    env: dict[str, str] = {"BUSSERVE_TELEMETRY": "on" if on else "off"}
    receiver = None
    urls: list[str] = []
    if on:
        receiver = subprocess.Popen([sys.executable, "-m", "tests.telemetry.otlp_receiver"], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        port = int(receiver.stdout.readline())  # type: ignore[union-attr]
        env |= {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
    stop = threading.Event()
    try:
        with ProcessCluster() as c:
            for eid in ("P", "D"):
                extra = ["--metrics-port", str(mp := free_port())] if on else []
                if on:
                    urls.append(f"http://127.0.0.1:{mp}/metrics")
                c.start_engine(eid, "--kv-memory", "512MiB", *extra, threads=1, env=env)
            http = free_port()
            c.start("router", "router", "--nats", c.url, "--id", "r", "--strategy", "pd",
                    *(["--http-port", str(http)] if on else []), env=env)
            if on:
                urls.append(f"http://127.0.0.1:{http}/metrics")
            c.wait_engines({"P", "D"})
            time.sleep(2)

            def scrape() -> None:
                while not stop.wait(1.0):
                    for u in urls:
                        with contextlib.suppress(OSError):
                            urllib.request.urlopen(u, timeout=5).read()

            threading.Thread(target=scrape, daemon=True).start()

            async def run() -> list[float]:
                bus = await Bus.connect(c.bus_config(), name="bench")
                try:
                    await live_view(bus, {"P", "D"})
                    await workload(bus, seed + 99)  # warm-up
                    return [await workload(bus, seed + i) for i in range(2)]
                finally:
                    await bus.close()

            return asyncio.run(run())
    finally:
        stop.set()
        if receiver is not None:
            receiver.terminate()
            receiver.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=".bench/telemetry.json")
    args = ap.parse_args()
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            runs[mode] += one_round(mode == "on", seed=r * 10)
            print(mode, runs[mode][-2:], file=sys.stderr, flush=True)
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "runs_tok_s": runs, "on_median_tok_s": on,
                              "off_median_tok_s": off, "change_percent": (on - off) / off * 100}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

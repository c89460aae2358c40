"""Issue #7: the microserving paper's experiment, scaled to this machine.

    .venv/bin/python benchmarks/paper_experiment.py [--workloads long,chat,mixed] [--out .bench/paper]

Two SmolLM2 engines, each pinned to its own core (one compute thread each), one router. Workloads, fixed before
any measurement: ``long`` — inputs N(1024, 256) tokens, outputs N(32, 8) (the paper's long-input experiment used
~3,000-token inputs; 1,024 keeps one prefill near a second on one core here); ``chat`` — inputs N(128, 32),
outputs N(128, 32); ``mixed`` — the two interleaved half and half. Poisson arrivals. Request rates are fractions
of the capacity measured at the start (``--load``), so the same script means the same thing on another machine.

Each (workload, rate) runs every strategy on the same requests, switching live; results go to
``<out>/<workload>_<rate>.json`` and ``.png`` (latency CDFs) and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from busserve.bench import datasets
from busserve.bench.main import bench_once, parse_strategy, set_strategy, strategy_label
from busserve.bench.plot import plot_cdfs
from busserve.bench.runner import LoadConfig, bus_sender, run_load
from busserve.bus.client import Bus
from busserve.testing import ProcessCluster

FIXED = ["least_loaded", "pd", "balanced_pd:f=0.1", "balanced_pd:f=0.2", "balanced_pd:f=0.3"]
WORKLOADS = {"long": datasets.long_input, "chat": datasets.chat, "mixed": datasets.mixed}


async def capacity(bus: Bus, make: Any, n: int = 12) -> float:
    """Requests per second the cluster completes when offered everything at once (data parallel)."""
    await set_strategy(bus, "least_loaded", {})
    samples = make(n, seed=999)
    records, duration = await run_load(samples, bus_sender(bus, 600), LoadConfig(max_concurrency=n))
    return sum(1 for r in records if r.ok) / duration


async def run(cluster: ProcessCluster, args: argparse.Namespace) -> list[str]:
    bus = await Bus.connect(cluster.bus_config(), name="paper")
    tables = []
    try:
        send = bus_sender(bus, 900)
        for workload in args.workloads.split(","):
            make = WORKLOADS[workload]
            cap = await capacity(bus, make)
            print(f"{workload}: capacity {cap:.3f} req/s", file=sys.stderr, flush=True)
            strategies = FIXED + (["adaptive"] if args.adaptive else [])
            for load in (float(x) for x in args.load.split(",")):
                rate = round(load * cap, 3)
                samples = make(args.num_prompts, seed=int(load * 100))
                runs = []
                for spec in strategies:
                    name, params = parse_strategy(spec)
                    state = await set_strategy(bus, name, params)
                    label = strategy_label(state.name, state.params)
                    runs.append(await bench_once(send, samples, LoadConfig(rate=rate, seed=7, timeout_s=900),
                                                 warmup=1, progress=False, label=label, slo=None))
                    print(f"  {workload} load {load} ({rate} req/s) {label}: JCT p99 "
                          f"{runs[-1]['summary']['e2e_s']['p99']:.2f}s", file=sys.stderr, flush=True)
                stem = Path(args.out) / f"{workload}_{round(load * 100)}"  # long_40.json: no dot for with_suffix to eat
                stem.parent.mkdir(parents=True, exist_ok=True)
                stem.with_suffix(".json").write_text(json.dumps(
                    {"workload": workload, "load": load, "rate": rate, "capacity": cap, "runs": runs}))
                plot_cdfs(runs, stem.with_suffix(".png"), f"{workload}: {rate} req/s ({load:.0%} of capacity)")
                tables.append(f"### {workload}, {rate} req/s ({load:.0%} of measured capacity {cap:.2f} req/s)\n\n"
                              + markdown(runs))
    finally:
        await bus.close()
    return tables


def markdown(runs: list[dict[str, Any]]) -> str:
    base = next((r for r in runs if r["label"] == "least_loaded"), runs[0])["summary"]
    lines = ["| strategy | JCT mean (s) | JCT p50 | JCT p99 | vs DP mean | vs DP p99 | TTFT p50 (s) | TPOT p50 (ms) "
             "| output tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        e = s["e2e_s"]
        lines.append(f"| {r['label']} | {e['mean']:.2f} | {e['p50']:.2f} | {e['p99']:.2f} | "
                     f"{(e['mean'] / base['e2e_s']['mean'] - 1) * 100:+.0f}% | "
                     f"{(e['p99'] / base['e2e_s']['p99'] - 1) * 100:+.0f}% | {s['ttft_s']['p50']:.2f} | "
                     f"{s['tpot_s']['p50'] * 1e3:.0f} | {s['output_throughput']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="long,chat")
    ap.add_argument("--load", default="0.4,0.6,0.8", help="request rates as fractions of measured capacity")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--adaptive", action="store_true", help="also run the adaptive strategy")
    ap.add_argument("--out", default=".bench/paper")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    with ProcessCluster() as cluster:
        for i, eid in enumerate(("E0", "E1")):
            cluster.start_engine(eid, "--kv-memory", "1GiB", cpus=[cores[i % len(cores)]])
        cluster.start("router", "router", "--nats", cluster.url, "--id", "paper-router")
        cluster.wait_engines({"E0", "E1"})
        time.sleep(2)
        tables = asyncio.run(run(cluster, args))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

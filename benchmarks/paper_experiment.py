"""The microserving paper's experiment, scaled to this machine.

    .venv/bin/python benchmarks/paper_experiment.py [--workloads long,chat,mixed] [--out .bench/paper]

Two SmolLM2 engines (``--engines N`` for more), each pinned to a core (one compute thread each), one router.
Workloads, fixed before any measurement: ``long`` — inputs N(1024, 256) tokens, outputs N(32, 8) (the paper's long-input experiment used
~3,000-token inputs; 1,024 keeps one prefill near a second on one core here); ``chat`` — inputs N(128, 32),
outputs N(128, 32); ``mixed`` — the two interleaved half and half; ``longer`` — N(2048, 512) in, N(128, 32)
out (held out for ``adaptive``, docs/STRATEGIES.md). Poisson arrivals. Request rates are fractions
of the capacity measured at the start (``--load``), so the same script means the same thing on another machine.

Each (workload, rate) runs every strategy on the same requests (same lengths, same arrival times), switching live;
each run's prompts get their own 2-token head (``datasets.salted``) so that no strategy is served from the prefix
cache an earlier run filled. Results go to
``<out>/<workload>_<rate>.json`` and ``.png`` (latency CDFs) and a Markdown table to stdout.

``--strategy`` runs only the strategies named and merges them into the stored results at the stored rates (a label
measured before comes back as "(again)", or replaces the stored run with ``--replace LABEL``); ``--capacity-from
DIR`` reuses another run's capacities, for longer runs (``--num-prompts``) at the same request rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from busserve.bench import datasets
from busserve.bench.main import bench_once, parse_strategy, strategy_label
from busserve.bench.plot import plot_cdfs
from busserve.bench.runner import LoadConfig, bus_sender, run_load
from busserve.bus.client import Bus
from busserve.errors import BusserveError
from busserve.messages import RolesState, SetRoles
from busserve.router.control import set_strategy
from busserve.testing import ProcessCluster

FIXED = ["least_loaded", "pd", "balanced_pd:f=0.1", "balanced_pd:f=0.2", "balanced_pd:f=0.3"]


def longer(n: int, seed: int = 0) -> list[datasets.Sample]:
    """A held-out workload for ``adaptive`` (docs/STRATEGIES.md): longer prompts and longer answers."""
    return datasets.synthetic(n, "normal:2048,512", "normal:128,32", seed, kind="longer")


WORKLOADS = {"long": datasets.long_input, "chat": datasets.chat, "mixed": datasets.mixed, "longer": longer}
ENGINES: list[str] = ["E0", "E1"]  # --engines N: E0 … E(N-1), engine i on core i mod the cores there are


def roles_for(strategy: str) -> list[list[str]]:
    """As in the paper, PD means prefill engines and decode engines (E0 prefills, the rest decode); data parallel and
    adaptive get engines that do both (adaptive decides per request which does what)."""
    if strategy in ("pd", "balanced_pd"):
        return [["prefill"]] + [["decode"]] * (len(ENGINES) - 1)
    return [["prefill", "decode"]] * len(ENGINES)


async def capacity(bus: Bus, make: Any, n: int = 12) -> float:
    """Requests per second the cluster completes when offered everything at once (data parallel)."""
    await set_roles(bus, roles_for("least_loaded"))
    await set_strategy(bus, "least_loaded", {})
    samples = make(n, seed=999)
    records, duration = await run_load(samples, bus_sender(bus, 600), LoadConfig(max_concurrency=n))
    return sum(1 for r in records if r.ok) / duration


async def set_roles(bus: Bus, roles: list[list[str]]) -> None:
    for eid, r in zip(ENGINES, roles, strict=True):
        await bus.request(bus.subjects.engine_action(eid, "set_roles"), SetRoles(engine_id=eid, roles=r),  # type: ignore[arg-type]
                          RolesState, timeout_s=10)
    await asyncio.sleep(2.5)  # two heartbeats: the router's cluster view now has the new roles


async def run(cluster: ProcessCluster, args: argparse.Namespace) -> list[str]:
    bus = await Bus.connect(cluster.bus_config(), name="paper")
    tables = []
    strategies = args.strategy or FIXED + (["adaptive"] if args.adaptive else [])
    try:
        send = bus_sender(bus, 900)
        for workload in args.workloads.split(","):
            make = WORKLOADS[workload]
            earlier = {load: _load_json(args.out, workload, load) for load in _loads(args)}
            # Added runs (--strategy) reuse the stored rates, so they see exactly the earlier runs' workload.
            cap = (next((e["capacity"] for e in earlier.values() if e), None) or _stored_capacity(args, workload)
                   or await capacity(bus, make))
            print(f"{workload}: capacity {cap:.3f} req/s", file=sys.stderr, flush=True)
            for load in _loads(args):
                rate = earlier[load]["rate"] if earlier[load] else round(load * cap, 3)
                samples = make(args.num_prompts, seed=int(load * 100))
                runs = list((earlier[load] or {}).get("runs", []))
                stored = {r["label"] for r in runs}
                for spec in strategies:
                    name, params = parse_strategy(spec)
                    await set_roles(bus, roles_for(name))
                    state = await set_strategy(bus, name, params)
                    base = label = strategy_label(state.name, state.params)
                    if args.strategy and label in stored and label not in args.replace:
                        # Measured again (beside newly added strategies, or repeated in one invocation): kept next
                        # to the earlier runs, whose difference from it is the drift between them.
                        n, label = 1, f"{base} (again)"
                        while label in stored:
                            n += 1
                            label = f"{base} (again {n})"
                    # The salt names the run, so a repeat in the same invocation finds nothing cached either.
                    salt = f"{workload}:{load}:{spec}" if label == base else f"{workload}:{load}:{label}"
                    run_ = await bench_once(send, samples, LoadConfig(rate=rate, seed=7, timeout_s=900), warmup=1,
                                            progress=False, label=label, slo=None, salt=salt)
                    runs = [r for r in runs if r["label"] != label] + [run_]
                    stored.add(label)
                    print(f"  {workload} load {load} ({rate} req/s) {label}: JCT p99 "
                          f"{run_['summary']['e2e_s']['p99']:.2f}s", file=sys.stderr, flush=True)
                stem = _stem(args.out, workload, load)
                stem.parent.mkdir(parents=True, exist_ok=True)
                stem.with_suffix(".json").write_text(json.dumps(
                    {"workload": workload, "load": load, "rate": rate, "capacity": cap, "runs": runs}))
                plot_cdfs(runs, stem.with_suffix(".png"), f"{workload}: {rate} req/s ({load:.0%} of capacity)")
                tables.append(table(workload, load, rate, cap, runs))
    finally:
        with contextlib.suppress(BusserveError):  # best effort: the engines may be gone already
            await set_roles(bus, roles_for("least_loaded"))
        await bus.close()
    return tables


def _loads(args: argparse.Namespace) -> list[float]:
    return [float(x) for x in args.load.split(",")]


def _stored_capacity(args: argparse.Namespace, workload: str) -> float | None:
    """The capacity an earlier experiment measured for this workload (``--capacity-from``), so that a longer or
    repeated run offers the same request rates."""
    if not args.capacity_from:
        return None
    return next((float(json.loads(p.read_text())["capacity"])
                 for p in sorted(Path(args.capacity_from).glob(f"{workload}_*.json"))), None)


def _stem(out: str, workload: str, load: float) -> Path:
    return Path(out) / f"{workload}_{round(load * 100)}"  # long_40.json: no dot for with_suffix to eat


def _load_json(out: str, workload: str, load: float) -> dict[str, Any] | None:
    path = _stem(out, workload, load).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else None


def markdown(runs: list[dict[str, Any]]) -> str:
    base = next((r for r in runs if r["label"] == "least_loaded"), runs[0])["summary"]
    lines = ["| strategy | JCT mean (s) | JCT p50 | JCT p99 | vs DP mean | vs DP p99 | TTFT p50 / p99 (s) "
             "| TPOT p50 / p99 (ms) | output tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        e, t, o = s["e2e_s"], s["ttft_s"], s["tpot_s"]
        lines.append(f"| {r['label']} | {e['mean']:.2f} | {e['p50']:.2f} | {e['p99']:.2f} | "
                     f"{(e['mean'] / base['e2e_s']['mean'] - 1) * 100:+.0f}% | "
                     f"{(e['p99'] / base['e2e_s']['p99'] - 1) * 100:+.0f}% | {t['p50']:.2f} / {t['p99']:.2f} | "
                     f"{o['p50'] * 1e3:.0f} / {o['p99'] * 1e3:.0f} | {s['output_throughput']:.1f} |")
    return "\n".join(lines)


def table(workload: str, load: float, rate: float, cap: float, runs: list[dict[str, Any]]) -> str:
    return f"### {workload}, {rate} req/s ({load:.0%} of measured capacity {cap:.2f} req/s)\n\n" + markdown(runs)


def report(args: argparse.Namespace) -> list[str]:
    """The tables of stored results, without running anything."""
    tables = []
    for workload in args.workloads.split(","):
        for load in _loads(args):
            d = _load_json(args.out, workload, load)
            if d:
                tables.append(table(workload, load, d["rate"], d["capacity"], d["runs"]))
    return tables


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="long,chat")
    ap.add_argument("--load", default="0.4,0.6,0.8", help="request rates as fractions of measured capacity")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--adaptive", action="store_true", help="also run the adaptive strategy")
    ap.add_argument("--strategy", action="append", default=[], metavar="NAME[:k=v,...]",
                    help="run only these (repeat the flag) and merge them into the stored results of the same "
                         "workloads and rates")
    ap.add_argument("--replace", action="append", default=[], metavar="LABEL",
                    help="with --strategy: this label's stored run is replaced (its code changed), not kept beside "
                         "the new one as '(again)'")
    ap.add_argument("--capacity-from", metavar="DIR", help="take each workload's capacity from results stored in "
                    "DIR instead of measuring it")
    ap.add_argument("--out", default=".bench/paper")
    ap.add_argument("--engines", type=int, default=2, help="engines in the cluster (engine i on core i mod cores)")
    ap.add_argument("--serve", action="append", default=[], metavar="MODULE:FN=NAME",
                    help="also run this strategy in its own process under NAME (then --strategy NAME)")
    ap.add_argument("--report", action="store_true", help="print the tables of stored results and exit")
    ap.add_argument("--router-log-level", default="INFO",
                    help="DEBUG: the router logs every adaptive decision (to this script's stderr)")
    args = ap.parse_args()
    if args.report:
        print("\n\n".join(report(args)))
        return 0
    # SIGTERM exits through the ProcessCluster's clean-up, so no engine or router outlives the experiment.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cores = sorted(os.sched_getaffinity(0))
    ENGINES[:] = [f"E{i}" for i in range(args.engines)]
    with ProcessCluster() as cluster:
        for i, eid in enumerate(ENGINES):
            cluster.start_engine(eid, "--kv-memory", "1GiB", cpus=[cores[i % len(cores)]])
        cluster.start("router", "--log-level", args.router_log_level, "router", "--nats", cluster.url,
                      "--id", "paper-router")
        for i, serve in enumerate(args.serve):  # strategies in their own processes, e.g. one under development
            spec, _, name = serve.rpartition("=")
            cluster.start(f"strategy-{i}", "strategy", "serve", spec, "--name", name, "--nats", cluster.url)
        cluster.wait_engines(set(ENGINES))
        time.sleep(8 if args.serve else 2)  # a strategy process answers the router's check once it has started
        tables = asyncio.run(run(cluster, args))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""busserve at cluster scale, simulated: 64 engines, 8 routers, the paper's workloads — does the router scale, where
does the KV-event fan-out or the bus saturate, and what does each strategy give.

    .venv/bin/python benchmarks/cluster_sim.py                       # calibrate here, then the tables
    .venv/bin/python benchmarks/cluster_sim.py --engines 64 --routers 8 --workload long --load 0.6,0.8

A discrete-event model (it grows ``benchmarks/strategy_model.py``: the same engine step rule and cost model) with
the parts that only appear at scale, each **calibrated on this machine at start** (``--calibration FILE`` reuses a
saved one):

* **engines**: the scheduler's step rule timed by ``strategy_model.CostModel`` (fitted to
  ``decode_step_profile.py --mixed`` on one core: SmolLM2-135M, bf16); one core per engine;
* **routers**: each a single server (one event loop) in front of which requests queue. A request costs the real
  routing decision — ``ClusterView.engines()`` plus the strategy's scoring over N engines, measured here at several
  N and fitted as ``a + b·N`` — and each engine's heartbeat and KV-event batch costs every router its real
  ``on_status`` / ``on_kv_events`` (decoding included), measured here per message and per page;
* **what a router knows**: an engine's load as of its last heartbeat (every ``--heartbeat-s``, random phase), or the
  router's own count of what it sent there if larger — exactly ``Engine.load``; ties broken as
  ``cluster.least_loaded`` breaks them (most free KV, then id). Eight routers therefore decide on stale, different
  views, which is what the model is for;
* **the bus**: every message's one-way latency is half a measured request-reply round trip through a local
  nats-server; the load on the bus — token events, sub-requests, heartbeats and KV events delivered to every
  router, KV bytes when they go by ``bus`` — is counted and set against one nats-server's measured delivery rate
  (messages/s and bytes/s, one publisher → one subscriber);
* **KV transfer** (disaggregated strategies): the prompt's KV (bytes per token from the model's shape) at the
  measured cross-host rate of the chosen transport (``--kv-gb-s``, default ``mooncake`` from
  ``cross_host_transfer_bench.py``), plus two sub-request hops.

Not modelled (assumptions, stated with the results): engines' own bus I/O time (it runs on the engine's event loop
thread beside the compute thread); nats-server CPU shared with engines (a real deployment gives it its own cores);
cluster routes between NATS nodes (one server's rate is taken as the bus's); prefix caching (the paper's workloads
share no prefixes); failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from strategy_model import CostModel, Loop, ModelEngine, Seq, workload_lengths  # noqa: E402

from busserve.bench.metrics import percentile  # noqa: E402
from busserve.engine.scheduler import SchedulerConfig  # noqa: E402
from busserve.router.cluster import least_loaded  # noqa: E402

PAGE = 16
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # SmolLM2-135M: K and V, 30 layers, 3 KV heads of 64, bf16 (23,040 B)


# ------------------------------------------------------------------ calibration (real code, this machine)


@dataclass
class Calibration:
    route_base_us: float  # a routing decision: a + b·engines
    route_per_engine_us: float
    status_us: float  # one heartbeat decoded and applied, per router
    kv_batch_us: float  # one KV-event batch decoded and applied: base + per page
    kv_page_us: float
    nats_one_way_ms: float
    nats_msgs_per_s: float  # one Python publisher and subscriber (nats-py, one process): a client's rate
    nats_bytes_per_s: float
    machine: str = ""
    date: str = ""


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    for _ in range(min(50, n)):
        fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def calibrate_router() -> tuple[dict[str, float], dict[int, float]]:
    """The router's own code on hand-fed views: a least-loaded decision over N engines, a heartbeat, a KV batch."""
    from busserve.bus.codec import decode, encode
    from busserve.messages import EngineStatus, KVEventBatch, KVRemoved, KVStored
    from busserve.router.cluster import ClusterView, least_loaded

    def status(i: int, seq: int) -> EngineStatus:
        return EngineStatus(engine_id=f"e{i:03d}", model="m", roles=["prefill", "decode"], running=i % 7, waiting=0,
                            parked=0, free_pages=40_000, total_pages=50_000, page_size=PAGE, max_model_len=8192,
                            transports=["bus"], host=f"h{i}", pid=1, seq=seq, interval_s=3600.0)

    sizes, costs = [2, 8, 32, 64, 128], []
    for n in sizes:
        view = ClusterView(bus=None)  # type: ignore[arg-type]  # fed by hand, as from the bus
        for i in range(n):
            view.on_status(status(i, 1))
            view.on_kv_events(KVEventBatch(engine_id=f"e{i:03d}", seq=1, events=[]))
        costs.append(_per_call_us(lambda v=view: least_loaded(v.engines(role="decode")), 2000))
    # Least squares a + b·n.
    mn, mc = statistics.fmean(sizes), statistics.fmean(costs)
    b = sum((x - mn) * (y - mc) for x, y in zip(sizes, costs, strict=True)) / sum((x - mn) ** 2 for x in sizes)
    a = mc - b * mn
    view = ClusterView(bus=None)  # type: ignore[arg-type]
    view.on_status(status(0, 1))
    wire = iter([encode(status(0, k)) for k in range(2, 7000)])  # each newer than the last, as heartbeats are
    status_us = _per_call_us(lambda: view.on_status(decode(next(wire), EngineStatus)), 5000)
    kv_seq = iter(range(1, 10**9))
    rng = random.Random(1)

    def kv_batch(pages: int) -> Callable[[], None]:
        def apply() -> None:
            k = next(kv_seq)
            hashes = [rng.getrandbits(63) for _ in range(pages)]
            data = encode(KVEventBatch(engine_id="e000", seq=k, events=[KVStored(page_hashes=hashes)]))
            view.on_kv_events(decode(data, KVEventBatch))
            # keep the engine's set bounded, as an engine's evictions do
            view.on_kv_events(KVEventBatch(engine_id="e000", seq=next(kv_seq), events=[KVRemoved(page_hashes=hashes)]))
        return apply

    one = _per_call_us(kv_batch(1), 3000) / 2
    many = _per_call_us(kv_batch(64), 1000) / 2
    per_page = max(0.0, (many - one) / 63)
    return ({"route_base_us": max(0.0, a), "route_per_engine_us": b, "status_us": status_us,
             "kv_batch_us": max(0.0, one - per_page), "kv_page_us": per_page}, dict(zip(sizes, costs, strict=True)))


async def calibrate_nats(messages: int = 20000) -> dict[str, float]:
    """A local nats-server: request-reply round trip (median of 500), and one publisher's delivery rate to one
    subscriber for 200-byte messages (token events' size) and 1 MiB ones (bulk KV)."""
    import socket
    import subprocess
    import tempfile

    import nats

    from busserve.bus.embedded import nats_server_binary

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "n.conf"
        conf.write_text(f'listen: "127.0.0.1:{port}"\nmax_payload: 8MB\nmax_pending: 256MB\n')
        server = subprocess.Popen([str(nats_server_binary()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            async def quiet(_: Exception) -> None:  # refusals until the server listens are expected
                return None

            for _ in range(100):
                try:
                    nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1, error_cb=quiet,
                                            allow_reconnect=False)
                    break
                except Exception:  # not up yet
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("nats-server did not start")
            sub_nc = await nats.connect(f"nats://127.0.0.1:{port}")

            async def echo(msg: Any) -> None:
                await msg.respond(msg.data)

            await sub_nc.subscribe("rr", cb=echo)
            await sub_nc.flush()
            rtts = []
            for _ in range(500):
                t0 = time.perf_counter()
                await nc.request("rr", b"x" * 200, timeout=5)
                rtts.append(time.perf_counter() - t0)

            async def rate(size: int, count: int) -> tuple[float, float]:
                got = 0
                done = asyncio.Event()

                async def sink(msg: Any) -> None:
                    nonlocal got
                    got += 1
                    if got == count:
                        done.set()

                sub = await sub_nc.subscribe(f"flood.{size}", cb=sink, pending_msgs_limit=count + 10,
                                             pending_bytes_limit=(count + 10) * (size + 200))
                await sub_nc.flush()
                payload = b"x" * size
                t0 = time.perf_counter()
                for k in range(count):
                    await nc.publish(f"flood.{size}", payload)
                    if k % 512 == 511 or size > 65536:  # bounded in flight: a slow consumer is cut off, not timed
                        await nc.flush()
                await nc.flush()
                await asyncio.wait_for(done.wait(), 60)
                took = time.perf_counter() - t0
                await sub.unsubscribe()
                return count / took, count * size / took

            msgs_per_s, _ = await rate(200, messages)
            _, bytes_per_s = await rate(1 << 20, 200)
            await nc.close()
            await sub_nc.close()
        finally:
            server.terminate()
            server.wait(timeout=10)
    return {"nats_one_way_ms": statistics.median(rtts) / 2 * 1e3, "nats_msgs_per_s": msgs_per_s,
            "nats_bytes_per_s": bytes_per_s}


def calibrate() -> Calibration:
    import platform

    router, points = calibrate_router()
    bus = asyncio.run(calibrate_nats())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    cal = Calibration(**router, **bus, machine=cpu, date=time.strftime("%Y-%m-%d %H:%M"))
    print("calibrated: routing decision " + ", ".join(f"{n} engines {us:.0f} µs" for n, us in points.items())
          + f" (fit {cal.route_base_us:.0f} + {cal.route_per_engine_us:.2f}·N µs); heartbeat {cal.status_us:.1f} µs; "
          f"KV batch {cal.kv_batch_us:.1f} µs + {cal.kv_page_us:.2f} µs/page; NATS one-way "
          f"{cal.nats_one_way_ms:.3f} ms, {cal.nats_msgs_per_s:,.0f} msg/s (200 B), "
          f"{cal.nats_bytes_per_s / 1e9:.2f} GB/s (1 MiB)", flush=True)
    return cal


# ------------------------------------------------------------------ the cluster


@dataclass
class BusLoad:
    """Messages and bytes delivered by the bus, by kind."""

    msgs: dict[str, float] = field(default_factory=dict)
    bytes: float = 0.0

    def add(self, kind: str, n: float = 1, nbytes: float = 0.0) -> None:
        self.msgs[kind] = self.msgs.get(kind, 0.0) + n
        self.bytes += nbytes


class SimEngine(ModelEngine):
    """An engine that also tells every router about its KV (one batch per step that completed pages) and
    heartbeats."""

    def __init__(self, *a: Any, cluster: Cluster, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.cluster = cluster
        self.roles = {"prefill", "decode"}
        self.busy_s = 0.0
        self.cost = _Timed(self.cost, self)  # type: ignore[assignment]

    def _done(self, decode: list[Seq], chunks: list[tuple[Seq, int]]) -> None:
        pages = sum(1 for s in decode if (s.prompt_len + s.generated + 1) % PAGE == 0)
        pages += sum((s.computed + n) // PAGE - s.computed // PAGE for s, n in chunks)
        if pages:
            self.cluster.kv_event(pages)
        for s in decode:
            self.cluster.token(s)
        super()._done(decode, chunks)


class _Timed:
    """An engine's cost model that also adds each step's time to the engine's busy time."""

    def __init__(self, cost: CostModel, engine: SimEngine) -> None:
        self.cost, self.engine = cost, engine

    def step_s(self, decode_contexts: list[int], prompt_tokens: int) -> float:
        took = self.cost.step_s(decode_contexts, prompt_tokens)
        self.engine.busy_s += took
        return took


@dataclass
class Snapshot:
    requests: int = 0
    free_kv: float = 1.0


class SimRouter:
    """One router: a single event loop. Its work — decisions, heartbeats, KV batches — queues in arrival order."""

    def __init__(self, rid: int, cluster: Cluster) -> None:
        self.id, self.cluster = rid, cluster
        self.busy_until = 0.0
        self.busy_s = 0.0
        self.seen: dict[str, Snapshot] = {}
        self.mine: dict[str, int] = {}  # requests this router sent to each engine, not yet finished
        self.waits: list[float] = []

    def work(self, cost_s: float) -> float:
        """Queue ``cost_s`` of work arriving now; returns when it is done."""
        now = self.cluster.loop.now
        start = max(now, self.busy_until)
        self.busy_until = start + cost_s
        self.busy_s += cost_s
        return self.busy_until

    def load(self, e: SimEngine) -> int:
        return max(self.seen.get(e.id, Snapshot()).requests, self.mine.get(e.id, 0))

    def least_loaded(self, engines: list[SimEngine], exclude: SimEngine | None = None) -> SimEngine:
        """The router's own rule (``busserve.router.cluster.least_loaded``) on what this router knows."""
        views = {e.id: _Seen(e.id, self.load(e), self.seen.get(e.id, Snapshot()).free_kv) for e in engines}
        routers = len(self.cluster.routers) if self.cluster.sampling else 1
        skip = [views[exclude.id]] if exclude is not None and exclude.id in views else []
        pick = least_loaded(list(views.values()), skip, routers=routers, rng=self.cluster.rng)  # type: ignore[arg-type]
        assert pick is not None
        return self.cluster.by_id[pick.id]


@dataclass
class _Seen:
    """An engine as a router's rule reads it."""

    id: str
    load: int
    free_kv_fraction: float


class Cluster:
    def __init__(self, engines: int, routers: int, cal: Calibration, cost: CostModel, kv_gb_s: float,
                 heartbeat_s: float, prefill_engines: int, rng: random.Random, sampling: bool = True) -> None:
        self.loop = Loop()
        self.sampling = sampling  # False: every router takes the exact least-loaded engine (busserve before 12-03)
        self.cal, self.kv_gb_s, self.heartbeat_s, self.rng = cal, kv_gb_s, heartbeat_s, rng
        self.engines = [SimEngine(f"e{i:03d}", self.loop, cost, SchedulerConfig.max_batch_tokens, cluster=self)
                        for i in range(engines)]
        for i, e in enumerate(self.engines):  # disaggregated strategies: the first ones prefill, the rest decode
            if prefill_engines:
                e.roles = {"prefill"} if i < prefill_engines else {"decode"}
        self.by_id = {e.id: e for e in self.engines}
        self.routers = [SimRouter(i, self) for i in range(routers)]
        self.bus = BusLoad()
        self.one_way = cal.nats_one_way_ms / 1000
        # What nats-py costs a router per message received: the measured client rate's inverse (publish and
        # delivery in one process, so an upper bound).
        self.recv_us = 1e6 / cal.nats_msgs_per_s
        self.owner: dict[int, tuple[SimRouter, SimEngine]] = {}

    # -------------------------------------------------------------- bus traffic

    def token(self, s: Seq) -> None:
        self.bus.add("token events", 1, 200)

    def kv_event(self, pages: int) -> None:
        cost = (self.recv_us + self.cal.kv_batch_us + self.cal.kv_page_us * pages) / 1e6
        self.bus.add("KV events (to every router)", len(self.routers), len(self.routers) * (60 + 8 * pages))
        for r in self.routers:
            self.loop.at(self.loop.now + self.one_way, lambda r=r: r.work(cost))  # type: ignore[misc]

    def heartbeat(self, e: SimEngine) -> None:
        snap = Snapshot(e.requests, 1.0 - sum(s.prompt_len + s.generated for s in e.running) / 400_000)
        self.bus.add("heartbeats (to every router)", len(self.routers), len(self.routers) * 300)

        def land(r: SimRouter) -> None:
            r.seen[e.id] = snap
            r.work((self.recv_us + self.cal.status_us) / 1e6)
        for r in self.routers:
            self.loop.at(self.loop.now + self.one_way, lambda r=r: land(r))  # type: ignore[misc]
        self.loop.at(self.loop.now + self.heartbeat_s, lambda: self.heartbeat(e))

    # -------------------------------------------------------------- requests

    def route_cost_s(self) -> float:
        return (self.cal.route_base_us + self.cal.route_per_engine_us * len(self.engines)) / 1e6

    def arrive(self, rid: int, prompt_len: int, out_len: int, strategy: str) -> None:
        router = self.rng.choice(self.routers)  # clients' requests spread over routers (a queue group)
        t = self.loop.now
        self.bus.add("requests", 1, 300)
        done = router.work(self.route_cost_s())
        router.waits.append(done - t)
        self.loop.at(done, lambda: self.dispatch(router, rid, t, prompt_len, out_len, strategy))

    def dispatch(self, router: SimRouter, rid: int, t: float, prompt_len: int, out_len: int, strategy: str) -> None:
        if strategy == "least_loaded":
            decode = router.least_loaded([e for e in self.engines if "decode" in e.roles])
            prefill = decode
        else:  # pd: the least loaded prefill engine, the least loaded decode engine
            prefill = router.least_loaded([e for e in self.engines if "prefill" in e.roles])
            decode = router.least_loaded([e for e in self.engines if "decode" in e.roles], exclude=prefill)
        for e in {prefill, decode}:
            router.mine[e.id] = router.mine.get(e.id, 0) + 1
        self.owner[rid] = (router, decode)
        seq = Seq(rid, t, prompt_len, out_len, target=prompt_len)
        if prefill is decode:
            self.bus.add("sub-requests", 2, 600)
            self.loop.at(self.loop.now + self.one_way, lambda: decode.add(seq))
            return
        end = prompt_len - 1
        self.bus.add("sub-requests", 6, 1800)  # prep_recv, remote_send, start_generate and their replies

        def handoff(now: float) -> None:
            nbytes = end * KV_BYTES_PER_TOKEN
            if self.kv_gb_s <= 0:  # KV by the bus
                self.bus.add("KV data (bus)", math.ceil(nbytes / (1 << 20)), nbytes)
                hop = nbytes / self.cal.nats_bytes_per_s
            else:
                hop = nbytes / (self.kv_gb_s * 1e9)
            router.mine[prefill.id] -= 1
            rest = Seq(rid, t, prompt_len, out_len, target=prompt_len, computed=end)
            self.loop.at(now + hop + 2 * self.one_way, lambda: decode.add(rest, first=True))

        self.loop.at(self.loop.now + 3 * self.one_way,  # prep_recv answered, then remote_send reaches P
                     lambda: prefill.add(Seq(rid, t, prompt_len, out_len, target=end, decodes_here=False,
                                             handoff=handoff)))

    def finished(self, s: Seq) -> None:
        router, decode = self.owner.pop(s.request_id)
        router.mine[decode.id] -= 1
        self.bus.add("final events", 1, 300)


@dataclass
class Result:
    strategy: str
    rate: float
    finished: int
    jct_mean: float
    jct_p99: float
    ttft_p99: float
    router_busy_max: float  # busiest router's share of its one core
    route_wait_p99_ms: float
    bus_msgs_per_s: float
    bus_share: float  # of one nats-server's measured delivery rate
    kv_fanout_share: float  # of all bus messages
    imbalance: float  # requests served by the busiest decode engine over the mean
    engine_busy: float  # engines' mean busy share (prefill engines and decode engines, for pd)


def simulate(strategy: str, rate: float, requests: int, seed: int, engines: int, routers: int, cal: Calibration,
             cost: CostModel, kv_gb_s: float, heartbeat_s: float, workload: str, prefill_engines: int,
             sampling: bool = True) -> Result:
    return run(strategy, rate, requests, seed, engines, routers, cal, cost, kv_gb_s, heartbeat_s, workload,
               prefill_engines, sampling)[0]


def run(strategy: str, rate: float, requests: int, seed: int, engines: int, routers: int, cal: Calibration,
        cost: CostModel, kv_gb_s: float, heartbeat_s: float, workload: str, prefill_engines: int,
        sampling: bool = True) -> tuple[Result, Cluster]:
    """One simulated run: its summary, and the cluster as it ended (for its counters)."""
    rng = random.Random(seed)
    c = Cluster(engines, routers, cal, cost, kv_gb_s, heartbeat_s, prefill_engines if strategy == "pd" else 0, rng,
                sampling)
    served: dict[str, int] = {}
    c.loop.finished = _Finished(c, served)
    for e in c.engines:
        c.loop.at(rng.random() * heartbeat_s, lambda e=e: c.heartbeat(e))  # type: ignore[misc]
    lengths = workload_lengths(workload, rng)
    t = 0.0
    for rid in range(requests):
        t += rng.expovariate(rate)
        p, o = lengths()
        c.loop.at(t, lambda r=rid, p=p, o=o: c.arrive(r, p, o, strategy))  # type: ignore[misc]
    c.loop.run(until=lambda: len(c.loop.finished) >= requests)  # heartbeats never stop by themselves
    done = c.loop.finished
    jcts = [end - s.arrival for s, end in done]
    ttfts = [s.first_token_at - s.arrival for s, _ in done]
    span = max(end for _, end in done)
    msgs = sum(c.bus.msgs.values())
    fanout = sum(v for k, v in c.bus.msgs.items() if "every router" in k)
    loads = [served.get(e.id, 0) for e in c.engines if "decode" in e.roles]
    return Result(strategy, rate, len(done), statistics.fmean(jcts), percentile(jcts, 99), percentile(ttfts, 99),
                  max(r.busy_s for r in c.routers) / span,
                  percentile([w for r in c.routers for w in r.waits], 99) * 1e3, msgs / span,
                  max(msgs / span / cal.nats_msgs_per_s, c.bus.bytes / span / cal.nats_bytes_per_s),
                  fanout / msgs, max(loads) / statistics.fmean(loads) if loads else 0.0,
                  statistics.fmean(e.busy_s for e in c.engines) / span), c


class _Finished(list[tuple[Seq, float]]):
    """The loop's list of finished sequences, which also tells the cluster (its router's in-flight count)."""

    def __init__(self, c: Cluster, served: dict[str, int]) -> None:
        super().__init__()
        self.c, self.served = c, served

    def append(self, item: tuple[Seq, float]) -> None:
        super().append(item)
        _, decode = self.c.owner[item[0].request_id]
        self.served[decode.id] = self.served.get(decode.id, 0) + 1
        self.c.finished(item[0])


# Cost models: strategy_model's default is fitted on the Xeon (AMX); this one to decode_step_profile.py on the
# EPYC (no AMX), 2026-12-03: decode 61.1 / 85.7 / 84.1 ms at 1 / 8 / 16 decoders of 1,000 tokens; a prompt token
# 2.2–2.4 ms beside 4 decoders (--mixed 4x1000 --chunks 0,256,1024: 101, 707, 2,337 ms).
COSTS = {"xeon-amx": CostModel(), "epyc": CostModel(decode_base_ms=58.0, per_decoder_ms=1.0,
                                                      per_context_token_ms=0.0005, per_prompt_token_ms=2.2)}
TYPICAL_DECODERS = 4  # an engine at the paper's loads decodes ~4 sequences at once


def capacity_req_s(workload: str, engines: int, cost: CostModel) -> float:
    """Requests per second the engines sustain with data parallel: one over the mean request's engine time (its
    prompt, then its output tokens' share of decode steps of ``TYPICAL_DECODERS``). On the Xeon model this gives
    0.79 req/s per engine on long inputs where the paper experiment measured ~0.72 (its 60% point, 0.862 req/s on
    two engines): read loads as ±10%."""
    draw = workload_lengths(workload, random.Random(0))
    lens = [draw() for _ in range(4000)]
    per_request = statistics.fmean(
        cost.step_s([], p) - cost.step_s([], 0)  # the prompt's tokens
        + o * cost.step_s([p + o // 2] * TYPICAL_DECODERS, 0) / TYPICAL_DECODERS for p, o in lens)
    return engines / per_request


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, default=64)
    ap.add_argument("--routers", type=int, default=8)
    ap.add_argument("--workload", action="append", default=[], choices=["long", "chat", "mixed"])
    ap.add_argument("--load", default="0.6,0.8", help="offered load, fractions of the engines' capacity")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--heartbeat-s", type=float, default=1.0, help="engines' heartbeat interval (busserve: 1 s)")
    ap.add_argument("--kv-gb-s", type=float, default=0.807,
                    help="cross-host KV rate (mooncake, cross_host_transfer_bench.py); 0: KV over the bus")
    ap.add_argument("--prefill-engines", type=int, default=0, help="pd: how many prefill (default: 3/4)")
    ap.add_argument("--sweep", default="8,64,256,1024", help="engine counts for the router/bus saturation table")
    ap.add_argument("--cost", default="epyc", choices=sorted(COSTS), help="engine step costs (fitted per machine)")
    ap.add_argument("--calibration", default=None, help="reuse a saved calibration (JSON) instead of measuring")
    ap.add_argument("--out", default=".bench/cluster_sim.json")
    args = ap.parse_args()
    cost = COSTS[args.cost]
    if args.calibration and Path(args.calibration).exists():
        cal = Calibration(**json.loads(Path(args.calibration).read_text())["calibration"])
    else:
        cal = calibrate()
    workloads = args.workload or ["long", "mixed"]
    prefill_engines = args.prefill_engines or args.engines * 3 // 4
    rows: list[dict[str, Any]] = []
    for workload in workloads:
        cap = capacity_req_s(workload, args.engines, cost)
        for load in (float(x) for x in args.load.split(",")):
            rate = load * cap
            print(f"\n{workload}, {args.engines} engines, {args.routers} routers, load {load:.0%} "
                  f"({rate:.1f} req/s), {args.seeds} × {args.requests} requests, pd {prefill_engines}P:"
                  f"{args.engines - prefill_engines}D, KV {args.kv_gb_s or 'bus'} GB/s\n")
            print("| strategy | routers | pick | JCT mean (s) | JCT p99 | TTFT p99 | busiest router "
                  "| route wait p99 (ms) | bus msg/s | bus use | KV-event share | busiest engine ÷ mean | engines busy |\n"
                  + "|---" * 13 + "|")
            for strategy in ("least_loaded", "pd"):
                for n_routers, sampling in sorted({(1, False), (args.routers, False), (args.routers, True)}):
                    runs = [simulate(strategy, rate, args.requests, s, args.engines, n_routers, cal, cost,
                                     args.kv_gb_s, args.heartbeat_s, workload, prefill_engines, sampling)
                            for s in range(args.seeds)]
                    avg = {k: statistics.fmean(getattr(r, k) for r in runs)
                           for k in asdict(runs[0]) if k not in ("strategy", "rate")}
                    pick = "sampled" if sampling else "exact"
                    rows.append({"workload": workload, "load": load, "rate": rate, "routers": n_routers,
                                 "strategy": strategy, "pick": pick, **avg})
                    print(f"| {strategy} | {n_routers} | {pick} | {avg['jct_mean']:.2f} | {avg['jct_p99']:.2f} | "
                          f"{avg['ttft_p99']:.2f} | {avg['router_busy_max']:.1%} | {avg['route_wait_p99_ms']:.2f} | "
                          f"{avg['bus_msgs_per_s']:,.0f} | {avg['bus_share']:.1%} | {avg['kv_fanout_share']:.0%} | "
                          f"{avg['imbalance']:.2f} | {avg['engine_busy']:.0%} |", flush=True)
    sweep = saturation(cal, cost, [int(x) for x in args.sweep.split(",")], args.routers, args.heartbeat_s)
    print(f"\nwhere it saturates (long inputs at 80% load, {args.routers} routers, heartbeats every "
          f"{args.heartbeat_s} s):\n")
    print("| engines | req/s | router core, per router | of which heartbeats + KV events | bus msg/s | bus use |\n"
          "|---|---|---|---|---|---|")
    for s in sweep:
        print(f"| {s['engines']} | {s['rate']:.0f} | {s['router_util']:.1%} | {s['fanout_util']:.1%} | "
              f"{s['bus_msgs_per_s']:,.0f} | {s['bus_share']:.1%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                          "calibration": asdict(cal), "cost_model": asdict(cost), "rows": rows,
                                          "saturation": sweep}, indent=1))
    print(f"\nresults: {args.out}")
    return 0


def saturation(cal: Calibration, cost: CostModel, sizes: list[int], routers: int, heartbeat_s: float
               ) -> list[dict[str, float]]:
    """Closed-form load per router and on the bus at 80% of the engines' capacity, long inputs, data parallel
    (the simulated runs agree with it where both exist): per request one decision and its events; per engine a
    heartbeat every ``heartbeat_s`` and its KV batches, each delivered to every router."""
    rng = random.Random(0)
    draw = workload_lengths("long", rng)
    lens = [draw() for _ in range(2000)]
    prompt = statistics.fmean(p for p, _ in lens)
    out = statistics.fmean(o for _, o in lens)
    recv_s = 1 / cal.nats_msgs_per_s
    rows = []
    for n in sizes:
        rate = 0.8 * capacity_req_s("long", n, cost)
        # KV batches: one per prefill step (chunks of max_batch_tokens) and at most one per page a decoder fills.
        batches_per_s = rate * (math.ceil(prompt / SchedulerConfig.max_batch_tokens) + out / PAGE)
        pages_per_s = rate * (prompt + out) / PAGE
        heartbeats_per_s = n / heartbeat_s
        fanout = (heartbeats_per_s * (recv_s + cal.status_us / 1e6) + batches_per_s * (recv_s + cal.kv_batch_us / 1e6)
                  + pages_per_s * cal.kv_page_us / 1e6)
        decisions = rate / routers * (recv_s + (cal.route_base_us + cal.route_per_engine_us * n) / 1e6)
        msgs = rate * (out + 4) + (heartbeats_per_s + batches_per_s) * routers
        rows.append({"engines": n, "rate": rate, "router_util": decisions + fanout, "fanout_util": fanout,
                     "bus_msgs_per_s": msgs, "bus_share": msgs / cal.nats_msgs_per_s})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())

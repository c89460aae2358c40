"""What one routing decision costs the router as the cluster grows: CPU time per request of the prefix-aware
choice (every engine weighed by its cached prefix and load) at 2, 8, 64 and 256 simulated engines.

    .venv/bin/python benchmarks/router_scale_bench.py [--requests 400] [--prompt 2000]

The engines are simulated: a ClusterView fed by hand with heartbeats and KV events, as the router's own view is fed
from the bus, no processes. Workload: 32 conversations sharing an 800-token system prompt, each engine holding the
KV of a random quarter of them (whole prompts), requests drawn from the conversations with a fresh tail. Side by
side in one run: the index (``PrefixIndex``: the prompt hashed once, one walk for all engines) and the definition
it replaced (each engine re-hashing the prompt and walking its own set), on the same view and requests.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from busserve.kv.page_hash import prefix_page_hashes
from busserve.messages import EngineStatus, KVEventBatch, KVStored, SamplingParams
from busserve.router.cluster import ClusterView, Engine
from busserve.router.request import Request
from busserve.router.strategies.prefix_aware import cheapest
from busserve.router.strategy import Cluster

PS = 16


def view_of(n: int, conversations: list[list[int]], rng: random.Random) -> ClusterView:
    view = ClusterView(bus=None)  # type: ignore[arg-type]  # fed by hand
    for i in range(n):
        eid = f"e{i:03d}"
        view.on_status(EngineStatus(engine_id=eid, model="m", roles=["prefill", "decode"], running=rng.randrange(8),
                                    waiting=0, parked=0, free_pages=50_000, total_pages=50_000, page_size=PS,
                                    max_model_len=8192, transports=["bus"], host=f"h{i}", pid=1, seq=1,
                                    interval_s=3600.0))  # alive for the whole run
        held = rng.sample(conversations, max(1, len(conversations) // 4))
        hashes = [h for conv in held for h in prefix_page_hashes(conv, PS)]
        view.on_kv_events(KVEventBatch(engine_id=eid, seq=1, events=[KVStored(page_hashes=hashes)]))
    return view


def by_definition(engine: Engine, req: Request) -> int:
    """The per-engine scan the index replaced: hash the prompt, walk this engine's own set."""
    n = 0
    for h in prefix_page_hashes(req.prompt_token_ids, PS):
        if h not in engine._state.cached:
            break
        n += PS
    return n


def choose(view: ClusterView, req: Request, cached: object) -> str:
    """Prefix-aware's rule over every engine (how it was decided before the holders-and-lightest path)."""
    engines = view.engines()
    best = min(engines, key=lambda e: (req.prompt_len - cached(e, req) + 256 * e.load, e.id))  # type: ignore[operator]
    return best.id


def choose_now(view: ClusterView, req: Request, _: object) -> str:
    """What the prefix_aware strategy does now: only the engines holding part of the prompt and the lightest other."""
    return cheapest(req, Cluster(view), 256).id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--prompt", type=int, default=2000, help="prompt tokens per request")
    ap.add_argument("--engines", type=int, nargs="+", default=[2, 8, 64, 256])
    ap.add_argument("--out", default=".bench/router_scale.json")
    args = ap.parse_args()
    rng = random.Random(5)
    system = [rng.randrange(50_000) for _ in range(800)]
    conversations = [system + [rng.randrange(50_000) for _ in range(args.prompt - 800 - 100)] for _ in range(32)]
    results = {}
    for n in args.engines:
        view = view_of(n, conversations, rng)
        reqs = [Request(request_id=f"r{i}", prompt_token_ids=rng.choice(conversations)
                        + [rng.randrange(50_000) for _ in range(100)], sampling=SamplingParams(), stream_subject="s")
                for i in range(args.requests)]
        row = {}
        for name, cached, pick in (("holders + lightest", Engine.cached_prefix, choose_now),
                                   ("index, every engine", Engine.cached_prefix, choose),
                                   ("per-engine scan", by_definition, choose)):
            fresh = [Request(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids, sampling=r.sampling,
                             stream_subject="s") for r in reqs]  # nothing memoised from the other method
            for r in fresh[:20]:  # warm-up (not timed): caches, the interpreter's specialisations
                pick(view, Request(request_id="w", prompt_token_ids=r.prompt_token_ids, sampling=r.sampling,
                                   stream_subject="s"), cached)
            picks = []
            t0 = time.process_time()
            for r in fresh:
                picks.append(pick(view, r, cached))
            row[name] = (time.process_time() - t0) / len(fresh) * 1e6
            row[f"{name} picks"] = picks
        picks = {k: v for k, v in row.items() if k.endswith("picks")}
        assert len({tuple(v) for v in picks.values()}) == 1, "the methods disagree"
        results[n] = {k: v for k, v in row.items() if not k.endswith("picks")}
        print(f"{n:4d} engines: " + "   ".join(f"{k} {v:8.1f} µs" for k, v in results[n].items()), flush=True)
    for method in results[args.engines[0]]:
        base = results[args.engines[0]][method]
        print(f"{method} vs the smallest cluster: "
              + ", ".join(f"{n}: ×{r[method] / base:.2f}" for n, r in results.items()))
    print(f"median, holders + lightest: {statistics.median(r['holders + lightest'] for r in results.values()):.1f} µs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                          "us_per_request": results}, indent=1))


if __name__ == "__main__":
    main()

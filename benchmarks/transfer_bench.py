"""Issue #4 benchmark: KV transfer between two engine processes (SmolLM2, each pinned to its own core).

    .venv/bin/python benchmarks/transfer_bench.py [--dtype float32] [--context 2000] [--out .bench/transfer.json]

Each engine computes with one thread, unpinned, so a sender's transfer thread can run beside its compute.

1. Bandwidth per backend (shm, bus) for a whole cached context moved A → B, beside this machine's memcpy bandwidth
   measured in the same run.
2. Migration vs recompute: bringing a ``--context``-token context to B by migration (prep_recv, remote_send from
   A's cache, start_generate) vs recomputing its prefill on B — time to B's first token.
3. Overlap: remote_send from a cold sender (prefill + per-layer sends). The sender reports when its last KV was
   computed and how long its transfer thread was busy; what lands after the compute is the exposed tail, the rest
   of the transfer was hidden. Per-layer compute and transfer times beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from busserve.bus.client import Bus
from busserve.messages import Final, GenerateRequest, SamplingParams, TokenChunk
from busserve.router.cluster import Engine, Timeouts
from busserve.router.request import Request
from busserve.testing import ProcessCluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from busserve.testing import live_view


def memcpy_gb_s(nbytes: int) -> float:
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    return 5 * nbytes / (time.perf_counter() - t) / 1e9


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


async def ttft(bus: Bus, engine: str, prompt: list[int]) -> float:
    req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=1, temperature=0))
    t = time.perf_counter()
    async for ev in bus.generate(req, subject=bus.subjects.engine_action(engine, "generate"),
                                 first_event_timeout_s=600):
        if isinstance(ev, TokenChunk):
            return time.perf_counter() - t
        if not isinstance(ev, Final):
            raise RuntimeError(ev)
    raise RuntimeError("no token")


def request(prompt: list[int], stream_subject: str) -> Request:
    return Request(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, stream_subject=stream_subject,
                   sampling=SamplingParams(max_tokens=1, temperature=0))


async def migrate(bus: Bus, a: Engine, b: Engine, prompt: list[int], end: int, transport: str
                  ) -> dict[str, float]:
    """prep_recv on B, remote_send from A, start_generate on B; time to B's first token and the transfer."""
    async with bus.open_stream() as stream:
        req = request(prompt, stream.subject)
        t0 = time.perf_counter()
        recv = await b.prep_recv(req, end=end, transport=transport)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        sent = await a.remote_send(req, recv.kv_addr, begin=recv.matched, end=end)
        t2 = time.perf_counter()
        await b.start_generate(req, begin=end)
        async for ev in stream.events(first_event_timeout_s=600):
            if isinstance(ev, TokenChunk):
                t3 = time.perf_counter()
                break
    return {"to_first_token_s": t3 - t0, "prep_recv_s": t1 - t0, "remote_send_s": t2 - t1,
            "sender_reported_s": sent.duration_s, "bytes": sent.bytes_sent, "computed_tokens": sent.computed_tokens,
            "cached_tokens": sent.cached_tokens, "matched_on_receiver": recv.matched, "compute_s": sent.compute_s,
            "transfer_busy_s": sent.transfer_busy_s}


async def run(cluster: ProcessCluster, context: int, reps: int) -> dict[str, Any]:
    bus = await Bus.connect(cluster.bus_config(), name="transfer-bench")
    out: dict[str, Any] = {}
    try:
        view = await live_view(bus, {"A", "B"}, timeouts=Timeouts(lease_s=600))
        for transport in ("shm", "bus"):
            migr, recompute, cold = [], [], []
            # The first transfer between a pair maps the receiver's pool (shm) or warms the path: measure it, but
            # apart from the steady state.
            warm = tokens(context + 1, 12345 + ("shm", "bus").index(transport))
            await ttft(bus, "A", warm)
            await asyncio.sleep(0.3)
            first = await migrate(bus, view.get("A"), view.get("B"), warm, context, transport)
            for r in range(reps):
                seed = hash((transport, r)) % 100_000
                prompt = tokens(context + 1, seed)
                await ttft(bus, "A", prompt)  # A now caches the context
                await asyncio.sleep(0.3)
                migr.append(await migrate(bus, view.get("A"), view.get("B"), prompt, context, transport))
                recompute.append(await ttft(bus, "B", tokens(context + 1, seed + 1)))  # B prefills it itself
                cold_prompt = tokens(context + 1, seed + 2)
                cold.append(await migrate(bus, view.get("A"), view.get("B"), cold_prompt, context, transport))
            m = {k: statistics.median(x[k] for x in migr) for k in migr[0]}
            c = {k: statistics.median(x[k] for x in cold) for k in cold[0]}
            prefill_s = statistics.median(recompute)
            transfer_s = m["sender_reported_s"]
            layers = 30
            # Overlap, from the sender's own clock: the cold send's exposed tail (last byte landed minus last KV
            # computed) against the time its transfer thread was busy writing.
            exposed = c["sender_reported_s"] - c["compute_s"]
            out[transport] = {
                "bytes": m["bytes"],
                "bandwidth_gb_s": m["bytes"] / transfer_s / 1e9,
                "first_transfer_s": first["sender_reported_s"],
                "migration_to_first_token_s": m["to_first_token_s"],
                "recompute_to_first_token_s": prefill_s,
                "migration_speedup": prefill_s / m["to_first_token_s"],
                "migration_recomputed_tokens": m["computed_tokens"],
                "cold_remote_send_s": c["sender_reported_s"],
                "cold_compute_s": c["compute_s"],
                "cold_transfer_busy_s": c["transfer_busy_s"],
                "cold_exposed_tail_s": exposed,
                "transfer_hidden_fraction": max(0.0, 1 - exposed / c["transfer_busy_s"]) if c["transfer_busy_s"]
                else 0.0,
                "per_layer_compute_ms": c["compute_s"] / layers * 1e3,
                "per_layer_transfer_ms": c["transfer_busy_s"] / layers * 1e3,
                "runs": {"first": first, "migrate": migr, "cold": cold, "recompute_s": recompute},
            }
    finally:
        await bus.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=".bench/transfer.json")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cores": len(cores), "dtype": args.dtype,
                              "context": args.context}
    with ProcessCluster() as cluster:
        # One compute thread each, not pinned: a sender's transfer thread can then run beside its compute (on a
        # single pinned core it could only take turns with it, and nothing could overlap).
        for eid in ("A", "B"):
            cluster.start_engine(eid, "--dtype", args.dtype, "--kv-memory", "1GiB", "--max-batch-tokens", "512",
                                 threads=1)
        cluster.wait_engines({"A", "B"})
        result.update(asyncio.run(run(cluster, args.context, args.reps)))
    kv_bytes = int(result["shm"]["bytes"])
    result["memcpy_gb_s"] = memcpy_gb_s(kv_bytes)
    for t in ("shm", "bus"):
        result[t]["fraction_of_memcpy"] = result[t]["bandwidth_gb_s"] / result["memcpy_gb_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    summary = {t: {k: v for k, v in result[t].items() if k != "runs"} for t in ("shm", "bus")}
    print(json.dumps({"memcpy_gb_s": result["memcpy_gb_s"], **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Recovery after an engine is SIGKILLed mid-stream: how long the streams it served wait for their next token, how
many requests complete, and how far throughput dips.

    .venv/bin/python benchmarks/recovery_bench.py [--runs 3] [--streams 16] [--tokens 160] [--kill-after 4]

Per run: a fresh nats-server, two SmolLM2 engines (bf16, each pinned to its own core, one thread — the layout of
`busserve up` on this machine) and a router (least_loaded, 1 s heartbeats). ``--streams`` chat requests of
``--tokens`` output tokens start at once; after ``--kill-after`` seconds the engine holding the first stream is
SIGKILLed. Every stream is read on the wire (busserve.testing.Wire) and checked: one terminal event, contiguous
indices. Recovery of a stream = the time from the kill to its next token. Throughput = output tokens per second
over the whole cluster, in the seconds before the kill and after it. Dynamo's fault-tolerance suite reports
38–45 s recovery and 796/800 requests completed; the target here is ≤ 5 s p99 and 100%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from busserve.bench.metrics import percentile
from busserve.bus.client import Bus
from busserve.messages import Final, StreamStatus
from busserve.testing import ProcessCluster, Wire


def owner(stream) -> str | None:  # type: ignore[no-untyped-def]
    engines = [e.owner for _, e in stream.events if isinstance(e, StreamStatus) and e.owner_kind == "engine"]
    return engines[-1] if engines else None


async def one_run(args: argparse.Namespace, cluster: ProcessCluster, tokenizer) -> dict:  # type: ignore[no-untyped-def]
    bus = await Bus.connect(cluster.bus_config(), name="recovery-bench")
    try:
        async with Wire(bus) as wire:
            prompts = []
            for i in range(args.streams):
                text = tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me story number {i} about "
                                                                                   "a lighthouse keeper."}],
                                                     add_generation_prompt=True, tokenize=False)
                prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
            started = time.monotonic()
            streams = [await wire.send(f"s{i}", p, args.tokens) for i, p in enumerate(prompts)]
            await asyncio.sleep(args.kill_after)
            victim = next(o for s in streams if (o := owner(s)) is not None)
            hit = [s for s in streams if owner(s) == victim and s.terminal is None]
            killed_at = time.monotonic()
            cluster.kill(victim)
            await wire.all_ended(timeout_s=300)
        wire.check_all()
        completed = sum(isinstance(s.terminal, Final) and s.terminal.finish_reason == "length" for s in streams)
        waits = []
        for s in hit:
            after = [t for t in s.token_times() if t > killed_at]
            if after:
                waits.append(after[0] - killed_at)
        times = sorted(t for s in streams for t in s.token_times())
        window = args.kill_after
        before = sum(1 for t in times if killed_at - window <= t < killed_at) / window
        after_rate = sum(1 for t in times if killed_at <= t < killed_at + window) / window
        return {"victim": victim, "streams": args.streams, "hit": len(hit), "completed": completed,
                "recovery_s": waits, "tok_s_before": before, "tok_s_after": after_rate,
                "run_s": (times[-1] if times else killed_at) - started}
    finally:
        await bus.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--kill-after", type=float, default=4.0)
    ap.add_argument("--out", default=".bench/recovery.json")
    args = ap.parse_args()
    from busserve.engine.model_loader import resolve_model_dir
    from busserve.tokenization import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_dir(None)[0])
    cores = sorted(os.sched_getaffinity(0))
    runs = []
    for r in range(args.runs):
        with ProcessCluster() as c:
            for i, eid in enumerate(("e0", "e1")):
                c.start_engine(eid, cpus=[cores[i % len(cores)]], threads=1)
            c.start("router", "router", "--nats", c.url, "--id", "r0")
            c.wait_engines({"e0", "e1"})
            time.sleep(1.5)  # the router hears both engines
            result = asyncio.run(one_run(args, c, tokenizer))
        runs.append(result)
        print(f"run {r}: killed {result['victim']} holding {result['hit']} of {result['streams']} streams; "
              f"completed {result['completed']}/{result['streams']}; recovery "
              f"{', '.join(f'{w:.2f}' for w in result['recovery_s'])} s; "
              f"{result['tok_s_before']:.0f} → {result['tok_s_after']:.0f} tok/s", flush=True)
    waits = [w for r in runs for w in r["recovery_s"]]
    done = sum(r["completed"] for r in runs)
    total = sum(r["streams"] for r in runs)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "runs": runs,
               "recovery_p50_s": percentile(waits, 50), "recovery_p99_s": percentile(waits, 99),
               "recovery_max_s": max(waits) if waits else None, "completed": done, "requests": total,
               "tok_s_before_mean": statistics.mean(r["tok_s_before"] for r in runs),
               "tok_s_after_mean": statistics.mean(r["tok_s_after"] for r in runs)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"recovery p50 {summary['recovery_p50_s']:.2f} s, p99 {summary['recovery_p99_s']:.2f} s "
          f"(max {summary['recovery_max_s']:.2f}) over {len(waits)} interrupted streams; completed {done}/{total}; "
          f"throughput {summary['tok_s_before_mean']:.0f} tok/s before the kill, "
          f"{summary['tok_s_after_mean']:.0f} in the {args.kill_after:g} s after")
    return 0


if __name__ == "__main__":
    sys.exit(main())

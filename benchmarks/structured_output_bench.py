"""What structured outputs cost: output throughput at 16 concurrent streams with a JSON Schema on every request
against the same requests free — same engines, prompts and cores, runs interleaved on one stack.

    .venv/bin/python benchmarks/structured_output_bench.py [--reps 3] [--requests 48] [--tokens 128]

The stack is separate processes (``busserve.testing.ProcessCluster``): a nats-server, two SmolLM2-135M engines
(one core each, the default dtype), one router (least_loaded). Warm-up: 8 requests of each mode (the first
constrained request on an engine builds llguidance's view of the tokenizer, ~0.5 s). Then ``--requests`` greedy
requests of ``--tokens`` output tokens, 16 in flight, read on the wire (every stream checked). The schema holds
one long string (at least 1,500 characters), so that both modes write ``--tokens`` tokens per request: a story in
a JSON object, ``{"title": ..., "story": ...}``. Throughput = output tokens / wall time of the measured part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.messages import StructuredOutput
from busserve.testing import ProcessCluster, Wire

SCHEMA: dict[str, Any] = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                                          "story": {"type": "string", "minLength": 1500}},
                          "required": ["title", "story"], "additionalProperties": False}
MODES = ("free", "json_schema")


async def drive(cfg: BusConfig, prompts: list[list[int]], tokens: int, mode: str, tag: str,
                concurrency: int = 16) -> dict[str, float]:
    extra: dict[str, Any] = {"structured_output": StructuredOutput(json_schema=SCHEMA)} if mode != "free" else {}
    bus = await Bus.connect(cfg, name="structured-bench")
    try:
        async with Wire(bus) as wire:
            return await wire.closed_loop(prompts, tokens, concurrency, f"{tag}-", **extra)
    finally:
        await bus.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=".bench/structured_output.json")
    args = ap.parse_args()
    from busserve.engine.model_loader import resolve_model_dir
    from busserve.launch.readiness import wait_for_engines
    from busserve.tokenization import load_tokenizer

    tok = load_tokenizer(resolve_model_dir(None)[0])
    rng = random.Random(11)
    topics = ["a lighthouse", "the moon", "a river", "bread", "a violin", "winter", "bees", "a library"]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": f"Write a story about {rng.choice(topics)} "
                                                                         f"and {rng.choice(topics)}, as JSON."}],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for _ in range(args.requests)]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with ProcessCluster() as c:
        for i, eid in enumerate(("e0", "e1")):
            c.start_engine(eid, cpus=[i])
        c.start("r0", "router", "--nats", c.url, "--id", "r0")
        asyncio.run(wait_for_engines(c.bus_config(), {"e0", "e1"}, 600, lambda: True, routers=1))
        time.sleep(1.5)
        for mode in MODES:  # warm-up
            asyncio.run(drive(c.bus_config("client"), prompts[:8], 16, mode, f"warm-{mode}"))
        for rep in range(args.reps):
            for mode in MODES:
                r = asyncio.run(drive(c.bus_config("client"), prompts, args.tokens, mode, f"{rep}-{mode}"))
                results[mode].append(r)
                print(f"rep {rep} {mode:11s} {r['tok_s']:.1f} tok/s ({r['tokens']} tokens in {r['wall_s']:.1f} s, "
                      f"TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms)", flush=True)
    summary = {m: statistics.mean(r["tok_s"] for r in rs) for m, rs in results.items()}
    print(f"json_schema: {summary['json_schema']:.1f} tok/s vs free {summary['free']:.1f} "
          f"({(summary['json_schema'] / summary['free'] - 1) * 100:+.1f}%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                          "runs": results, "mean_tok_s": summary}, indent=1))


if __name__ == "__main__":
    main()

"""``n=4`` against four separate requests: prefill work and wall time, same stack, prompts and cores.

    .venv/bin/python benchmarks/n_choices_bench.py [--prompts 6] [--prompt-tokens 800] [--tokens 32]

The stack is separate processes (``busserve.testing.ProcessCluster``): a nats-server, two SmolLM2-135M engines
(one core each, the default dtype) and one router (least_loaded) serving the OpenAI front. For each of
``--prompts`` prompts (a long document and a question, ``--prompt-tokens`` tokens, each prompt new to the
caches), one at a time:

* ``n=4``: one completions request with ``n=4`` (temperature 1, a seed);
* ``4 requests``: four completions requests for the same prompt sent at once (seeds seed..seed+3) — what a client
  does without ``n``.

Measured: wall time from sending to the last choice's end, and the prompt tokens the engines computed (their
heartbeats' ``prompt_tokens_computed``, read before and after). Modes alternate prompt by prompt.
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
from busserve.bus.embedded import free_port
from busserve.testing import ProcessCluster, prompt_tokens_computed

ENGINES = {"e0", "e1"}


async def computed(bus: Bus) -> int:
    return await prompt_tokens_computed(bus, ENGINES)


async def one(client: Any, bus: Bus, prompt: str, tokens: int, seed: int, mode: str) -> dict[str, float]:
    before = await computed(bus)
    t0 = time.monotonic()
    ask = {"model": "", "prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    if mode == "n=4":
        out = await client.completions.create(n=4, seed=seed, **ask)
        assert len(out.choices) == 4
    else:
        outs = await asyncio.gather(*(client.completions.create(seed=seed + i, **ask) for i in range(4)))
        assert all(len(o.choices) == 1 for o in outs)
    wall = time.monotonic() - t0
    return {"wall_s": wall, "prompt_tokens_computed": await computed(bus) - before}


async def run(url: str, c: ProcessCluster, prompts: list[str], tokens: int) -> dict[str, list[dict[str, float]]]:
    import openai

    bus = await Bus.connect(c.bus_config(), name="n-bench")
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    results: dict[str, list[dict[str, float]]] = {"n=4": [], "4 requests": []}
    try:
        await one(client, bus, "warm up " * 20, 8, 0, "n=4")
        await one(client, bus, "warm up again " * 20, 8, 0, "4 requests")
        for i, prompt in enumerate(prompts):
            modes = ("n=4", "4 requests") if i % 2 == 0 else ("4 requests", "n=4")
            for mode in modes:
                # Each mode gets its own variant of the prompt, so that neither finds the other's pages cached.
                r = await one(client, bus, f"[{mode}] {prompt}", tokens, 100 + i, mode)
                results[mode].append(r)
                print(f"prompt {i} {mode:10s} wall {r['wall_s']:.2f} s, prompt tokens computed "
                      f"{r['prompt_tokens_computed']:.0f}", flush=True)
    finally:
        await client.close()
        await bus.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=800)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=".bench/n_choices.json")
    args = ap.parse_args()
    from busserve.launch.readiness import wait_for_engines

    rng = random.Random(5)
    words = ["river", "stone", "lamp", "harbour", "winter", "market", "violin", "orchard", "signal", "ledger", "copper", "meadow", "lantern", "engine", "window", "garden", "silver", "thunder"]
    # About 1.3 tokens per word for SmolLM2's tokenizer on this vocabulary.
    prompts = [" ".join(rng.choice(words) for _ in range(int(args.prompt_tokens / 1.3))) + "\nSummary:"
               for _ in range(args.prompts)]
    port = free_port()
    with ProcessCluster() as c:
        for i, eid in enumerate(sorted(ENGINES)):
            c.start_engine(eid, cpus=[i])
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--http-port", str(port))
        asyncio.run(wait_for_engines(c.bus_config(), ENGINES, 600, lambda: True, routers=1))
        time.sleep(1.5)
        results = asyncio.run(run(f"http://127.0.0.1:{port}/v1", c, prompts, args.tokens))
    for mode, rs in results.items():
        print(f"{mode:10s} wall p50 {statistics.median(r['wall_s'] for r in rs):.2f} s, prompt tokens computed "
              f"mean {statistics.mean(r['prompt_tokens_computed'] for r in rs):.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                          "runs": results}, indent=1))


if __name__ == "__main__":
    main()

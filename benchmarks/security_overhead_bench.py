"""What isolation costs: output throughput at 16 concurrent streams on an open bus, with per-role identities and
grants, with those plus TLS, and as a tenant's client in operator mode (JWT identities, the client in an account of
its own so every token crosses a service import, TLS) — same engines, prompts and cores, runs interleaved.

    .venv/bin/python benchmarks/security_overhead_bench.py [--reps 2] [--requests 32] [--tokens 128]

Each run starts a fresh stack as separate processes (``busserve.testing.ProcessCluster``): a nats-server, two
SmolLM2-135M engines (one core each, the default dtype), one router (least_loaded). Warm-up: 8 requests. Then
``--requests`` greedy requests of ``--tokens`` output tokens, 16 in flight at any time, sent and read on the
wire by one client (``Wire``: every stream checked). Throughput = output tokens / wall time of the measured part.
Modes run in turn (open, auth, auth+tls, tenant+jwt+tls, open, ...) so that drift on the machine spreads over all
of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import EmbeddedNats
from busserve.bus.subjects import Subjects
from busserve.security.dev_tls import write_dev_tls
from busserve.security.issue import issue
from busserve.security.server_config import Credentials, auth_config
from busserve.testing import ProcessCluster, Wire

MODES = ("open", "auth", "auth+tls", "tenant+jwt+tls")


def cluster_for(mode: str, tls_dir: Path) -> ProcessCluster:
    extra = ""
    creds = None
    if mode == "tenant+jwt+tls":
        out = Path(tempfile.mkdtemp(dir=tls_dir))
        creds, extra = issue(Credentials.for_stack(["e0", "e1"], ["r0"], clients=("client@tenant",)), "jwt",
                             Subjects(), out)
    elif mode != "open":
        creds = Credentials.for_stack(["e0", "e1"], ["r0"])
        extra = auth_config(list(creds.identities.values()), Subjects())
    if mode.endswith("tls"):
        extra += (f'tls {{ cert_file: "{tls_dir / "server.pem"}", key_file: "{tls_dir / "server-key.pem"}", '
                  f'ca_file: "{tls_dir / "ca.pem"}" }}\n')
    # (auth: the whole server config, TLS included, instead of the one ProcessCluster would make of ``creds``)
    return ProcessCluster(nats=EmbeddedNats(extra_config=extra), credentials=creds, auth=extra if creds else None)


async def drive(cfg: BusConfig, prompts: list[list[int]], tokens: int, concurrency: int = 16) -> dict[str, float]:
    bus = await Bus.connect(cfg, name="security-bench")
    try:
        async with Wire(bus) as wire:
            for i in range(8):  # warm-up
                await wire.send(f"w{i}", prompts[i % len(prompts)], 16)
            await wire.all_ended(300, linger_s=0.2)
            wire.streams.clear()
            return await wire.closed_loop(prompts, tokens, concurrency)
    finally:
        await bus.close()


def one_run(mode: str, tls_dir: Path, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    with cluster_for(mode, tls_dir) as c:
        env = {"BUSSERVE_NATS_TLS_CA": str(tls_dir / "ca.pem")} if mode.endswith("tls") else {}
        for i, eid in enumerate(("e0", "e1")):
            c.start_engine(eid, cpus=[i], env=env)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", env=env)
        cfg = c.bus_config("client")
        if mode.endswith("tls"):
            cfg.tls_ca = str(tls_dir / "ca.pem")
            cfg.servers = [c.url.replace("nats://", "tls://")]
        wait_cfg = c.bus_config()
        wait_cfg.tls_ca = cfg.tls_ca
        from busserve.launch.readiness import wait_for_engines

        asyncio.run(wait_for_engines(wait_cfg, {"e0", "e1"}, 600, lambda: True, routers=1))
        time.sleep(1.5)
        return asyncio.run(drive(cfg, prompts, tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=".bench/security_overhead.json")
    args = ap.parse_args()
    from busserve.engine.model_loader import resolve_model_dir
    from busserve.tokenization import load_tokenizer

    tok = load_tokenizer(resolve_model_dir(None)[0])
    rng = random.Random(11)
    topics = ["a lighthouse", "the moon", "a river", "bread", "a violin", "winter", "bees", "a library"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a story about {rng.choice(topics)} "
                                                                    f"and {rng.choice(topics)}."}],
                                       add_generation_prompt=True, tokenize=True) for _ in range(args.requests)]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]  # a BatchEncoding, or ids
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as d:
        tls_dir = Path(d)
        write_dev_tls(tls_dir, ["localhost", "127.0.0.1"], days=1)
        for rep in range(args.reps):
            for mode in MODES:
                r = one_run(mode, tls_dir, prompts, args.tokens)
                results[mode].append(r)
                print(f"rep {rep} {mode:9s} {r['tok_s']:.1f} tok/s ({r['tokens']} tokens in {r['wall_s']:.1f} s, "
                      f"TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms)", flush=True)
    summary = {m: statistics.mean(r["tok_s"] for r in rs) for m, rs in results.items()}
    for m in MODES[1:]:
        print(f"{m}: {summary[m]:.1f} tok/s vs open {summary['open']:.1f} "
              f"({(summary[m] / summary['open'] - 1) * 100:+.1f}%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                          "runs": results, "mean_tok_s": summary}, indent=1))


if __name__ == "__main__":
    main()

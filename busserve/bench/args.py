"""Arguments of ``busserve bench`` (imported by the CLI's parser, so kept free of heavy imports)."""

from __future__ import annotations

import argparse


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", default="synthetic",
                   choices=["synthetic", "long", "chat", "mixed", "prefix", "sharegpt"])
    g.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON (for --dataset sharegpt)")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--input-len", default=None, help="fixed:N, uniform:A-B or normal:MEAN,SD")
    g.add_argument("--output-len", default=None, help="fixed:N, uniform:A-B or normal:MEAN,SD")
    g.add_argument("--prefix-groups", type=int, default=4, help="prefix dataset: distinct shared prefixes")
    g.add_argument("--prefix-len", type=int, default=512, help="prefix dataset: shared prefix length")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--reuse-prompts", action="store_true",
                   help="send the very same prompts in every run (by default each run's prompts get a unique "
                        "2-token head, so no run hits prefix-cache entries left by an earlier run)")
    g = p.add_argument_group("load")
    g.add_argument("--rate", type=float, default=float("inf"), help="requests per second (default: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--warmup", type=int, default=2, help="requests sent first and not measured")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request limit, seconds")
    g = p.add_argument_group("target")
    g.add_argument("--http", default=None, metavar="URL", help="go through an OpenAI-compatible front "
                   "(e.g. http://127.0.0.1:8000/v1) instead of the bus")
    g.add_argument("--model", default="", help="model name sent over HTTP")
    g.add_argument("--strategy", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="run once per strategy, switching live between runs (default: the active one)")
    g = p.add_argument_group("output")
    g.add_argument("--slo-ttft-ms", type=float, default=None)
    g.add_argument("--slo-tpot-ms", type=float, default=None)
    g.add_argument("--slo-e2e-ms", type=float, default=None)
    g.add_argument("--out", default=None, help="JSON results (per-request arrays included)")
    g.add_argument("--plot", default=None, help="PNG with latency CDFs per strategy")
    g.add_argument("--no-progress", action="store_true")

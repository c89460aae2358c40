"""``busserve bench``: run a workload against a running cluster, once per strategy (switched live between runs),
and report vLLM-style serving metrics as a table, a JSON file with per-request arrays, and CDF plots."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from busserve.bench import datasets
from busserve.bench.metrics import SLO, RequestRecord, summarize
from busserve.bench.runner import LoadConfig, Sender, bus_sender, http_sender, run_load
from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.messages import StrategyParam
from busserve.router.control import set_strategy
from busserve.router.strategy import parse_param_args


def parse_strategy(spec: str) -> tuple[str, dict[str, StrategyParam]]:
    """``balanced_pd:f=0.2`` → ("balanced_pd", {"f": "0.2"})."""
    name, _, params = spec.partition(":")
    return name, parse_param_args([p for p in params.split(",") if p])


def strategy_label(name: str, params: dict[str, StrategyParam]) -> str:
    return name + ("(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


def make_samples(args: argparse.Namespace, tokenizer: Any = None) -> list[datasets.Sample]:
    n, seed = args.num_prompts, args.seed
    if args.dataset == "synthetic":
        return datasets.synthetic(n, args.input_len or "fixed:128", args.output_len or "fixed:64", seed)
    if args.dataset == "long":
        kw = {k: v for k, v in (("input_len", args.input_len), ("output_len", args.output_len)) if v}
        return datasets.long_input(n, seed, **kw)
    if args.dataset == "chat":
        kw = {k: v for k, v in (("input_len", args.input_len), ("output_len", args.output_len)) if v}
        return datasets.chat(n, seed, **kw)
    if args.dataset == "mixed":
        return datasets.mixed(n, seed)
    if args.dataset == "prefix":
        return datasets.prefix_groups(n, args.prefix_groups, args.prefix_len, args.input_len or "uniform:16-64",
                                      args.output_len or "fixed:32", seed)
    if args.dataset_path is None:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE")
    return datasets.sharegpt(args.dataset_path, n, tokenizer, seed)


def per_request_arrays(records: list[RequestRecord]) -> dict[str, list[Any]]:
    return {
        "kind": [r.kind for r in records], "prompt_len": [r.prompt_len for r in records],
        "output_len": [r.tokens for r in records], "ttft": [r.ttft if r.ok else None for r in records],
        "e2e": [r.e2e if r.ok else None for r in records], "tpot": [r.tpot if r.ok else None for r in records],
        "itl": [r.itls if r.ok else None for r in records], "error": [r.error for r in records],
    }


async def bench_once(send: Sender, samples: list[datasets.Sample], load: LoadConfig, warmup: int,
                     progress: bool, label: str, slo: SLO | None, salt: str | None = None) -> dict[str, Any]:
    """One measured run. With ``salt``, the run's prompts (and, separately, the warm-up's) are made unique to it,
    so no run is served from a prefix cache another run filled."""
    if warmup:
        warm = samples[:warmup] if salt is None else datasets.salted(samples[:warmup], f"{salt}:warmup")
        await run_load(warm, send, LoadConfig(max_concurrency=warmup, timeout_s=load.timeout_s))
    if salt is not None:
        samples = datasets.salted(samples, salt)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc=label, unit="req", file=sys.stderr, leave=False)
    records, duration = await run_load(samples, send, load, on_done=(lambda r: bar.update(1)) if bar else None)
    if bar is not None:
        bar.close()
    return {"label": label, "summary": summarize(records, duration, slo), "requests": per_request_arrays(records)}


def format_table(runs: list[dict[str, Any]]) -> str:
    head = (f"{'strategy':<26}{'done':>6}{'req/s':>7}{'tok/s':>8}  {'TTFT mean/p50/p99 (ms)':<24}"
            f"{'TPOT p50/p99':<15}{'ITL p50/p99':<15}{'JCT mean/p50/p99 (ms)':<24}{'goodput':>8}")
    lines = [head, "-" * len(head)]
    ms = lambda d, k: f"{d[k] * 1e3:.0f}" if not math.isnan(d[k]) else "-"  # noqa: E731
    for run in runs:
        s = run["summary"]
        good = f"{s['goodput']:.2f}" if "goodput" in s else "-"
        lines.append(
            f"{run['label']:<26}{s['completed']:>6}{s['request_throughput']:>7.2f}{s['output_throughput']:>8.1f}  "
            f"{ms(s['ttft_s'], 'mean') + '/' + ms(s['ttft_s'], 'p50') + '/' + ms(s['ttft_s'], 'p99'):<24}"
            f"{ms(s['tpot_s'], 'p50') + '/' + ms(s['tpot_s'], 'p99'):<15}"
            f"{ms(s['itl_s'], 'p50') + '/' + ms(s['itl_s'], 'p99'):<15}"
            f"{ms(s['e2e_s'], 'mean') + '/' + ms(s['e2e_s'], 'p50') + '/' + ms(s['e2e_s'], 'p99'):<24}{good:>8}")
    return "\n".join(lines)


async def _main(args: argparse.Namespace, cfg: BusConfig) -> int:
    slo = None
    if args.slo_ttft_ms or args.slo_tpot_ms or args.slo_e2e_ms:
        slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    tokenizer = None
    if args.dataset == "sharegpt":
        from busserve.engine.model_loader import resolve_model_dir
        from busserve.tokenization import load_tokenizer

        tokenizer = load_tokenizer(resolve_model_dir(None)[0])
    samples = make_samples(args, tokenizer)
    load = LoadConfig(rate=args.rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                      seed=args.seed, timeout_s=args.timeout)
    cfg.max_reconnect_attempts = 0
    bus = await Bus.connect(cfg, name="busserve-bench")
    runs = []
    try:
        send = http_sender(args.http, args.model, args.timeout) if args.http else bus_sender(bus, args.timeout)
        strategies = [parse_strategy(s) for s in args.strategy] or [("", {})]
        for i, (name, params) in enumerate(strategies):
            label = "active strategy"
            if name:
                state = await set_strategy(bus, name, params)
                label = strategy_label(state.name, state.params)
            salt = None if args.reuse_prompts else f"{time.time_ns()}:{i}"
            runs.append(await bench_once(send, samples, load, args.warmup, not args.no_progress, label, slo, salt))
    finally:
        await bus.close()
    print(format_table(runs))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "config": {k: v for k, v in vars(args).items()
                                                                  if k != "func" and not k.startswith("nats")},
              "runs": runs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, default=str))
        print(f"results: {args.out}")
    if args.plot:
        from busserve.bench.plot import plot_cdfs

        print(f"plot: {plot_cdfs(runs, args.plot, f'{args.dataset}, rate {args.rate} req/s')}")
    return 0 if all(r["summary"]["failed"] == 0 for r in runs) else 1


def run_bench_command(args: argparse.Namespace, cfg: BusConfig) -> int:
    try:
        return asyncio.run(_main(args, cfg))
    except (ConnectionError, ValueError) as exc:
        print(f"busserve bench: {exc}", file=sys.stderr)
        return 1

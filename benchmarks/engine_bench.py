"""Issue #3 benchmark: busserve's engine against transformers ``generate`` and ``generate_batch``, in one run,
on the same model, prompts and machine, with the machine's own ceilings measured beside them.

    .venv/bin/python benchmarks/engine_bench.py [--dtype float32] [--threads 2] [--out .bench/engine.json]

Workloads (greedy, ignore_eos): 16 requests of 128 prompt + 64 output tokens at concurrency 1, 4, 16, and 64
requests at 64; steady decode at batch 16; single-stream decode; TTFT of a 1,000-token prompt with its first 900
tokens cached vs not. busserve runs as a real engine process on an embedded nats-server; the client streams over
the bus. The transformers baselines run in this process with the same number of threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from busserve.bus.client import Bus
from busserve.engine.model_loader import load_model
from busserve.messages import Final, GenerateRequest, SamplingParams, TokenChunk
from busserve.testing import ProcessCluster

PROMPT_LEN, OUTPUT_LEN, N_REQ = 128, 64, 16


def machine_ceilings(dtype: torch.dtype) -> dict[str, float]:
    x = torch.empty(64 * 1024 * 1024)  # 256 MiB
    y = torch.empty_like(x)
    y.copy_(x)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    copy_gbs = 5 * 2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9
    rates = {}
    for m in (16, 512):
        a, w = torch.randn(m, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        for _ in range(3):
            a @ w.T
        n = 200 if m == 16 else 30
        t = time.perf_counter()
        for _ in range(n):
            a @ w.T
        rates[m] = 2 * m * 576 * 1536 * n / (time.perf_counter() - t) / 1e9
    return {"copy_gb_s": copy_gbs, "matmul_gflops_m16": rates[16], "matmul_gflops_m512": rates[512]}


def make_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Plain-text token ids (skip the first 100, where the special tokens live); random so no prefix is shared.
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(n)]


# ------------------------------------------------------------------ transformers baselines


def hf_baselines(model_dir: str, dtype: torch.dtype, prompts: list[list[int]]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    out: dict[str, Any] = {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
    cfg = GenerationConfig(max_new_tokens=OUTPUT_LEN, do_sample=False, eos_token_id=[], pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([prompts[0]]), generation_config=cfg)  # warm-up
        t = time.perf_counter()
        for p in prompts[:N_REQ]:
            model.generate(input_ids=torch.tensor([p]), generation_config=cfg)
        dt = time.perf_counter() - t
        out["generate_sequential"] = {"seconds": dt, "output_tok_s": N_REQ * OUTPUT_LEN / dt}
        # single-stream decode: the difference between 129 and 1 new tokens, per token
        one = GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=[], pad_token_id=0)
        many = GenerationConfig(max_new_tokens=129, do_sample=False, eos_token_id=[], pad_token_id=0)
        ids = torch.tensor([prompts[1]])
        t = time.perf_counter()
        model.generate(input_ids=ids, generation_config=one)
        t1 = time.perf_counter()
        model.generate(input_ids=ids, generation_config=many)
        t2 = time.perf_counter()
        out["generate_decode_tok_s"] = 128 / ((t2 - t1) - (t1 - t))
    cb_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="paged|sdpa").eval()
    runs = []
    for _ in range(2):  # best of two: the first includes transformers' own warm-up
        t = time.perf_counter()
        res = cb_model.generate_batch(inputs=prompts[:N_REQ], generation_config=cfg)
        dt = time.perf_counter() - t
        n = sum(len(r.generated_tokens) for r in res.values())
        runs.append({"seconds": dt, "output_tok_s": n / dt, "tokens": n})
    out["generate_batch"] = max(runs, key=lambda r: r["output_tok_s"])
    out["generate_batch_runs"] = runs
    return out


# ------------------------------------------------------------------ busserve


async def _one(bus: Bus, subject: str, ids: list[int], max_tokens: int, rid: str) -> dict[str, Any]:
    req = GenerateRequest(request_id=rid, prompt_token_ids=ids,
                          sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    stamps: list[float] = []
    async for ev in bus.generate(req, subject=subject, first_event_timeout_s=600):
        if isinstance(ev, TokenChunk):
            stamps.extend([time.perf_counter()] * len(ev.token_ids))
        elif not isinstance(ev, Final):
            raise RuntimeError(f"request failed: {ev}")
    return {"start": t0, "ttft": stamps[0] - t0, "stamps": stamps, "end": stamps[-1]}


async def _workload(bus: Bus, subject: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                    tag: str) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)

    async def run(i: int, p: list[int]) -> dict[str, Any]:
        async with sem:
            return await _one(bus, subject, p, max_tokens, f"{tag}-{i}")

    t = time.perf_counter()
    results = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
    dt = time.perf_counter() - t
    return {"seconds": dt, "output_tok_s": len(prompts) * max_tokens / dt,
            "ttft_p50_s": statistics.median(r["ttft"] for r in results)}


async def _steady_decode(bus: Bus, subject: str, vocab: int, batch: int) -> float:
    prompts = make_prompts(vocab, batch, 32, seed=99)
    results = await asyncio.gather(*(_one(bus, subject, p, 160, f"steady-{i}") for i, p in enumerate(prompts)))
    lo = max(r["stamps"][0] for r in results)  # everyone is decoding
    hi = min(r["stamps"][-1] for r in results)  # nobody has finished
    n = sum(sum(1 for s in r["stamps"] if lo < s <= hi) for r in results)
    return n / (hi - lo)


async def _ttft_cached_vs_uncached(bus: Bus, subject: str, vocab: int) -> dict[str, float]:
    shared = make_prompts(vocab, 1, 900, seed=7)[0]
    uncached, cached = [], []
    await _one(bus, subject, shared + make_prompts(vocab, 1, 100, seed=100)[0], 1, "warm-prefix")
    for i in range(3):
        fresh = make_prompts(vocab, 1, 1000, seed=200 + i)[0]
        uncached.append((await _one(bus, subject, fresh, 1, f"cold-{i}"))["ttft"])
        tail = make_prompts(vocab, 1, 100, seed=300 + i)[0]
        cached.append((await _one(bus, subject, shared + tail, 1, f"hot-{i}"))["ttft"])
    return {"uncached_s": statistics.median(uncached), "cached_s": statistics.median(cached)}


async def _single_stream(bus: Bus, subject: str, prompt: list[int]) -> float:
    r = await _one(bus, subject, prompt, 129, "single")
    gaps = [b - a for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    return 1 / statistics.mean(gaps)


async def busserve_runs(cluster: ProcessCluster, prompts: list[list[int]], prompts64: list[list[int]],
                        vocab: int) -> dict[str, Any]:
    bus = await Bus.connect(cluster.bus_config(), name="bench")
    subject = bus.subjects.engine_action("bench0", "generate")
    out: dict[str, Any] = {}
    try:
        await _workload(bus, subject, prompts[:2], 2, 4, "warmup")
        for c in (1, 4, 16):
            out[f"c{c}"] = await _workload(bus, subject, prompts[:N_REQ], c, OUTPUT_LEN, f"c{c}")
        out["c64_64req"] = await _workload(bus, subject, prompts64, 64, OUTPUT_LEN, "c64")
        out["steady_decode_b16_tok_s"] = await _steady_decode(bus, subject, vocab, 16)
        out["single_stream_decode_tok_s"] = await _single_stream(bus, subject, prompts[1])
        out["ttft_1000_prefix900"] = await _ttft_cached_vs_uncached(bus, subject, vocab)
    finally:
        await bus.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=".bench/engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    loaded = load_model(None, dtype=dtype)
    vocab = len(loaded.tokenizer)
    prompts = make_prompts(vocab, N_REQ, PROMPT_LEN, seed=1)
    prompts64 = make_prompts(vocab, 64, PROMPT_LEN, seed=2)
    params = sum(p.numel() for p in loaded.model.parameters())
    elt = next(loaded.model.parameters()).element_size()
    cfg = loaded.model.config
    lm_head = cfg.vocab_size * cfg.hidden_size
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores", "threads": args.threads, "dtype": args.dtype, "model": loaded.name,
        "params": params, "ceilings": machine_ceilings(dtype),
    }
    del loaded
    c = result["ceilings"]
    # Decode reads every weight once per step (the tied embedding serves as lm_head): bytes/step over copy bandwidth.
    weight_bytes = params * elt
    c["decode_b1_ceiling_tok_s"] = c["copy_gb_s"] * 1e9 / 2 / weight_bytes  # copy moves 2 bytes per byte read
    flops_prompt_tok = 2 * (params - lm_head)
    flops_out_tok = 2 * params
    c["workload16_ceiling_tok_s"] = N_REQ * OUTPUT_LEN / (
        (N_REQ * PROMPT_LEN * flops_prompt_tok + N_REQ * OUTPUT_LEN * flops_out_tok) / (c["matmul_gflops_m512"] * 1e9))
    c["decode_b16_ceiling_tok_s"] = 16 / max(16 * flops_out_tok / (c["matmul_gflops_m16"] * 1e9),
                                             weight_bytes / (c["copy_gb_s"] * 1e9 / 2))
    if not args.skip_hf:
        from busserve.engine.model_loader import resolve_model_dir

        print("transformers baselines ...", file=sys.stderr, flush=True)
        result["transformers"] = hf_baselines(str(resolve_model_dir(None)[0]), dtype, prompts)
    print("busserve ...", file=sys.stderr, flush=True)
    with ProcessCluster() as cluster:
        cluster.start_engine("bench0", "--dtype", args.dtype, "--kv-memory", "2GiB", threads=args.threads)
        cluster.wait_engines({"bench0"})
        result["busserve"] = asyncio.run(busserve_runs(cluster, prompts, prompts64, vocab))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

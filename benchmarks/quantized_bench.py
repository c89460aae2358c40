"""Quantized weights against bf16, in one run on the same GGUF, prompts and cores.

    .venv/bin/python benchmarks/quantized_bench.py [--threads 2] [--skip-engine] [--out .bench/quantized.json]

1. The decode step's linear layers (every QuantLinear of the default model, 30 layers and the output projection)
   at batch 1-64: busserve's quantized kernel over the file's Q4_1/Q8_0 weights against the bf16 path the engine
   uses with ``--quantization none`` (oneDNN-packed weights, plus the AMX kernel where the CPU has AMX), beside
   the floor of bytes read over the machine's measured read bandwidth.
2. The engine end to end (a real engine process on an embedded nats-server, the client on the bus): one stream's
   decode rate and 16 concurrent streams' output rate, ``--quantization auto`` against ``none``, and against
   llama.cpp's server on the same GGUF with the same threads (``--llama-server PATH``, built from the
   llama-cpp-python sdist's vendored sources: ``cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build
   build --target llama-server``), 16 slots, prompt cache off, the same token ids; and the price of
   ``--deterministic`` on both.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from busserve.bus.client import Bus
from busserve.engine import quantized
from busserve.engine.model_loader import load_model
from busserve.engine.packed_linear import maybe_pack
from busserve.messages import Final, GenerateRequest, SamplingParams, TokenChunk
from busserve.testing import ProcessCluster

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def read_bandwidth_gb_s() -> float:
    """Bytes per second a sum over 512 MiB reads, best of 3, on the threads torch has."""
    x = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best / 1e9


def linear_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """(module, in_features) for every linear layer of a decode step, in model order."""
    return [(m, m.in_features) for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")
            and not isinstance(m, quantized.QuantEmbedding)]


def time_layers(layers: list[tuple[torch.nn.Module, int]], batch: int, repeats: int = 5) -> float:
    xs = {k: torch.randn(batch, k).to(torch.bfloat16) for k in {k for _, k in layers}}
    with torch.inference_mode():
        for m, k in layers:
            m(xs[k])
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for m, k in layers:
                m(xs[k])
            best = min(best, time.perf_counter() - t)
    return best


def linears_bench(threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    q = load_model(None, dtype=torch.bfloat16, quantization="auto")
    dense = load_model(None, dtype=torch.bfloat16, quantization="none")
    maybe_pack(dense.model, "auto")
    q_layers, d_layers = linear_layers(q.model), linear_layers(dense.model)
    q_bytes = sum(m.weight_q.nbytes for m, _ in q_layers)  # type: ignore[union-attr]
    d_bytes = sum(m.in_features * m.out_features * 2 for m, _ in d_layers)
    bw = read_bandwidth_gb_s()
    rows = []
    for b in BATCHES:
        tq, td = time_layers(q_layers, b), time_layers(d_layers, b)
        rows.append({"batch": b, "quantized_ms": tq * 1e3, "bf16_ms": td * 1e3, "speedup": td / tq,
                     "quantized_floor_ms": q_bytes / bw / 1e6, "bf16_floor_ms": d_bytes / bw / 1e6})
        print(f"  batch {b:3d}: quantized {tq * 1e3:6.1f} ms  bf16 {td * 1e3:6.1f} ms  x{td / tq:.2f}  "
              f"(floors {q_bytes / bw / 1e6:.1f} / {d_bytes / bw / 1e6:.1f} ms)", flush=True)
    return {"threads": threads, "read_bandwidth_gb_s": bw, "quantized_weight_mb": q_bytes / 1e6,
            "bf16_weight_mb": d_bytes / 1e6, "rows": rows}


async def _one(bus: Bus, subject: str, ids: list[int], max_tokens: int, rid: str) -> list[float]:
    req = GenerateRequest(request_id=rid, prompt_token_ids=ids,
                          sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    stamps: list[float] = []
    async for ev in bus.generate(req, subject=subject, first_event_timeout_s=600):
        if isinstance(ev, TokenChunk):
            stamps.extend([time.perf_counter()] * len(ev.token_ids))
        elif not isinstance(ev, Final):
            raise RuntimeError(f"request failed: {ev}")
    return stamps


async def _engine_runs(cluster: ProcessCluster, engine_id: str, prompts: list[list[int]]) -> dict[str, float]:
    bus = await Bus.connect(cluster.bus_config(), name="bench")
    subject = bus.subjects.engine_action(engine_id, "generate")
    try:
        await _one(bus, subject, prompts[0][:16], 4, f"{engine_id}-warm")
        singles = []
        for i in range(2):
            stamps = await _one(bus, subject, prompts[i], 128, f"{engine_id}-single-{i}")
            singles.append(1 / statistics.mean(b - a for a, b in itertools.pairwise(stamps)))
        t = time.perf_counter()
        await asyncio.gather(*(_one(bus, subject, p, 64, f"{engine_id}-c16-{i}") for i, p in enumerate(prompts)))
        c16 = len(prompts) * 64 / (time.perf_counter() - t)
    finally:
        await bus.close()
    return {"single_stream_tok_s": max(singles), "c16_output_tok_s": c16}


def _prompts() -> list[list[int]]:
    import random

    rng = random.Random(5)
    return [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(16)]


def llama_cpp_bench(binary: str, threads: int) -> dict[str, float]:
    """llama.cpp's server on the default GGUF: one stream's decode rate (its own timings) and 16 streams at once."""
    import subprocess
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from busserve.bus.embedded import free_port
    from busserve.engine.model_loader import default_gguf

    port = free_port()
    proc = subprocess.Popen([binary, "-m", str(default_gguf()), "-t", str(threads), "-tb", str(threads),
                             "-np", "16", "-c", str(16 * 256), "--host", "127.0.0.1", "--port", str(port),
                             "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(ids: list[int], n: int) -> dict[str, Any]:
        body = json.dumps({"prompt": ids, "n_predict": n, "temperature": 0.0, "ignore_eos": True,
                           "cache_prompt": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("llama-server did not come up") from None
                time.sleep(0.5)
        prompts = _prompts()
        post(prompts[0][:16], 4)
        single = max(post(prompts[i], 128)["timings"]["predicted_per_second"] for i in range(2))
        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: post(p, 64), prompts))
        c16 = len(prompts) * 64 / (time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"  llama.cpp server: single stream {single:.1f} tok/s, 16 streams {c16:.1f} tok/s", flush=True)
    return {"single_stream_tok_s": single, "c16_output_tok_s": c16}


def engine_bench(threads: int, llama_server: str | None) -> dict[str, Any]:
    prompts = _prompts()
    out: dict[str, Any] = {}
    if llama_server:
        out["llama.cpp"] = llama_cpp_bench(llama_server, threads)
    # auto twice: the first and last runs show the drift of the machine.
    for mode, extra in (("auto", ()), ("none", ()), ("none", ("--deterministic",)), ("auto", ("--deterministic",)),
                        ("auto", ())):
        label = " ".join([f"--quantization {mode}", *extra])
        with ProcessCluster() as cluster:
            eid = f"q-{mode}{'-det' if extra else ''}"
            cluster.start_engine(eid, "--quantization", mode, "--dtype", "bfloat16", *extra, threads=threads)
            cluster.wait_engines({eid})
            r = asyncio.run(_engine_runs(cluster, eid, prompts))
        print(f"  {label}: single stream {r['single_stream_tok_s']:.1f} tok/s, "
              f"16 streams {r['c16_output_tok_s']:.1f} tok/s", flush=True)
        out.setdefault(label, []).append(r)
    if llama_server:
        out["llama.cpp, again"] = llama_cpp_bench(llama_server, threads)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary, to run beside busserve")
    ap.add_argument("--out", default=".bench/quantized.json")
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    for threads in sorted({1, args.threads}):
        print(f"linear layers of a decode step, {threads} thread(s):", flush=True)
        result[f"linears_{threads}t"] = linears_bench(threads)
    if not args.skip_engine:
        print(f"engine, {args.threads} threads:", flush=True)
        result["engine"] = engine_bench(args.threads, args.llama_server)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

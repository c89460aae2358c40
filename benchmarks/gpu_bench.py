"""The GPU benchmarks of scripts/gpu_check.sh, each beside its ceiling, written as JSON and markdown.

    python3 benchmarks/gpu_bench.py --out $OUT [--quick]

* **ceilings**: device-to-device copy bandwidth (bytes read + written per second) and a bf16 8192³ matmul rate;
* **decode TPOT** of one engine (busserve's EngineCore, in process) on a random-weight Llama-3.1-8B-shaped model
  (32 layers, 4096 wide, GQA 32/8; ``--quick``: 8 layers) at batch 1/8/32/128 (quick: 1/32), per
  attention backend, against the floor ``weight bytes / copy bandwidth``;
* **prefill** tokens/s of one 4,096-token prompt (quick: 2,048) against ``2 · params · tokens / matmul rate``;
* **KV movement**: the Triton pack and unpack kernels (a layer's pages ↔ a contiguous buffer) against the copy
  bandwidth, and the ``bus`` transport's host staging (device pool → pinned host → device pool) per layer.

The model is built on the device from its config (no weights on disk); the numbers are the engine's own steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from busserve.engine.engine_core import EngineCore
from busserve.engine.main import EngineOptions, build_core
from busserve.engine.model_loader import LoadedModel
from busserve.engine.requests import GenerateCmd
from busserve.messages import SamplingParams

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=8192, rope_theta=500000.0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn: Any, reps: int, warmup: int = 3) -> float:
    """Mean seconds per call over ``reps`` calls after ``warmup``, the device drained before and after."""
    for _ in range(warmup):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t) / reps


def ceilings(device: str, scale: int) -> dict[str, float]:
    n = (1 << 30) // scale  # 1 GiB each way on the GPU
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), 10)
    m = 8192 // scale
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    mm_s = _time(lambda: x @ y, 10)
    return {"copy_bytes_per_s": 2 * n / copy_s, "bf16_flops_per_s": 2 * m**3 / mm_s}


def llama_8b_shaped(layers: int, device: str, width: int = 1) -> LoadedModel:
    """Llama-3.1-8B's shape with random weights, built on the device, and the default model's tokenizer (its
    49,152-token vocabulary stands in for Llama's 128,256: 0.3 of 8 billion parameters fewer in the output layer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from busserve.engine.attention import ATTN_IMPLEMENTATION
    from busserve.engine.model_loader import converted_gguf_dir, default_gguf

    given = os.environ.get("BUSSERVE_TOKENIZER_DIR")
    tokenizer = AutoTokenizer.from_pretrained(given or str(converted_gguf_dir(default_gguf())))
    shape = dict(LLAMA_8B)
    for key in ("hidden_size", "intermediate_size"):
        shape[key] //= width  # --smoke: a narrower model (head_dim 32 instead of 128)
    for key in ("num_attention_heads", "num_key_value_heads"):
        shape[key] //= min(width, 4)
    config = LlamaConfig(num_hidden_layers=layers, vocab_size=len(tokenizer), **shape)
    config._attn_implementation = ATTN_IMPLEMENTATION
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"llama-8b-shaped-{layers}l", path=Path("."),
                       eos_token_ids=set(), max_model_len=8192)


def _submit(core: EngineCore, n: int, max_tokens: int, rng: random.Random) -> None:
    vocab = int(core.loaded.model.config.vocab_size)
    rid = f"b{rng.randrange(1 << 30)}"
    core.submit(GenerateCmd(request_id=rid, token_ids=[rng.randrange(100, vocab) for _ in range(n)],
                            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                            stream_subject=f"bench.{rid}"))
    core._drain(block=False)  # the core is not started: apply the submission on this thread


def _busy(core: EngineCore) -> bool:
    return bool(core.scheduler.waiting) or any(s.is_prefill for s in core.scheduler.running)


def decode_tpot(core: EngineCore, batch: int, ctx: int, steps: int, rng: random.Random) -> float:
    for _ in range(batch):
        _submit(core, ctx, steps + 8, rng)
    while _busy(core):
        core.step()
    for _ in range(3):
        core.step()
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        core.step()
    _sync()
    elapsed = (time.perf_counter() - t) / steps
    for seq in list(core.scheduler.by_id.values()):
        core.finish(seq, "cancelled")
    return elapsed


def prefill_s(core: EngineCore, tokens: int, rng: random.Random) -> float:
    _submit(core, tokens, 1, rng)  # warm-up of this shape
    while core.scheduler.has_work:
        core.step()
    _submit(core, tokens, 1, rng)
    _sync()
    t = time.perf_counter()
    while _busy(core):
        core.step()
    _sync()
    elapsed = time.perf_counter() - t
    while core.scheduler.has_work:
        core.step()
    return elapsed


def kv_movement(copy_bw: float, device: str, scale: int) -> dict[str, float]:
    from busserve.kv.storage import KVLayout, KVStorage
    from busserve.triton_kernels.kv_pages import pack_kv, unpack_kv

    pages_n = 8192 // scale
    layout = KVLayout(num_layers=2, num_pages=pages_n, page_size=16, num_kv_heads=8, head_dim=128,
                      dtype=torch.bfloat16)
    pool = KVStorage(layout, device=device)
    pool.staged = True  # a CPU pool (--smoke) takes the device path too
    k, v = pool.layer_kv(0)
    tokens = pages_n * 4  # a quarter of the pool, scattered over it (32k tokens on the GPU)
    slots = torch.randperm(pages_n * 16, device=device)[:tokens]
    nbytes = 2 * tokens * 8 * 128 * 2
    buf = pack_kv(k, v, slots)
    reps = 20 if scale == 1 else 1
    pack = _time(lambda: pack_kv(k, v, slots, out=buf), reps, warmup=1)
    unpack = _time(lambda: unpack_kv(buf, k, v, slots), reps, warmup=1)
    pages = list(range(tokens // 16))
    staged = _time(lambda: pool.write_positions(0, pages, 0, tokens, pool.read_positions(1, pages, 0, tokens)),
                   5 if scale == 1 else 1, warmup=1)
    pool.close()
    # Pack and unpack read and write ``nbytes`` each, like the copy the bandwidth was measured with.
    return {"pack_bytes_per_s": 2 * nbytes / pack, "unpack_bytes_per_s": 2 * nbytes / unpack,
            "pack_vs_copy": 2 * nbytes / pack / copy_bw, "unpack_vs_copy": 2 * nbytes / unpack / copy_bw,
            "bus_staging_bytes_per_s": nbytes / staged}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="8 layers, batches 1 and 32, a 2,048-token prompt")
    ap.add_argument("--smoke", action="store_true",
                    help="a toy run on the CPU (Triton under TRITON_INTERPRET=1) that checks the script, not speed")
    args = ap.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the flag when its kernels are defined, some of them at import: start again with it set.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    if args.smoke:
        device, scale, layers, batches, steps, tokens = "cpu", 64, 2, [1, 4], 2, 64
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--smoke checks the script on a CPU)")
        return 2
    else:
        device, scale = "cuda", 1
        layers, batches, steps, tokens = (8, [1, 32], 10, 2048) if args.quick else (32, [1, 8, 32, 128], 20, 4096)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                              "quick": args.quick}
    result["ceilings"] = ceil = ceilings(device, scale)
    print(json.dumps(ceil), flush=True)
    result["kv"] = kv_movement(ceil["copy_bytes_per_s"], device, scale)
    print(json.dumps(result["kv"]), flush=True)
    loaded = llama_8b_shaped(layers, device, width=1 if scale == 1 else 16)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    params = sum(p.numel() for p in loaded.model.parameters())
    floor_s = weight_bytes / ceil["copy_bytes_per_s"]  # every weight byte read once per step, at the copy's rate
    result["model"] = {"layers": layers, "weight_bytes": weight_bytes, "decode_floor_s": floor_s}
    backends = ["triton"] + (["flashinfer"] if device == "cuda" and importlib.util.find_spec("flashinfer") else [])
    rng = random.Random(0)
    result["decode"], result["prefill"] = [], []
    for backend in backends:
        core = build_core(EngineOptions(engine_id=f"bench-{backend}", device=device, dtype="bfloat16",
                                        kv_pages=20480 // scale,  # 128 × (2,048 + 20) tokens fit attention=backend, transports=(),
                                        max_batch_tokens=8192, max_running=256), loaded)
        for batch in batches:
            tpot = decode_tpot(core, batch, 512 // scale * 4, steps, rng)
            row = {"backend": backend, "batch": batch, "tpot_s": tpot, "vs_floor": tpot / floor_s}
            result["decode"].append(row)
            print(json.dumps(row), flush=True)
        secs = prefill_s(core, tokens, rng)
        result["prefill"].append({"backend": backend, "tokens": tokens, "tokens_per_s": tokens / secs,
                                  "vs_matmul_rate": (2 * params * tokens / secs) / ceil["bf16_flops_per_s"]})
        print(json.dumps(result["prefill"][-1]), flush=True)
        core.kv.close()
        del core
        if device == "cuda":
            torch.cuda.empty_cache()
    (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu_bench.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    c = r["ceilings"]
    lines = [f"# GPU benchmarks — {r['device']}, torch {r['torch']}, {r['date']}{' (quick)' if r['quick'] else ''}",
             "", f"Copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + written); bf16 matmul "
             f"{c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.", "",
             f"Model: Llama-3.1-8B-shaped, {r['model']['layers']} layers, {r['model']['weight_bytes'] / 1e9:.1f} GB "
             f"bf16; decode floor {r['model']['decode_floor_s'] * 1e3:.2f} ms (weight bytes / read bandwidth).", "",
             "| backend | batch | TPOT ms | × floor |", "|---|---|---|---|"]
    lines += [f"| {d['backend']} | {d['batch']} | {d['tpot_s'] * 1e3:.2f} | {d['vs_floor']:.2f} |" for d in r["decode"]]
    lines += ["", "| backend | prompt tokens | tokens/s | share of matmul rate |", "|---|---|---|---|"]
    lines += [f"| {p['backend']} | {p['tokens']} | {p['tokens_per_s']:.0f} | {p['vs_matmul_rate']:.2f} |"
              for p in r.get("prefill", [])]
    kv = r["kv"]
    lines += ["", f"KV: pack {kv['pack_bytes_per_s'] / 1e12:.2f} TB/s ({kv['pack_vs_copy']:.0%} of copy), unpack "
              f"{kv['unpack_bytes_per_s'] / 1e12:.2f} TB/s ({kv['unpack_vs_copy']:.0%}); bus staging through host "
              f"{kv['bus_staging_bytes_per_s'] / 1e9:.1f} GB/s per layer.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

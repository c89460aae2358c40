"""Decode-step time of one engine on one core, by batch size and context length, plus a torch.profiler table.

Why it exists: in the paper experiment (docs/BENCHMARKS.md, issue #7) the decode engine's TPOT sets how much of each
long prompt it can afford to prefill; this measures its decode step at that shape, in process (no bus), so the
numbers are the engine's own. Drives an EngineCore on this thread: submit, prefill until every sequence decodes,
then time ``--steps`` pure decode steps.

    taskset -c 1 .venv/bin/python benchmarks/decode_step_profile.py --shapes 1x128,1x1000,5x128,5x1000,8x1000

``--attention torch,cpu`` (the default) times the same shapes through each decode-attention backend side by side,
in one process, alternating backends shape by shape so that drift on a shared machine hits both alike.

``--linear torch,auto`` does the same for the linear layers: torch's ``F.linear`` against weights packed once by
oneDNN (busserve/engine/packed_linear.py), each on its own copy of the model.

``--mixed 4x1000`` instead times steps that carry prompt tokens beside those decoders — a 1,024-token prompt in
chunks of 32…1,024 tokens — and the same prompt with nobody decoding: what a prompt token costs a decode engine.
benchmarks/strategy_model.py's cost model is fitted to it.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from busserve.engine.engine_core import EngineCore
from busserve.engine.main import EngineOptions, build_core
from busserve.engine.model_loader import LoadedModel
from busserve.engine.requests import GenerateCmd
from busserve.messages import SamplingParams


def _submit(core: EngineCore, ctx: int, max_tokens: int, rng: random.Random) -> None:
    vocab = int(core.loaded.model.config.vocab_size)
    rid = f"c{ctx}-{rng.randrange(1 << 30)}"
    core.submit(GenerateCmd(request_id=rid, token_ids=[rng.randrange(vocab) for _ in range(ctx)],
                            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                            stream_subject=f"bench.{rid}"))
    core._drain(block=False)  # the core is not started: apply the submission on this thread


def _prefilling(core: EngineCore) -> bool:
    return bool(core.scheduler.waiting) or any(s.is_prefill for s in core.scheduler.running)


def _start_decoders(core: EngineCore, batch: int, ctx: int, max_tokens: int, rng: random.Random) -> None:
    """``batch`` sequences of ``ctx`` tokens, prefilled and past their first (allocating) decode step."""
    for _ in range(batch):
        _submit(core, ctx, max_tokens, rng)
    while _prefilling(core):
        core.step()
    core.step()  # untimed: the first decode step after a prefill allocates


def _drop_all(core: EngineCore) -> None:
    for seq in list(core.scheduler.by_id.values()):
        core.finish(seq, "cancelled")


def decode_step_s(core: EngineCore, batch: int, ctx: int, steps: int, rng: random.Random,
                  profile: bool = False) -> float:
    _start_decoders(core, batch, ctx, steps + 8, rng)
    start = time.perf_counter()
    if profile:
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                core.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    else:
        for _ in range(steps):
            core.step()
    elapsed = (time.perf_counter() - start) / steps
    _drop_all(core)
    return elapsed


def mixed_steps(core: EngineCore, batch: int, ctx: int, chunks: list[int], rng: random.Random,
                prompt: int = 1024) -> None:
    """Step time while a ``prompt``-token prefill runs in chunks beside ``batch`` decoders of ``ctx`` tokens."""
    config = core.scheduler.config
    budget = config.max_batch_tokens
    print(f"| prompt tokens per step | ms per step, {batch} decoders × {ctx} | ms per step, no decoders |")
    print("|---|---|---|")
    try:
        for chunk in chunks:
            row = []
            for decoders in (batch, 0):
                if not decoders and not chunk:
                    row.append("–")
                    continue
                config.max_batch_tokens = max(budget, prompt)
                _start_decoders(core, decoders, ctx, 10_000, rng)
                config.max_batch_tokens = decoders + chunk
                if chunk:
                    _submit(core, prompt, 2, rng)
                steps, start = 0, time.perf_counter()
                while _prefilling(core) or (not chunk and steps < 10):
                    core.step()
                    steps += 1
                row.append(f"{(time.perf_counter() - start) / steps * 1e3:.1f}")
                _drop_all(core)
            print(f"| {chunk} | {row[0]} | {row[1]} |", flush=True)
    finally:
        config.max_batch_tokens = budget


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1x128,1x1000,5x128,5x1000,8x1000", help="BATCHxCONTEXT,...")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention", default="torch,cpu", help="decode backends to compare, comma-separated")
    ap.add_argument("--linear", default="auto",
                    help="linear-layer modes to compare, comma-separated (auto = oneDNN-packed weights, torch)")
    ap.add_argument("--quantization", default="none",
                    help="weight modes to compare, comma-separated (none, auto = the GGUF's own quantized types)")
    ap.add_argument("--profile", metavar="BATCHxCONTEXT",
                    help="also print torch.profiler's table for this shape (through the last backend listed)")
    ap.add_argument("--mixed", metavar="BATCHxCONTEXT",
                    help="time steps carrying prompt chunks beside these decoders instead (first backend listed)")
    ap.add_argument("--chunks", default="0,32,64,128,256,512,1024", help="prompt tokens per step, for --mixed")
    args = ap.parse_args()
    # One column per (attention, linear, quantization); a model is loaded once per weight mode (packing changes it).
    linears, quants = args.linear.split(","), args.quantization.split(",")
    variants = [(a, lin, q) for q in quants for lin in linears for a in args.attention.split(",")]
    names = ["+".join([a] + ([lin] if len(linears) > 1 else []) + ([q] if len(quants) > 1 else []))
             for a, lin, q in variants]
    cores: dict[str, EngineCore] = {}
    loaded_by_weights: dict[tuple[str, str], LoadedModel] = {}
    for name, (attention, linear, quant) in zip(names, variants, strict=True):
        opts = EngineOptions(engine_id=f"profile-{name}", threads=args.threads, dtype=args.dtype, transports=(),
                             attention=attention, linear=linear, quantization=quant)
        cores[name] = build_core(opts, loaded_by_weights.get((linear, quant)))
        loaded_by_weights[(linear, quant)] = cores[name].loaded
    rng = random.Random(0)
    if args.mixed:
        b, c = (int(x) for x in args.mixed.split("x"))
        mixed_steps(cores[names[0]], b, c, [int(x) for x in args.chunks.split(",")], rng)
        return 0
    print("| batch x context | " + " | ".join(f"{n} (ms/step)" for n in names)
          + "".join(f" | {n} / {names[0]}" for n in names[1:]) + " |")
    print("|---" * (2 * len(names)) + "|")
    for shape in args.shapes.split(","):
        b, c = (int(x) for x in shape.split("x"))
        ms = [decode_step_s(cores[n], b, c, args.steps, rng) * 1e3 for n in names]
        print(f"| {b} x {c} | " + " | ".join(f"{m:.1f}" for m in ms)
              + "".join(f" | {m / ms[0]:.2f}" for m in ms[1:]) + " |", flush=True)
    if args.profile:
        b, c = (int(x) for x in args.profile.split("x"))
        decode_step_s(cores[names[-1]], b, c, args.steps, rng, profile=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

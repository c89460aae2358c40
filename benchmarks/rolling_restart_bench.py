"""A rolling restart of `busserve up` under a steady load: requests failed, and inter-token latency during the
restart against before it.

    .venv/bin/python benchmarks/rolling_restart_bench.py [--rate 1.0] [--tokens 96] [--warmup-s 20] [--after-s 10]

Starts `busserve up` (two SmolLM2-135M engines, one core each; router least_loaded) as a child process, then sends
chat-sized requests (a short instruction, ``--tokens`` greedy output tokens) at ``--rate`` per second, Poisson,
read on the wire (``busserve.testing.Wire``: every stream checked for one terminal event and contiguous indices).
After ``--warmup-s`` it sends SIGHUP: `busserve up` drains e0 (its running requests migrate live to e1), restarts it,
waits until it serves, then does the same with e1. The load goes on until ``--after-s`` after the log says the
restart is done. ITL = the gap between consecutive token events of a stream, filed under the window its later
token falls in: before the SIGHUP, or during the restart.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from busserve.bench.metrics import percentile
from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.messages import Final
from busserve.security.server_config import stack_identity_config
from busserve.testing import Wire


def wait_for(log: Path, text: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> float:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"`busserve up` never said {text!r}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return time.monotonic()


async def drive(args: argparse.Namespace, cfg: BusConfig, proc: subprocess.Popen[bytes], log: Path, tokenizer) -> dict:  # type: ignore[no-untyped-def]
    bus = await Bus.connect(cfg, name="rolling-restart-bench")
    rng = random.Random(7)
    topics = ["a lighthouse", "the moon", "a river", "bread", "a violin", "winter", "bees", "a library"]
    try:
        async with Wire(bus) as wire:
            t_start = time.monotonic()
            hup_at = done_at = None
            i = 0
            next_at = t_start
            while True:
                now = time.monotonic()
                if hup_at is None and now - t_start >= args.warmup_s:
                    os.kill(proc.pid, signal.SIGHUP)
                    hup_at = now
                if hup_at is not None and done_at is None and "rolling restart done" in log.read_text(
                        errors="replace"):
                    done_at = now
                if done_at is not None and now - done_at >= args.after_s:
                    break
                if hup_at is not None and now - hup_at > 600:
                    raise RuntimeError("the rolling restart took over 10 minutes")
                if now >= next_at:
                    text = tokenizer.apply_chat_template(
                        [{"role": "user", "content": f"Write about {rng.choice(topics)} (note {i})."}],
                        add_generation_prompt=True, tokenize=False)
                    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                    await wire.send(f"q{i}", ids, args.tokens)
                    i += 1
                    next_at += rng.expovariate(args.rate)
                await asyncio.sleep(0.01)
            await wire.all_ended(timeout_s=300)
        wire.check_all()
        assert hup_at is not None and done_at is not None
        failed = [s.label for s in wire.streams.values() if not isinstance(s.terminal, Final)]
        itl = {"before": [], "during": []}
        for s in wire.streams.values():
            times = s.token_times()
            for a, b in itertools.pairwise(times):
                if b < hup_at:
                    itl["before"].append(b - a)
                elif b <= done_at:
                    itl["during"].append(b - a)
        return {"requests": len(wire.streams), "failed": failed, "restart_s": done_at - hup_at,
                "itl_before_p50": percentile(itl["before"], 50), "itl_before_p99": percentile(itl["before"], 99),
                "itl_during_p50": percentile(itl["during"], 50), "itl_during_p99": percentile(itl["during"], 99),
                "itl_during_max": max(itl["during"], default=float("nan"))}
    finally:
        await bus.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--warmup-s", type=float, default=20.0)
    ap.add_argument("--after-s", type=float, default=10.0)
    ap.add_argument("--out", default=".bench/rolling_restart.json")
    args = ap.parse_args()
    from busserve.engine.model_loader import resolve_model_dir
    from busserve.tokenization import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_dir(None)[0])
    state = Path(".bench/rolling-restart-state")
    state.mkdir(parents=True, exist_ok=True)
    log = state / "up.log"
    env = {**os.environ, "BUSSERVE_STATE_DIR": str(state.resolve())}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "busserve.cli", "up", "--http-port", "0"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(log, "ready:", 600, proc)
        up_state = json.loads((state / "up.json").read_text())
        cfg = stack_identity_config(up_state, "client", BusConfig(servers=[up_state["nats_url"]]))
        time.sleep(1.5)
        result = asyncio.run(drive(args, cfg, proc, log, tokenizer))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text(errors="replace")
    result["migrations"] = text.count("migration of ") - text.count("not done")
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    result["args"] = vars(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['requests']} requests, {len(result['failed'])} failed; restart of both engines took "
          f"{result['restart_s']:.1f} s with {result['migrations']} live migrations; ITL p50/p99 before "
          f"{result['itl_before_p50'] * 1e3:.0f}/{result['itl_before_p99'] * 1e3:.0f} ms, during "
          f"{result['itl_during_p50'] * 1e3:.0f}/{result['itl_during_p99'] * 1e3:.0f} ms "
          f"(max {result['itl_during_max'] * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

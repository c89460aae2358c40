"""Prefill/decode disaggregation across hosts against the same on one host: TTFT and JCT of one workload, side by side
in one run.

    .venv/bin/python benchmarks/pd_hosts_bench.py [--num-prompts 24] [--rate 0.4]   (as root)

The same two engines (SmolLM2-135M, bf16, one thread each; P with role prefill, D with role decode), one router with
``pd`` and the same ``busserve bench`` workload (``--dataset long``: prompts ~N(1024, 256) tokens, ~32 out, Poisson
arrivals, the same seed) in three layouts:

* ``one host``: every process on this machine, nats-server on loopback; P and D share /dev/shm, so KV goes by
  ``shm`` (the router's choice);
* ``hosts, mooncake``: P on host 0, D on host 1, nats-server, router and load generator on host 2 (network
  namespaces joined by veths, ``busserve.bench.hosts``, each with its own /dev/shm); KV by Mooncake's one-sided
  writes;
* ``hosts, bus``: the same hosts with the engines offering only ``bus``: KV through nats-server;
* ``one host`` again, last: what the machine itself drifted by during the run.

Every layout runs on the same two cores, so what differs is the path of KV and of every bus message, not the
compute. Results also go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
ENGINE = ["--threads", "1", "--dtype", "bfloat16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_conf(path: Path, host: str, port: int) -> Path:
    store = path.parent / f"js-{port}"
    path.write_text(f'listen: "{host}:{port}"\nmax_payload: 8MB\nmax_pending: 256MB\n'
                    f'jetstream: {{ store_dir: "{store}" }}\n')
    return path


def run_layout(name: str, start: Callable[[int, list[str], Path, dict[str, str]], subprocess.Popen[bytes]],
               run: Callable[[int, list[str], float, dict[str, str]], subprocess.CompletedProcess[str]],
               hosts_of: dict[str, int], url: str, transports: list[str], args: argparse.Namespace,
               logs: Path) -> dict[str, Any]:
    """Start nats, P, D and the router where ``hosts_of`` says, run the workload, return its summary."""
    from busserve.bus.embedded import nats_server_binary

    env = {"BUSSERVE_NATS_URL": url, "PYTHONPATH": str(REPO)}
    host, port = url.removeprefix("nats://").split(":")
    procs = [start(hosts_of["nats"], [str(nats_server_binary()), "-c",
                                      str(nats_conf(logs / f"{name}-nats.conf", host, int(port)))],
                   logs / f"{name}-nats.log", env)]
    time.sleep(0.5)
    cli = [sys.executable, "-m", "busserve.cli"]
    flags = [a for t in transports for a in ("--transport", t)]
    for eid, role in (("P", "prefill"), ("D", "decode")):
        procs.append(start(hosts_of[eid], [*cli, "engine", "--id", eid, "--roles", role, *ENGINE, *flags],
                           logs / f"{name}-{eid}.log", env))
    procs.append(start(hosts_of["router"], [*cli, "router", "--id", "r0", "--strategy", "pd"],
                       logs / f"{name}-router.log", env))
    # Serving: one short request through the router, retried (bounded) while the engines load.
    deadline = time.monotonic() + 300
    while True:
        probe = run(hosts_of["driver"], [*cli, "generate", "--max-tokens", "2", "hello"], 60, env)
        if probe.returncode == 0:
            break
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit(f"{name}: the cluster did not serve: {probe.stderr[-2000:]}"
                             + "".join(p.read_text()[-1500:] for p in logs.glob(f"{name}-*.log")))
        time.sleep(2)
    out = logs / f"{name}.json"
    bench = run(hosts_of["driver"], [*cli, "bench", "--dataset", "long", "--num-prompts", str(args.num_prompts),
                                     "--rate", str(args.rate), "--seed", str(args.seed), "--warmup", "2",
                                     "--no-progress", "--out", str(out)], 1800, env)
    if bench.returncode != 0:
        raise SystemExit(f"{name}: bench failed: {bench.stdout[-2000:]} {bench.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(out.read_text())["runs"][0]["summary"]
    p_log = (logs / f"{name}-P.log").read_text(errors="replace")
    summary["kv_by_mooncake"] = "mooncake: writing KV into D" in p_log
    summary["fell_back"] = "instead" in p_log  # a sender that could not use the router's choice says so
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--rate", type=float, default=0.3, help="requests per second (Poisson)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".bench/pd_hosts.json")
    args = ap.parse_args()

    from busserve.bench.hosts import Hosts, unavailable
    from busserve.kv.transfer.mooncake import unavailable as mooncake_unavailable

    for why in (unavailable(), mooncake_unavailable()):
        if why:
            raise SystemExit(f"cannot run here: {why}")
    results: dict[str, Any] = {}
    logs = Path(args.out).with_suffix(".logs")
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    local: list[subprocess.Popen[bytes]] = []

    def start_here(_: int, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, cwd=REPO,
                                    env={**os.environ, **env}, start_new_session=True)
        local.append(proc)
        return proc

    def run_here(_: int, argv: list[str], timeout_s: float, env: dict[str, str]
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
                              env={**os.environ, **env})

    def one_host(label: str) -> None:
        try:
            one = dict.fromkeys(("nats", "P", "D", "router", "driver"), 0)
            results[label] = run_layout(label.split()[0] + str(len(results)), start_here, run_here, one,
                                        f"nats://127.0.0.1:{free_port()}", ["shm", "bus"], args, logs)
        finally:  # clients of the bus first, its server last
            for p in reversed(local):
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    print(f"{p.args[3:5]} did not stop within 30 s of SIGTERM: killed (logs in {logs})")
                    p.kill()
                    p.wait(timeout=10)
            local.clear()

    one_host("one host (shm)")
    spread = {"P": 0, "D": 1, "nats": 2, "router": 2, "driver": 2}
    for label, transports in (("hosts (mooncake)", ["bus", "mooncake"]), ("hosts (bus)", ["bus"])):
        with Hosts(3) as hosts:
            def start_there(i: int, argv: list[str], log: Path, env: dict[str, str],
                            h: Hosts = hosts) -> subprocess.Popen[bytes]:
                return h.popen(i, argv, log=log, env=env, cwd=REPO)

            def run_there(i: int, argv: list[str], timeout_s: float, env: dict[str, str],
                          h: Hosts = hosts) -> subprocess.CompletedProcess[str]:
                return h.run(i, argv, timeout_s, env=env)

            tag = label.split("(")[1].rstrip(")")
            results[label] = run_layout(tag, start_there, run_there, spread,
                                        f"nats://{hosts.address(2)}:4222", transports, args, logs)
    one_host("one host (shm), again")  # brackets the hosts runs: drift of the machine shows as a difference
    print(f"\n--dataset long, {args.num_prompts} requests at {args.rate} req/s, pd over P (prefill) and D (decode)\n")
    print("| layout | TTFT mean / p50 / p99 (ms) | TPOT mean (ms) | JCT mean / p50 / p99 (s) | failed |\n"
          "|---|---|---|---|---|")
    for label, s in results.items():
        t, e = s["ttft_s"], s["e2e_s"]
        print(f"| {label} | {t['mean'] * 1e3:.0f} / {t['p50'] * 1e3:.0f} / {t['p99'] * 1e3:.0f} | "
              f"{s['tpot_s']['mean'] * 1e3:.1f} | {e['mean']:.2f} / {e['p50']:.2f} / {e['p99']:.2f} | {s['failed']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                          "layouts": results}, indent=1))


if __name__ == "__main__":
    main()

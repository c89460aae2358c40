"""KV bandwidth between hosts per transport (``bus``, ``mooncake``) beside the link's own TCP throughput, measured in
the same run.

    .venv/bin/python benchmarks/cross_host_transfer_bench.py [--context 2000] [--reps 3]   (as root)

Hosts are network namespaces on one machine (``busserve.bench.hosts``: a veth each on a private bridge, their own
/dev/shm): engine A (sender) on host 0, engine B (receiver) on host 1, nats-server and the driver on host 2. Both
engines run SmolLM2-135M with one thread and offer ``bus`` and ``mooncake``. Per transport: A computes and caches a
``--context``-token prompt, then B receives it (prep_recv on B, remote_send from A's cache, start_generate on B);
bandwidth = bytes / the sender's own remote_send time (first byte computed or cached to last byte landed). The
baseline is one Python TCP socket streaming the same number of bytes from host 0 to host 1 (the ceiling a
single-connection transport can reach over this link). Results also go to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def tcp_sink(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1)
        while True:
            conn, _ = s.accept()
            with conn:
                buf = bytearray(4 << 20)
                while conn.recv_into(buf):
                    pass
                conn.sendall(b"k")


def tcp_source(host: str, port: int, nbytes: int) -> float:
    payload = memoryview(bytearray(4 << 20))
    with socket.create_connection((host, port), timeout=30) as s:
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            sent += s.send(payload[: min(len(payload), nbytes - sent)])
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink has read everything
        return nbytes / (time.perf_counter() - t0) / 1e9


async def drive(context: int, reps: int) -> dict[str, Any]:
    sys.path.insert(0, str(HERE.parent))
    from transfer_bench import migrate, tokens, ttft  # type: ignore[import-not-found]

    from busserve.bus.client import Bus
    from busserve.bus.config import BusConfig
    from busserve.router.cluster import Timeouts
    from busserve.testing import live_view

    bus = await Bus.connect(BusConfig.from_env(), name="cross-host-bench")
    out: dict[str, Any] = {}
    try:
        view = await live_view(bus, {"A", "B"}, timeouts=Timeouts(lease_s=600))
        for k, transport in enumerate(("bus", "mooncake")):
            runs = []
            for r in range(reps + 1):  # the first warms the path (connections, page faults): not counted
                prompt = tokens(context + 1, 1000 * k + r)
                await ttft(bus, "A", prompt)
                await asyncio.sleep(0.3)  # A's KV events reach the view
                m = await migrate(bus, view.get("A"), view.get("B"), prompt, context, transport)
                assert m["computed_tokens"] == 0, m  # A sent from its cache
                if r:
                    runs.append(m)
            gb_s = [x["bytes"] / x["sender_reported_s"] / 1e9 for x in runs]
            out[transport] = {"bytes": runs[0]["bytes"], "gb_s": gb_s, "gb_s_median": statistics.median(gb_s),
                              "to_first_token_s": statistics.median(x["to_first_token_s"] for x in runs)}
    finally:
        await bus.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=".bench/cross_host_transfer.json")
    ap.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tcp-sink", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--tcp-source", nargs=3, metavar=("HOST", "PORT", "BYTES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tcp_sink:
        tcp_sink(args.tcp_sink[0], int(args.tcp_sink[1]))
        return
    if args.tcp_source:
        print(json.dumps(tcp_source(args.tcp_source[0], int(args.tcp_source[1]), int(args.tcp_source[2]))))
        return
    if args.drive:
        print(json.dumps(asyncio.run(drive(args.context, args.reps))))
        return

    from busserve.bench.hosts import Hosts, unavailable
    from busserve.bus.embedded import nats_server_binary
    from busserve.kv.transfer.mooncake import unavailable as mooncake_unavailable

    for why in (unavailable(), mooncake_unavailable()):
        if why:
            raise SystemExit(f"cannot run here: {why}")
    with tempfile.TemporaryDirectory() as d, Hosts(3) as hosts:
        logs = Path(d)
        url = f"nats://{hosts.address(2)}:4222"
        conf = logs / "nats.conf"
        conf.write_text(f'listen: "{hosts.address(2)}:4222"\nmax_payload: 8MB\nmax_pending: 256MB\n')
        hosts.popen(2, [str(nats_server_binary()), "-c", str(conf)], log=logs / "nats.log")
        env = {"BUSSERVE_NATS_URL": url}
        for i, eid in enumerate(("A", "B")):
            hosts.popen(i, [sys.executable, "-m", "busserve.cli", "engine", "--id", eid, "--threads", "1",
                            "--transport", "bus", "--transport", "mooncake"], log=logs / f"{eid}.log", env=env,
                        cwd=REPO)
        result = hosts.run(2, [sys.executable, str(HERE), "--drive", "--context", str(args.context),
                               "--reps", str(args.reps)], 1200, env={**env, "PYTHONPATH": str(REPO)})
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:] + "".join(p.read_text()[-1500:] for p in logs.glob("*.log")))
        transports = json.loads(result.stdout.strip().splitlines()[-1])
        nbytes = transports["bus"]["bytes"]
        hosts.popen(1, [sys.executable, str(HERE), "--tcp-sink", hosts.address(1), "5201"])
        time.sleep(0.5)
        tcp = []
        for _ in range(args.reps):
            run = hosts.run(0, [sys.executable, str(HERE), "--tcp-source", hosts.address(1), "5201",
                                str(nbytes)], 120)
            tcp.append(json.loads(run.stdout.strip().splitlines()[-1]))
    tcp_med = statistics.median(tcp)
    for name, r in transports.items():
        print(f"{name:9s} {r['gb_s_median']:.3f} GB/s ({', '.join(f'{x:.3f}' for x in r['gb_s'])}; "
              f"{r['bytes'] / 1e6:.1f} MB) = {r['gb_s_median'] / tcp_med * 100:.0f}% of TCP; "
              f"B's first token {r['to_first_token_s'] * 1e3:.0f} ms")
    print(f"TCP       {tcp_med:.3f} GB/s ({', '.join(f'{x:.3f}' for x in tcp)}) one socket, same bytes")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                          "transports": transports, "tcp_gb_s": tcp}, indent=1))


if __name__ == "__main__":
    main()

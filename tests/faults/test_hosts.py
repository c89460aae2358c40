"""busserve across hosts: three network namespaces (``busserve.bench.hosts``: one veth each on a private bridge,
its own /dev/shm, every host named alike), a 3-node NATS cluster with TLS routes and the generated grants, engines
on two hosts and routers on two, a client on the third. PD across hosts gives the tokens of one engine (KV by
mooncake where it loads, else over the bus — never shm: the shm domains differ though the host names agree); a NATS node killed under 16 streams costs none of
them, and both routers still agree on the strategy, before and after a switch; an engine id already serving on
another host is refused."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from busserve.bench.hosts import Hosts, unavailable
from busserve.bus.embedded import nats_server_binary
from busserve.engine.model_loader import LoadedModel
from busserve.kv.transfer.mooncake import unavailable as mooncake_unavailable
from busserve.security.server_config import Credentials
from busserve.tokenization import vocab_size

REPO = Path(__file__).resolve().parents[2]
WHY_NOT = unavailable() or (None if shutil.which("openssl") else "the TLS files need openssl")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=f"no hosts here: {WHY_NOT}")]
# The engines also offer mooncake where it loads: between hosts the router then picks it over the bus.
MOONCAKE = mooncake_unavailable() is None
ENGINE = ("--dtype", "float32", "--kv-pages", "512", "--max-batch-tokens", "64", "--threads", "1",
          *(("--transport", "shm", "--transport", "bus", "--transport", "mooncake") if MOONCAKE else ()))
PORT = 4222


@dataclass
class Lab:
    hosts: Hosts
    creds: Credentials
    env: dict[str, str]  # what every process here shares: the cluster's URLs and CA
    nats: list[subprocess.Popen[bytes]]
    logs: Path
    tiny_dir: Path

    def identity(self, name: str) -> dict[str, str]:
        return {**self.env, **self.creds.identities[name].env()}

    def busserve(self, host: int, name: str, *argv: str) -> subprocess.Popen[bytes]:
        return self.hosts.popen(host, [sys.executable, "-m", "busserve.cli", *argv], log=self.logs / f"{name}.log",
                                env=self.identity(name), cwd=REPO)

    def set_strategy(self, name: str) -> None:
        """Switch the strategy as an operator does, and wait (bounded) until both routers' heartbeats name it."""
        switch = self.hosts.run(0, [sys.executable, "-m", "busserve.cli", "strategy", "set", name], 60,
                                env=self.identity("operator"))
        assert switch.returncode == 0, switch.stdout + switch.stderr
        deadline = time.monotonic() + 15
        while (seen := self.client("alice", "--routers", "2.5")) != {"r0": name, "r1": name}:
            assert time.monotonic() < deadline, f"the routers do not agree on {name}: {seen}"

    def client(self, who: str, *argv: str, timeout_s: float = 180) -> dict[str, dict[str, object]]:
        out = self.hosts.run(0, [sys.executable, "-m", "tests.faults.hosts_client", *argv], timeout_s,
                             env={**self.identity(who), "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def lab(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("hosts")
    with Hosts(3) as hosts:
        addrs = [hosts.address(i) for i in range(3)]
        init = [sys.executable, "-m", "busserve.cli", "security", "init", str(root / "deploy"), "--tls",
                "--cluster", "3", "--host", "0.0.0.0", "--port", str(PORT),
                *[a for h in addrs for a in ("--node-host", h)], *[a for h in addrs for a in ("--tls-host", h)],
                "--engine", "P", "--engine", "D", "--router", "r0", "--router", "r1", "--client", "alice"]
        made = subprocess.run(init, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        deploy = root / "deploy"
        nats = [hosts.popen(i, [str(nats_server_binary()), "-c", str(deploy / f"node-{i + 1}.conf")],
                            log=root / f"nats-{i + 1}.log") for i in range(3)]
        env = {"BUSSERVE_NATS_URL": ",".join(f"tls://{a}:{PORT + i}" for i, a in enumerate(addrs)),
               "BUSSERVE_NATS_TLS_CA": str(deploy / "ca.pem")}
        lab = Lab(hosts, Credentials.load(deploy / "credentials.json"), env, nats, root, tiny_dir)
        lab.busserve(1, "P", "engine", "--id", "P", "--model", str(tiny_dir), "--roles", "prefill", *ENGINE)
        lab.busserve(2, "D", "engine", "--id", "D", "--model", str(tiny_dir), "--roles", "decode", *ENGINE)
        lab.busserve(0, "r0", "router", "--id", "r0", "--tokenizer", str(tiny_dir))
        lab.busserve(1, "r1", "router", "--id", "r1", "--tokenizer", str(tiny_dir))
        _wait_served(lab, root)
        lab.set_strategy("pd")
        yield lab


def _prompts(tiny: LoadedModel, n: int, length: int, seed: int, path: Path) -> Path:
    rng = random.Random(seed)
    vocab = vocab_size(tiny.tokenizer)
    path.write_text(json.dumps([[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]))
    return path


def _wait_served(lab: Lab, root: Path) -> None:
    probe = root / "probe.json"
    probe.write_text(json.dumps([[11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]]))
    deadline = time.monotonic() + 240
    while True:
        out = lab.hosts.run(0, [sys.executable, "-m", "tests.faults.hosts_client", "--prompts", str(probe),
                                "--tokens", "2", "--timeout", "10"], 60,
                            env={**lab.identity("alice"), "PYTHONPATH": str(REPO)})
        if out.returncode == 0 and json.loads(out.stdout.strip().splitlines()[-1])["q0"]["final"] == "length":
            routers = lab.client("alice", "--routers", "2.5")
            if set(routers) == {"r0", "r1"}:
                return
        assert time.monotonic() < deadline, f"the cluster did not serve: {out.stdout[-500:]} {out.stderr[-2000:]}"
        assert all(p.poll() is None for p in lab.hosts.procs), _logs(lab)
        time.sleep(1.0)


def _logs(lab: Lab) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in lab.logs.glob("*.log"))


def test_pd_across_hosts_gives_the_tokens_of_one_engine(lab: Lab, tiny: LoadedModel, tmp_path: Path) -> None:
    prompts = _prompts(tiny, 8, 70, seed=1, path=tmp_path / "p.json")
    alone = lab.client("operator", "--prompts", str(prompts), "--tokens", "12", "--engine", "D")
    pd = lab.client("alice", "--prompts", str(prompts), "--tokens", "12")
    for label, want in alone.items():
        got = pd[label]
        assert want["final"] == "length" and not want["problem"], want
        assert got["final"] == "length" and not got["problem"], got
        assert got["tokens"] == want["tokens"], label
    text = (lab.logs / "P.log").read_text(errors="replace")
    assert "instead" not in text, "the router chose shm between hosts (the sender had to fall back)"
    if MOONCAKE:  # KV crossed hosts by one-sided writes into D's registered pool
        assert f"mooncake: writing KV into D at {lab.hosts.address(2)}:" in text, text[-2000:]


def _node_lost_under_16_streams(lab: Lab, tiny: LoadedModel, path: Path, seed: int,
                                which: Callable[[int], int]) -> tuple[int, int]:
    """16 streams of 120 tokens from host 0; once every one has its first token, the NATS node ``which(client's
    node)`` names is killed; every stream must end whole and in order. Returns (client's node, killed node)."""
    prompts = _prompts(tiny, 16, 40, seed=seed, path=path)
    proc = lab.hosts.popen(0, [sys.executable, "-m", "tests.faults.hosts_client", "--prompts", str(prompts),
                               "--tokens", "120", "--signal", "--timeout", "150"],
                           env={**lab.identity("alice"), "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    assert line and line[0] == "STREAMING", " ".join(line) + _logs(lab)
    client_node = int(line[1]) - PORT
    node = which(client_node)
    lab.nats[node].terminate()
    lab.nats[node].wait(timeout=20)
    result = json.loads(proc.stdout.readline().decode())
    proc.wait(timeout=30)
    proc.stdout.close()
    bad = {k: v for k, v in result.items() if v["final"] != "length" or v["problem"] or len(v["tokens"]) != 120}
    assert not bad, f"{len(bad)} of 16 streams hurt: {dict(list(bad.items())[:3])}\n{_logs(lab)}"
    return client_node, node


def test_a_nats_node_lost_under_16_streams_costs_no_stream(lab: Lab, tiny: LoadedModel, tmp_path: Path) -> None:
    # The client's own node goes while every stream is running.
    _node_lost_under_16_streams(lab, tiny, tmp_path / "p.json", seed=2, which=lambda client_node: client_node)
    # Both routers still agree on the strategy, and a switch reaches both (the bucket has three replicas; a watch
    # lost with the node is made again).
    assert lab.client("alice", "--routers", "2.5") == {"r0": "pd", "r1": "pd"}
    lab.set_strategy("least_loaded")
    resent = sum(p.read_text(errors="replace").count("resent ") for p in lab.logs.glob("[PD].log"))
    print(f"streams published again after the node's loss: {resent}")


def _node_of(lab: Lab, name: str) -> int:
    """The node (0-based) process ``name`` rides on now: the last connection its log reports."""
    found = re.findall(r"(?:connected|reconnected) to [\d.]+:(\d+)", (lab.logs / f"{name}.log").read_text())
    assert found, f"{name} never said which node it is on"
    return int(found[-1]) - PORT


def _restart_node(lab: Lab, node: int) -> None:
    """Start a killed node again (same config and store) and wait, bounded, until the cluster has it back."""
    if lab.nats[node].poll() is None:
        return
    deploy = lab.logs / "deploy"
    lab.nats[node] = lab.hosts.popen(node, [str(nats_server_binary()), "-c", str(deploy / f"node-{node + 1}.conf")],
                                     log=lab.logs / f"nats-{node + 1}.log")
    log = lab.logs / f"nats-{node + 1}.log"
    deadline = time.monotonic() + 60
    while log.read_text(errors="replace").count("Server is ready") < 2:
        assert lab.nats[node].poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.3)
    time.sleep(3.0)  # routes re-formed and the JetStream meta group caught up before the next loss


def test_the_decode_engines_nats_node_lost_under_16_streams_costs_no_stream(lab: Lab, tiny: LoadedModel,
                                                                             tmp_path: Path) -> None:
    """The other side of a node's loss: the node the decode engine publishes every token through goes (the node
    killed before is back first, so two of three JetStream replicas stay)."""
    for node in range(3):
        _restart_node(lab, node)
    lab.set_strategy("pd")
    d_node = _node_of(lab, "D")
    client_node, killed = _node_lost_under_16_streams(lab, tiny, tmp_path / "p.json", seed=3,
                                                      which=lambda _: _node_of(lab, "D"))
    assert killed == d_node
    assert _node_of(lab, "D") != killed, "D never moved to another node"
    print(f"node {killed + 1} (D's) killed, client on {client_node + 1}")


def test_an_engine_id_serving_on_another_host_is_refused(lab: Lab) -> None:
    twin = lab.busserve(0, "D", "engine", "--id", "D", "--model", str(lab.tiny_dir), *ENGINE)
    assert twin.wait(timeout=120) == 2, _logs(lab)

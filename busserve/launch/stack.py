"""``busserve up``: the whole stack in one command, as supervised child processes of this one.

1. the embedded nats-server (unless ``--nats`` names one);
2. ``--engines`` engine processes, each pinned to its share of the CPU cores (torch threads to match);
3. one router process serving the OpenAI-compatible HTTP front.

It waits until every engine heartbeats, records the bus URL in the state file (so ``busserve generate`` finds it),
then supervises: a child that exits is started again after a backoff (1 s, doubling to 30 s; reset once it has run
for a minute) while the others keep serving — the router resumes the requests of a lost engine elsewhere. SIGHUP
restarts the engines one by one (``rolling_restart``: each drains, its running requests moving live to the others,
and comes back). Ctrl-C / SIGTERM stops the stack: engines first (each finishes what it holds, within
``--drain-grace-s``; a second Ctrl-C stops them at once), then the router, then the server. Credentials reach the children through their environment, never their command line (which
every user of the machine can read). Children also die with this process (parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from busserve.bus.config import BusConfig, clear_up_state, state_dir, write_up_state
from busserve.bus.embedded import EmbeddedNats, _die_with_parent, free_port
from busserve.bus.identity import host_scoped_id
from busserve.bus.subjects import Subjects
from busserve.launch.readiness import wait_for_engine_probes, wait_for_engines
from busserve.launch.signals import StopFlag
from busserve.security.server_config import Credentials, auth_config

ENGINE_READY_TIMEOUT_S = 600.0  # a first start converts the default model (~20 s here); a big model takes longer
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_AFTER_S = 60.0  # a child that ran this long starts its backoff over
STOP_GRACE_S = 20.0


def core_shares(n_engines: int, cores: list[int]) -> list[list[int]]:
    """Split the cores among engines as evenly as possible (engines share cores when there are fewer)."""
    if n_engines <= len(cores):
        per = len(cores) // n_engines
        return [cores[i * per : (i + 1) * per] for i in range(n_engines)]
    return [[cores[i % len(cores)]] for i in range(n_engines)]


def _preexec(cpus: list[int] | None) -> Callable[[], None]:
    def run() -> None:
        _die_with_parent()
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)

    return run


def child_env(config: BusConfig, url: str) -> dict[str, str]:
    """The children's environment: the bus URL and any credentials as BUSSERVE_NATS_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSSERVE_NATS_")}
    env["BUSSERVE_NATS_URL"] = url
    for var, value in (("BUSSERVE_NATS_USER", config.user), ("BUSSERVE_NATS_PASSWORD", config.password),
                       ("BUSSERVE_NATS_TOKEN", config.token), ("BUSSERVE_NATS_CREDS", config.creds_file),
                       ("BUSSERVE_NATS_NKEY", config.nkeys_seed_file), ("BUSSERVE_NATS_TLS_CA", config.tls_ca),
                       ("BUSSERVE_NATS_TLS_CERT", config.tls_cert), ("BUSSERVE_NATS_TLS_KEY", config.tls_key),
                       ("BUSSERVE_SUBJECT_PREFIX", config.subject_prefix)):
        if value:
            env[var] = str(value)
    return env


def engine_command(args: argparse.Namespace, engine_id: str, threads: int, roles: str) -> list[str]:
    cmd = [sys.executable, "-m", "busserve.cli", "--log-level", args.log_level, "engine", "--id", engine_id,
           "--threads", str(threads), "--roles", roles, "--metrics-port", str(free_port()), "--dtype", args.dtype,
           "--page-size", str(args.page_size), "--kv-memory", args.kv_memory, "--max-running",
           str(args.max_running), "--max-queued", str(args.max_queued), "--device", args.device,
           "--attention", args.attention, "--linear", args.linear, "--quantization", args.quantization, "--drain-grace-s", str(args.drain_grace_s)]
    for flag, value in (("--model", args.model), ("--kv-pages", args.kv_pages),
                        ("--max-batch-tokens", args.max_batch_tokens),
                        ("--max-prefill-tokens", args.max_prefill_tokens), ("--max-model-len", args.max_model_len)):
        if value is not None:
            cmd += [flag, str(value)]
    for t in args.transport or []:
        cmd += ["--transport", t]
    if args.deterministic:
        cmd.append("--deterministic")
    if not getattr(args, "cuda_graphs", True):
        cmd.append("--no-cuda-graphs")
    return cmd


def router_command(args: argparse.Namespace, router_id: str = "router-0") -> list[str]:
    cmd = [sys.executable, "-m", "busserve.cli", "--log-level", args.log_level, "router", "--id", router_id,
           "--strategy", args.strategy, "--http-host", args.http_host, "--http-port", str(args.http_port)]
    for p in args.param:
        cmd += ["--param", p]
    if getattr(args, "api_keys_file", None):
        cmd += ["--api-keys-file", os.path.abspath(args.api_keys_file)]
    if getattr(args, "rate_limit", 0):
        cmd += ["--rate-limit", str(args.rate_limit)]
    if getattr(args, "max_concurrent", 0):
        cmd += ["--max-concurrent", str(args.max_concurrent)]

    if args.model:
        cmd += ["--tokenizer", args.model]
    return cmd


@dataclass
class Child:
    """One supervised process: how to start it, and its restart history."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cpus: list[int] | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive short-lived runs (sets the backoff)
    next_start: float = 0.0
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=_preexec(self.cpus), start_new_session=True)
        self.started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> int | None:
        """The exit code if it has just exited (and schedule its restart), else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        self.proc = None
        self.exits.append(rc)
        ran = time.monotonic() - self.started_at
        self.failures = 0 if ran >= STABLE_AFTER_S else self.failures + 1
        self.next_start = time.monotonic() + BACKOFF_S[min(max(self.failures - 1, 0), len(BACKOFF_S) - 1)]
        return rc

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)


def supervise(children: list[Child], stop: StopFlag, poll_s: float = 0.5,
              on_restart: Callable[[], None] | None = None) -> None:
    """Restart children that exit, with backoff, until ``stop`` is set; on SIGHUP, ``on_restart``."""
    while not stop.wait(poll_s):
        if stop.restart.is_set() and on_restart is not None:
            stop.restart.clear()
            on_restart()
            continue
        now = time.monotonic()
        for c in children:
            rc = c.reap()
            if rc is not None:
                delay = c.next_start - now
                print(f"{c.name} exited with {rc}; restarting in {delay:.0f}s (the others keep serving)", flush=True)
            if c.proc is None and now >= c.next_start and not stop.is_set():
                c.start()
                c.restarts += 1
                assert c.proc is not None
                print(f"{c.name} restarted (pid {c.proc.pid}, restart {c.restarts})", flush=True)


def rolling_restart(engines: list[Child], config: BusConfig, stop: StopFlag, drain_grace_s: float) -> None:
    """One engine at a time: SIGTERM (it drains — the router moves its running requests to the others — and
    exits), start it again, wait until it serves; then the next. The stack serves throughout."""
    for c in engines:
        if stop.is_set():
            return
        print(f"rolling restart: draining {c.name}", flush=True)
        t0 = time.monotonic()
        c.stop(signal.SIGTERM)
        if c.proc is not None:
            try:
                c.proc.wait(timeout=drain_grace_s + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        c.proc = None
        c.start()
        try:
            asyncio.run(wait_for_engines(config, {c.name}, ENGINE_READY_TIMEOUT_S, alive=lambda c=c: c.running))
        except (TimeoutError, RuntimeError) as exc:
            print(f"rolling restart: {c.name} did not come back ({exc}); it is restarted as after a crash",
                  flush=True)
            return
        print(f"rolling restart: {c.name} serving again after {time.monotonic() - t0:.1f}s", flush=True)
    print("rolling restart done", flush=True)


def wait_for_port(host: str, port: int, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Until something accepts connections on host:port (the router's HTTP front starts after its heartbeat)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        if not alive():
            raise RuntimeError("the router exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the HTTP front did not listen on {host}:{port} within {timeout_s:.0f}s")
        time.sleep(0.1)


def stop_children(children: list[Child], stop: StopFlag | None = None, drain_grace_s: float = 60.0) -> None:
    """Engines first — each drains (finishes what it holds; a second Ctrl-C stops them at once, their requests
    then end with an Error), then the router, then everything else."""
    engines = [c for c in children if c.name != "router"]
    if any(c.running for c in engines):
        print(f"stopping: engines finish what they hold (at most {drain_grace_s:g}s; Ctrl-C again to stop now)",
              flush=True)
    for group, grace in ((engines, drain_grace_s + STOP_GRACE_S), ([c for c in children if c.name == "router"],
                                                                  STOP_GRACE_S)):
        for c in group:
            c.stop()
        deadline = time.monotonic() + grace
        for c in group:
            while c.proc is not None and c.proc.poll() is None:
                if stop is not None and stop.hurry.is_set():
                    c.stop(signal.SIGINT)
                if time.monotonic() > deadline:
                    c.proc.kill()
                    c.proc.wait()
                    break
                time.sleep(0.1)


def secure_embedded_server(engine_ids: list[str], router_ids: list[str], port: int | None,
                           subjects: Subjects) -> tuple[EmbeddedNats, Credentials, Path]:
    """The embedded server with an identity per process and the grants of the roles matrix (no open port to the
    bus); the credentials go to a 0600 file in the state folder, for the local ``busserve`` commands."""
    creds = Credentials.for_stack(engine_ids, router_ids)
    server = EmbeddedNats(port=port, extra_config=auth_config(list(creds.identities.values()), subjects))
    path = creds.save(state_dir() / f"credentials-{os.getpid()}.json")
    return server, creds, path


def identities_for_join(creds: Credentials, args: argparse.Namespace, with_router: bool) -> tuple[list[str], str]:
    """The engine ids (in the file's order) and the router id of a host joining with issued identities."""
    if not getattr(args, "join", None):
        raise SystemExit("busserve up: --identities goes with --join URL (the cluster those identities belong to)")
    engines = [i.name for i in creds.identities.values() if i.role == "engine"]
    routers = [i.name for i in creds.identities.values() if i.role == "router"]
    if not engines:
        raise SystemExit(f"busserve up: {args.identities} holds no engine identity")
    if with_router and not routers:
        raise SystemExit(f"busserve up: {args.identities} holds no router identity (pass --no-router, or issue one "
                         "with `busserve security add DIR --router ID`)")
    if args.engines is not None and args.engines != len(engines):
        raise SystemExit(f"busserve up: --engines {args.engines}, but {args.identities} holds {len(engines)} engine "
                         "identities")
    args.engines = len(engines)
    return engines, routers[0] if routers else ""


def launch_cluster(args: argparse.Namespace, config: BusConfig) -> int:
    stop = StopFlag()
    server: EmbeddedNats | None = None
    creds: Credentials | None = None
    creds_path: Path | None = None
    # On its own server the stack's ids are short; joining another's, they carry this host and a random suffix
    # (and each process checks its id is free before serving), so two hosts never share one.
    prefix = "" if not config.servers else host_scoped_id("up") + "-"
    with_router = not getattr(args, "no_router", False)
    if getattr(args, "identities", None):
        # Joining a secured cluster: the processes are who the deployment issued (``busserve security add``).
        creds = Credentials.load(Path(args.identities))
        engine_ids, router_id = identities_for_join(creds, args, with_router)
    else:
        engine_ids = [f"{prefix}e{i}" for i in range(args.engines)]
        router_id = f"{prefix}router-0"
    if config.servers:
        url = config.servers[0]
    elif getattr(args, "insecure", False):
        server = EmbeddedNats(port=args.nats_port).start()
        url = server.url
        config.servers = [url]
    else:
        server, creds, creds_path = secure_embedded_server(engine_ids, [router_id], args.nats_port,
                                                          Subjects(config.subject_prefix))
        server.start()
        url = server.url
        config.servers = [url]
        config = creds.of_role("operator").bus_config(config)  # how this process itself watches the stack
    kind = "" if server is None else (" (embedded nats-server, JetStream on, " +
                                      ("open: --insecure)" if creds is None else "per-role credentials)"))
    print(f"bus: {url}{kind}", flush=True)
    base_env = child_env(config, url)

    def env_of(name: str) -> dict[str, str]:
        return base_env if creds is None else {**base_env, **creds.identities[name].env()}

    children: list[Child] = []
    try:
        cores = sorted(os.sched_getaffinity(0))
        shares = core_shares(args.engines, cores)
        roles = args.roles or []
        for i, eid in enumerate(engine_ids):
            role = roles[i] if i < len(roles) else "prefill,decode"
            child = Child(eid, engine_command(args, eid, len(shares[i]), role), env_of(eid), shares[i])
            child.start()
            children.append(child)
            assert child.proc is not None
            print(f"engine {eid}: pid {child.proc.pid}, cores {shares[i]}, roles {role}", flush=True)
        router: Child | None = None
        if with_router:
            router = Child("router", router_command(args, router_id), env_of(router_id))
            router.start()
            children.append(router)
        alive = lambda: all(c.running for c in children)  # noqa: E731
        if creds is not None and server is None and not with_router:
            # Joined with engine identities only: none may read the cluster's heartbeats; each engine is asked,
            # under its own identity, whether it answers.
            asyncio.run(wait_for_engine_probes({e: creds.identities[e].bus_config(config) for e in engine_ids},
                                               ENGINE_READY_TIMEOUT_S, alive))
            statuses = {}
            model = ""
        else:
            watcher = config if creds is None or server is not None else creds.identities[router_id].bus_config(config)
            statuses = asyncio.run(wait_for_engines(
                watcher, {c.name for c in children if c.name != "router"}, ENGINE_READY_TIMEOUT_S,
                alive=alive, routers=1 if with_router else 0,
            ))
            model = next(iter(statuses.values())).model
        http = f"http://{args.http_host}:{args.http_port}/v1" if args.http_port and with_router else ""
        if http:
            wait_for_port(args.http_host, args.http_port, 60.0, alive=lambda: router is not None and router.running)
        write_up_state({"pid": os.getpid(), "nats_url": url, "http_url": http, "model": model,
                        "started_at": time.time(), "credentials": str(creds_path) if creds_path else ""})
        print(f"ready: {len(statuses)} engine(s) serving {model}" if model else
              f"ready: {len(engine_ids)} engine(s) joined the cluster", (f"; OpenAI API at {http}" if http else ""),
              sep="", flush=True)
        scrape = [st.metrics_url for st in statuses.values() if st.metrics_url]
        if http:
            scrape.insert(0, http.removesuffix("/v1") + "/metrics")
        if scrape:
            print(f"metrics: {' '.join(scrape)}", flush=True)
        print('try:  busserve generate "What is the capital of France?"   (Ctrl-C stops everything)', flush=True)
        engines = [c for c in children if c.name != "router"]
        supervise(children, stop, on_restart=lambda: rolling_restart(engines, config, stop, args.drain_grace_s))
        return 0
    except (TimeoutError, RuntimeError, ConnectionError) as exc:
        print(f"busserve up: {exc}", flush=True)
        return 1
    finally:
        stop_children(children, stop, args.drain_grace_s)
        clear_up_state(os.getpid())
        if creds_path is not None:
            creds_path.unlink(missing_ok=True)
        if server is not None:
            server.stop()
        print("stopped", flush=True)

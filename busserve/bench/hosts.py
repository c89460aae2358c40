"""Several "hosts" on one machine, for tests and benchmarks that need a network between busserve processes.

Each host is a network namespace with one veth interface, joined to the others by a bridge that lives in a
namespace of its own — nothing is added to the machine's own network, and every address (``10.<a>.<b>.<i>/24``,
``a.b`` random per harness) exists only inside namespaces this harness made. A process started on a host also gets
its own /dev/shm (a fresh tmpfs in a mount namespace) and the same host name as every other host, as identical
containers on two machines would: nothing but the network is shared, and shared memory cannot cross. Everything
is torn down on exit: processes first, then the namespaces (which takes their interfaces with them).

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` and ``unshare``; :func:`unavailable` says why not.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import IO, Any

HOSTNAME = "node"  # every host's name: locality must not come from names
_OWN_SHM_AND_NAME = f'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && hostname {HOSTNAME} && exec "$@"'


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


def unavailable() -> str | None:
    """Why hosts cannot be made here (None: they can)."""
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"the {tool} command is missing"
    if os.geteuid() != 0:
        return "network namespaces need root here"
    probe = f"bsprobe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace: {getattr(exc, 'stderr', b'') or exc}"
    try:
        subprocess.run(["ip", "netns", "exec", probe, "unshare", "-m", "-u", "sh", "-c", _OWN_SHM_AND_NAME, "sh",
                        "true"], check=True, capture_output=True, timeout=30)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot give a process its own /dev/shm and host name: {getattr(exc, 'stderr', b'') or exc}"
    finally:
        _ip("netns", "del", probe)
    return None


class Hosts:
    """``n`` hosts; use as a context manager. ``address(i)`` is host i's address, ``popen(i, argv)`` runs there."""

    def __init__(self, n: int) -> None:
        self.n = n
        tag = uuid.uuid4().hex[:6]
        self.names = [f"bs-{tag}-h{i}" for i in range(n)]
        self.switch = f"bs-{tag}-sw"
        rng = random.Random()
        self._net = f"10.{rng.randrange(100, 250)}.{rng.randrange(0, 250)}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def address(self, i: int) -> str:
        return f"{self._net}.{i + 1}"

    def __enter__(self) -> Hosts:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # Created inside the host's namespace, the far end moved into the switch's: never in ours.
                _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{i}", "up")
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def launcher(self, i: int) -> list[str]:
        """The prefix that runs a command on host i (its network, its own /dev/shm, the common host name); it ends
        by exec-ing the command, so the pid is the command's."""
        return ["ip", "netns", "exec", self.names[i], "unshare", "-m", "-u", "sh", "-c", _OWN_SHM_AND_NAME, "sh"]

    def popen(self, i: int, argv: list[str], *, log: Path | None = None, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` on host i, its output into ``log`` (or where ``stdout=`` says); stopped on exit."""
        out: IO[bytes] | int = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child's
        kwargs.setdefault("stdout", out)
        kwargs.setdefault("stderr", out if log else subprocess.DEVNULL)
        try:
            proc = subprocess.Popen([*self.launcher(i), *argv], stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True, **kwargs)
        finally:
            if not isinstance(out, int):
                out.close()
        self.procs.append(proc)
        return proc

    def run(self, i: int, argv: list[str], timeout_s: float, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on host i to its end (bounded) and return its output."""
        return subprocess.run([*self.launcher(i), *argv], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})

    def _teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        for ns in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

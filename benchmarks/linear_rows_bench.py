"""The linear layers of one SmolLM2-135M step, by rows: oneDNN's packed product against busserve's AMX kernel.

Why it exists: ``engine/packed_linear.py`` sends products of at most ``SMALL_ROWS`` rows to the AMX kernel
(``cpu_kernels/small_linear.cpp``) and larger ones to oneDNN; this is the measurement that threshold comes from.
The weights are the model's shapes (30 layers × q, k, v, o, gate, up, down, and the 49,152-row output
projection), random and distinct, ~270 MB in all, so every product streams its weights from memory as in a real
step rather than finding them in cache. Both paths run alternately, row count by row count, on this thread.

    taskset -c 1 .venv/bin/python benchmarks/linear_rows_bench.py --rows 1,4,8,16,32,64,128,192,256
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from busserve import cpu_kernels
from busserve.engine.packed_linear import PackedLinear

# (out_features, in_features) of one SmolLM2-135M layer's projections, and its output projection.
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
HEAD = (49152, 576)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,8,16,32,64,128,192,256")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    reason = cpu_kernels.unavailable_reason() or cpu_kernels.amx_unavailable_reason()
    if reason is not None:
        raise SystemExit(reason)
    cpu_kernels.load()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = LAYER * args.layers + [HEAD]
    layers = [PackedLinear(nn.Linear(k, n, bias=False, dtype=torch.bfloat16), small_rows=True) for n, k in shapes]
    gb = sum(n * k * 2 for n, k in shapes) / 1e9

    def step(rows: int, small: bool) -> float:
        xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in {k for _, k in shapes}}
        start = time.perf_counter()
        for layer in layers:
            x = xs[layer.in_features]
            if small:
                torch.ops.busserve.small_linear(x, layer.tile_weight, layer.out_features, None)
            else:
                torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, None, "none", [], "")
        return time.perf_counter() - start

    print(f"{len(layers)} products, {gb * 1000:.0f} MB of weights, {args.threads} thread(s)\n")
    print("| rows | oneDNN packed (ms) | AMX kernel (ms) | oneDNN GB/s | AMX GB/s |\n|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        step(rows, True), step(rows, False)  # warm-up
        onednn = min(step(rows, False) for _ in range(args.repeats))
        amx = min(step(rows, True) for _ in range(args.repeats))
        print(f"| {rows} | {onednn * 1e3:.1f} | {amx * 1e3:.1f} | {gb / onednn:.1f} | {gb / amx:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run Triton kernels on the CPU with the Triton interpreter (must be set before triton compiles anything)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

"""Triton kernels (the GPU path): packing and unpacking KV pages, appending new K/V. Tested on the CPU under
TRITON_INTERPRET=1. Importing this package needs ``triton``; the CPU engine does not import it."""

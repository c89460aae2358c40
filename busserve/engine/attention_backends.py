"""Decode-attention backends: how each decoding sequence's one new token attends over its paged context.

The runner describes the step's decoding sequences once as a ``DecodeGroup`` (page table, context lengths); the
backend turns that into what its kernel needs in ``prepare`` (once per step, not per layer) and attends in ``run``
(once per layer).

* ``cpu`` — the CPU default where it can be built: busserve's C++ kernel (``cpu_kernels/paged_decode.cpp``, x86 with
  AVX-512, compiled for this machine on first use) reads K/V straight from the pages, each once.
* ``torch`` — the portable CPU path: gather each context into a padded batch and run one SDPA with GQA folded into
  the query axis. The gather copies every context once per layer, which the ``cpu`` kernel avoids.
* ``triton`` — busserve's own paged decode kernel (``triton_kernels/paged_attention.py``): reads K/V straight from
  the pages, no padded copy. The GPU path when flashinfer is absent; on a CPU it runs only under the Triton
  interpreter (``TRITON_INTERPRET=1``), which the tests use to prove the engine gives the same tokens through it.
* ``flashinfer`` — flashinfer's ``BatchDecodeWithPagedKVCacheWrapper`` (CUDA only) over the same pages: our flat
  ``[slots, kv_heads, head_dim]`` layer view is flashinfer's NHD layout once viewed as
  ``[pages, page_size, kv_heads, head_dim]``; ``flashinfer_page_metadata`` builds its CSR page table, on the host,
  once per step, with the model's scale.

Prefill chunks take the paged prefill kernel that goes with the decode backend (``prefill_backend_for``): Triton's
(``triton_kernels/paged_prefill.py``) with ``triton``, flashinfer's batch prefill with ``flashinfer``; with the CPU
backends they take SDPA per chunk in ``engine/attention.py``.

``select_backend`` picks one by name (``auto``: flashinfer on CUDA when installed, else triton on CUDA; on a CPU the
``cpu`` kernel when it builds here and supports the model's head size, else torch) and refuses a backend that cannot
run here with the reason.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "cpu", "torch", "triton", "flashinfer")
CPU_KERNEL_HEAD_DIMS = (16, 32, 64, 128)
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

log = logging.getLogger(__name__)


@dataclass
class DecodeGroup:
    """Sequences that compute one token this step."""

    token_index: torch.Tensor  # [B] position of each sequence's token in the flat batch
    page_table: torch.Tensor  # [B, max_pages] page ids; entries past a sequence's context are never read
    context_lens: torch.Tensor  # [B] positions attended to, the new token's included
    page_size: int
    max_len: int  # the longest context (read once per step, not per layer)
    min_len: int = 0  # the shortest context (0: not known, treat the rows as of different lengths)
    # The page table and lengths as the host built them (numpy), for plans made on the host without a device sync.
    host_page_table: np.ndarray | None = None
    host_context_lens: np.ndarray | None = None
    state: dict[str, Any] = field(default_factory=dict)  # what the backend's prepare() built for this step

    @property
    def size(self) -> int:
        return int(self.token_index.numel())


class DecodeBackend(Protocol):
    name: str

    def prepare(self, group: DecodeGroup) -> None:
        """Once per step: build the per-step state (indices, masks, kernel plans) on ``group.state``."""

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
            scale: float | None) -> torch.Tensor:
        """``q``: [B, heads, head_dim]; caches: one layer's flat [slots, kv_heads, head_dim]. Returns like q."""


def context_slots(group: DecodeGroup) -> torch.Tensor:
    """[B * max_len] pool slot of every context position (rows padded past each context with its own pages)."""
    pos = torch.arange(group.max_len, device=group.page_table.device)
    slots = group.page_table[:, pos // group.page_size] * group.page_size + pos % group.page_size
    return slots.reshape(-1)


class TorchDecode:
    name = "torch"

    def prepare(self, group: DecodeGroup) -> None:
        max_len = group.max_len
        pos = torch.arange(max_len, device=group.page_table.device)
        group.state["slots"] = context_slots(group)
        # Rows of one length (always so for a single sequence) need no mask.
        if group.min_len != max_len:
            mask = pos.unsqueeze(0) < group.context_lens.unsqueeze(1)
            group.state["mask"] = mask.view(group.size, 1, 1, max_len)
        else:
            group.state["mask"] = None

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
            scale: float | None) -> torch.Tensor:
        b, heads, dim = q.shape
        kv_heads = k_cache.shape[1]
        max_len = group.max_len
        # [B, heads, D] -> [B, kv_heads, group, D]: the heads sharing a K/V head become its "query length".
        qd = q.reshape(b, kv_heads, heads // kv_heads, dim)
        slots = group.state["slots"]
        kd = k_cache.index_select(0, slots).view(b, max_len, kv_heads, dim).permute(0, 2, 1, 3)
        vd = v_cache.index_select(0, slots).view(b, max_len, kv_heads, dim).permute(0, 2, 1, 3)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.state["mask"], scale=scale)
        return od.reshape(b, heads, dim)


class CpuDecode:
    """busserve's C++ paged decode kernel (``torch.ops.busserve.paged_decode``); built by ``CpuDecode()``."""

    name = "cpu"

    def __init__(self) -> None:
        from busserve import cpu_kernels

        cpu_kernels.load()
        self._kernel = torch.ops.busserve.paged_decode

    def prepare(self, group: DecodeGroup) -> None:
        group.state["slots"] = context_slots(group).to(torch.long).contiguous()
        group.state["lens"] = group.context_lens.to(torch.long).contiguous()

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
            scale: float | None) -> torch.Tensor:
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        out: torch.Tensor = self._kernel(q.contiguous(), k_cache, v_cache, group.state["slots"],
                                         group.state["lens"], group.max_len, scale)
        return out


class TritonDecode:
    name = "triton"

    def __init__(self) -> None:
        from busserve.triton_kernels.paged_attention import paged_decode

        self._kernel = paged_decode

    def prepare(self, group: DecodeGroup) -> None:
        group.state["table"] = group.page_table.to(torch.int32).contiguous()
        group.state["lens"] = group.context_lens.to(torch.int32).contiguous()

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
            scale: float | None) -> torch.Tensor:
        return self._kernel(q, k_cache, v_cache, group.state["table"], group.state["lens"], group.page_size,
                            scale=scale)


def flashinfer_page_metadata(page_table: torch.Tensor, context_lens: torch.Tensor, page_size: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flashinfer's CSR page table: (indptr [B+1], indices [sum pages], last_page_len [B]), all int32.

    Sequence b owns ``indices[indptr[b]:indptr[b+1]]``, and its last page holds ``last_page_len[b]`` (1..page_size)
    positions.
    """
    pages_per_seq = (context_lens + page_size - 1) // page_size
    indptr = torch.zeros(len(context_lens) + 1, dtype=torch.int32, device=page_table.device)
    indptr[1:] = torch.cumsum(pages_per_seq, 0)
    used = torch.arange(page_table.shape[1], device=page_table.device).unsqueeze(0) < pages_per_seq.unsqueeze(1)
    indices = page_table[used].to(torch.int32)  # row-major: each sequence's pages in order
    last_page_len = (context_lens - 1) % page_size + 1
    return indptr, indices, last_page_len.to(torch.int32)


class FlashInferDecode:
    name = "flashinfer"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, scale: float, workspace_bytes: int = 128 << 20) -> None:
        import flashinfer

        self.num_heads, self.num_kv_heads, self.head_dim, self.dtype = num_heads, num_kv_heads, head_dim, dtype
        self.scale = scale  # planned once per step, so the model's scale is fixed here (checked in run)
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")

    def prepare(self, group: DecodeGroup) -> None:
        indptr, indices, last = flashinfer_page_metadata(*_host_pages(group.page_table, group.host_page_table,
                                                                      group.context_lens, group.host_context_lens),
                                                         group.page_size)
        self.wrapper.plan(indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, group.page_size,
                          pos_encoding_mode="NONE", sm_scale=self.scale, q_data_type=self.dtype,
                          kv_data_type=self.dtype)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
            scale: float | None) -> torch.Tensor:
        _check_planned_scale(self.scale, scale)
        paged = (k_cache.view(-1, group.page_size, *k_cache.shape[1:]),
                 v_cache.view(-1, group.page_size, *v_cache.shape[1:]))
        out: torch.Tensor = self.wrapper.run(q.contiguous(), paged)
        return out


def _host_pages(table: torch.Tensor, host_table: np.ndarray | None, lens: torch.Tensor,
                host_lens: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The page table and lengths on the host: flashinfer plans there (a device copy would be read back)."""
    if host_table is not None and host_lens is not None:
        return torch.from_numpy(host_table), torch.from_numpy(host_lens)
    return table.cpu(), lens.cpu()


def _check_planned_scale(planned: float, scale: float | None) -> None:
    if scale is not None and not math.isclose(scale, planned, rel_tol=1e-6):
        raise ValueError(f"attention scale {scale} differs from the {planned} the kernel was planned with")


# ------------------------------------------------------------------ prefill


@dataclass
class PrefillGroup:
    """The step's prefill chunks, for the paged prefill kernels (GPU): chunk c is rows ``q_starts[c] :
    q_starts[c] + q_lens[c]`` of the flat step over the first ``ctx_lens[c]`` positions of its pages."""

    q_starts: torch.Tensor  # [C]
    q_lens: torch.Tensor  # [C]
    ctx_lens: torch.Tensor  # [C]
    page_table: torch.Tensor  # [C, max_pages]
    rows: torch.Tensor  # [sum q_lens] the chunks' rows of the flat step, chunk after chunk
    page_size: int
    max_q_len: int
    host_q_lens: np.ndarray
    host_ctx_lens: np.ndarray
    host_page_table: np.ndarray
    state: dict[str, Any] = field(default_factory=dict)


class PrefillBackend(Protocol):
    name: str

    def prepare(self, group: PrefillGroup) -> None:
        """Once per step."""

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: PrefillGroup,
            scale: float | None, out: torch.Tensor) -> None:
        """``q`` and ``out``: the flat step [tokens, heads, head_dim]; writes the chunks' rows of ``out``."""


class TritonPrefill:
    name = "triton"

    def __init__(self) -> None:
        from busserve.triton_kernels.paged_prefill import paged_prefill

        self._kernel = paged_prefill

    def prepare(self, group: PrefillGroup) -> None:
        group.state["table"] = group.page_table.to(torch.int32).contiguous()

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: PrefillGroup,
            scale: float | None, out: torch.Tensor) -> None:
        self._kernel(q, k_cache, v_cache, group.state["table"], group.q_starts, group.q_lens, group.ctx_lens,
                     group.page_size, group.max_q_len, scale=scale, out=out)


class FlashInferPrefill:
    """flashinfer's ``BatchPrefillWithPagedKVCacheWrapper`` over the pool (causal masks in flashinfer align the
    queries to the end of their context, as ours do)."""

    name = "flashinfer"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, scale: float, workspace_bytes: int = 128 << 20) -> None:
        import flashinfer

        self.num_heads, self.num_kv_heads, self.head_dim, self.dtype = num_heads, num_kv_heads, head_dim, dtype
        self.scale = scale
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")

    def prepare(self, group: PrefillGroup) -> None:
        qo_indptr = torch.zeros(len(group.host_q_lens) + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.from_numpy(np.cumsum(group.host_q_lens))
        indptr, indices, last = flashinfer_page_metadata(torch.from_numpy(group.host_page_table),
                                                         torch.from_numpy(group.host_ctx_lens), group.page_size)
        self.wrapper.plan(qo_indptr, indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim,
                          group.page_size, causal=True, pos_encoding_mode="NONE", sm_scale=self.scale,
                          q_data_type=self.dtype, kv_data_type=self.dtype)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: PrefillGroup,
            scale: float | None, out: torch.Tensor) -> None:
        _check_planned_scale(self.scale, scale)
        paged = (k_cache.view(-1, group.page_size, *k_cache.shape[1:]),
                 v_cache.view(-1, group.page_size, *v_cache.shape[1:]))
        out[group.rows] = self.wrapper.run(q[group.rows].contiguous(), paged)


def attention_scale(model: torch.nn.Module, head_dim: int) -> float:
    """The softmax scale the model's attention layers pass (transformers keeps it as ``scaling`` on each
    attention module); 1/sqrt(head_dim) for a model that keeps none."""
    for m in model.modules():
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, float):
            return float(scaling)
    return 1.0 / math.sqrt(head_dim)


def prefill_backend_for(decode: DecodeBackend, *, num_heads: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, device: torch.device, scale: float) -> PrefillBackend | None:
    """The paged prefill kernel that goes with a decode backend: Triton's with ``triton``, flashinfer's with
    ``flashinfer``; None (SDPA per chunk in ``engine/attention.py``) with the CPU backends."""
    if decode.name == "triton":
        if head_dim < 16 or head_dim & (head_dim - 1):
            log.info("prefill attention: SDPA per chunk (the Triton prefill kernel needs a power-of-two head_dim "
                     "of at least 16, not %d)", head_dim)
            return None
        return TritonPrefill()
    if decode.name == "flashinfer":
        return FlashInferPrefill(num_heads, num_kv_heads, head_dim, dtype, device, scale)
    return None


class BackendUnavailable(RuntimeError):
    pass


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None if it can."""
    if name == "torch":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return "the cpu kernel runs on CPU devices only"
        from busserve import cpu_kernels

        return cpu_kernels.unavailable_reason()
    if name == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a GPU (on a CPU only the interpreter runs them: TRITON_INTERPRET=1)"
        return None
    if name == "flashinfer":
        if device.type != "cuda":
            return "flashinfer runs on CUDA devices only"
        if importlib.util.find_spec("flashinfer") is None:
            return "flashinfer is not installed (pip install 'busserve[gpu]')"
        return None
    return f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})"


def select_backend(name: str, device: torch.device, *, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, scale: float | None = None) -> DecodeBackend:
    if name == "auto":
        if device.type == "cuda":
            name = "flashinfer" if unavailable_reason("flashinfer", device) is None else "triton"
        else:
            kernel = _cpu_kernel(device, head_dim, dtype)
            if isinstance(kernel, str):
                log.info("decode attention: torch SDPA path (%s)", kernel.splitlines()[0])
                return TorchDecode()
            return kernel
    if name == "cpu":
        kernel = _cpu_kernel(device, head_dim, dtype)
        if isinstance(kernel, str):
            raise BackendUnavailable(f"attention backend 'cpu' cannot run here: {kernel}")
        return kernel
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"attention backend {name!r} cannot run here: {reason}")
    if name == "triton":
        return TritonDecode()
    if name == "flashinfer":
        return FlashInferDecode(num_heads, num_kv_heads, head_dim, dtype, device,
                                scale if scale is not None else 1.0 / math.sqrt(head_dim))
    return TorchDecode()


def _cpu_kernel(device: torch.device, head_dim: int, dtype: torch.dtype) -> CpuDecode | str:
    """The C++ kernel, built and loaded — or why it cannot serve this model here."""
    from busserve.cpu_kernels import KernelBuildError

    reason = unavailable_reason("cpu", device)
    if reason is not None:
        return reason
    if head_dim not in CPU_KERNEL_HEAD_DIMS:
        return f"the cpu kernel supports head_dim {CPU_KERNEL_HEAD_DIMS}, not {head_dim}"
    if dtype not in CPU_KERNEL_DTYPES:
        return f"the cpu kernel supports float32, bfloat16 and float16, not {dtype}"
    try:
        return CpuDecode()
    except KernelBuildError as e:
        return str(e)

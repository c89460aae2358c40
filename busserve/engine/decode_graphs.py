"""Decode steps replayed as CUDA graphs, one per batch bucket, captured when a GPU engine starts.

A decode step of a small batch on a GPU is bound by launching kernels, not by reading weights: a 32-layer model's
eager forward issues hundreds of launches from Python. Replaying a captured graph issues one. What makes a step
capturable is that every tensor it touches lives at a fixed address, so this module keeps one **static input
buffer** (a flat int64 tensor on the device whose views are the input ids, positions, slot mapping, context lengths
and page table of the largest bucket) and runs each bucket's forward over slices of it. A step then

1. fills a host array with its rows, padded to the bucket by repeating its first row (a padded row writes the same
   K/V into the same slot as the row it repeats, and its output is dropped), and copies it into the static buffer
   in one non-blocking copy;
2. replays the bucket's graph (or, where nothing was captured — a CPU, or a capture that failed — runs the same
   forward over the same buffers eagerly, which is how the CPU tests check this path);
3. returns the first rows of the bucket's static logits.

Only pure decode steps take it: every row one token after its cached context, every row sampled, no per-layer KV
send hook, and the ``triton`` attention backend (its kernel reads context lengths from the device, so a graph
serves any lengths up to the page table's width). Everything else runs eagerly as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from busserve.engine.attention import AttentionMetadata
from busserve.engine.attention_backends import DecodeBackend, DecodeGroup

if TYPE_CHECKING:
    from busserve.engine.scheduler import Batch
    from busserve.engine.sequence import Sequence

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WARMUP_RUNS = 2  # eager runs before each capture (lazy initialisation, autotuning) on a side stream


def buckets_up_to(max_batch: int) -> list[int]:
    """The batch buckets that cover ``1..max_batch`` (the last one at or above it)."""
    out = [b for b in BUCKETS if b < max_batch]
    return [*out, next((b for b in BUCKETS if b >= max_batch), max_batch)]


class DecodeGraphs:
    def __init__(self, model: Any, kv: Any, backend: DecodeBackend, page_size: int, max_batch: int,
                 max_pages: int, device: torch.device) -> None:
        self.model, self.kv, self.backend = model, kv, backend
        self.page_size, self.max_pages, self.device = page_size, max_pages, device
        self.buckets = buckets_up_to(max_batch)
        top = self.buckets[-1]
        # ids, positions, slots, lens, then the page table: one buffer, one copy per step.
        self._sizes = [top, top, top, top, top * max_pages]
        self.static = torch.zeros(sum(self._sizes), dtype=torch.long, device=device)
        self.ids, self.pos, self.slots, self.lens, table = self.static.split(self._sizes)  # type: ignore[no-untyped-call]
        self.table = table.view(top, max_pages)
        self.lens.fill_(1)
        self.rows = torch.arange(top, device=device)
        self._host = torch.zeros(self.static.numel(), dtype=torch.long,
                                 pin_memory=device.type == "cuda")
        self._copied: torch.cuda.Event | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0  # steps served by this module (captured or not), for tests and metrics

    def eligible(self, batch: Batch, sample: list[Sequence], layer_hook: object) -> bool:
        if layer_hook is not None or len(sample) != len(batch) or len(batch) > self.buckets[-1]:
            return False
        return all(n == 1 and seq.num_computed > 0 and len(seq.pages) <= self.max_pages for seq, n in batch)

    def bucket_of(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def _forward(self, b: int) -> torch.Tensor:
        group = DecodeGroup(token_index=self.rows[:b], page_table=self.table[:b], context_lens=self.lens[:b],
                            page_size=self.page_size, max_len=self.max_pages * self.page_size)
        self.backend.prepare(group)
        meta = AttentionMetadata(kv=self.kv, slot_mapping=self.slots[:b], decode=group, prefills=[],
                                 decode_backend=self.backend)
        out = self.model(input_ids=self.ids[:b].unsqueeze(0), position_ids=self.pos[:b].unsqueeze(0),
                         use_cache=False, logits_to_keep=self.rows[:b], busserve_attn=meta)
        logits: torch.Tensor = out.logits[0].float()
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's graph, largest first (the smaller ones reuse its memory pool). Before it the
        static buffers point every row at slot 0 of page 0, which nothing holds yet: the warm-up runs write there."""
        pool = None
        with torch.cuda.device(self.device):  # Triton launches on the current device: make it the model's
            stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for b in reversed(self.buckets):
                    for _ in range(WARMUP_RUNS):
                        self._forward(b)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            capture_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            for b in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=capture_stream):
                    self.logits[b] = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = graph
            torch.cuda.synchronize(self.device)
        log.info("decode steps captured as CUDA graphs for batch sizes %s", self.buckets)

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Logits ``[len(batch), vocab]`` of a decode step (rows in batch order)."""
        n = len(batch)
        b = self.bucket_of(n)
        top, ps = self.buckets[-1], self.page_size
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have left the pinned buffer
        host = self._host.numpy()
        ids, pos, slots, lens, table = np.split(host, np.cumsum(self._sizes)[:-1])
        table = table.reshape(top, self.max_pages)
        for r, (seq, _) in enumerate(batch):
            c0 = seq.num_computed
            ids[r], pos[r], lens[r] = seq.token_ids[c0], c0, c0 + 1
            slots[r] = seq.pages[c0 // ps] * ps + c0 % ps
            table[r, : len(seq.pages)] = seq.pages
        for arr in (ids, pos, slots, lens):
            arr[n:b] = arr[0]
        table[n:b] = table[0]
        used = [slice(0, b)] * 4 + [slice(0, b * self.max_pages)]
        # Copy only the bucket's part of each view: one copy per view of a pinned source (non-blocking on a GPU).
        views = zip(self.static.split(self._sizes), self._host.split(self._sizes), used, strict=True)  # type: ignore[no-untyped-call]
        for dst, src, cut in views:
            dst[cut].copy_(src[cut], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.replays += 1
        if b in self.graphs:
            self.graphs[b].replay()
            return self.logits[b][:n]
        return self._forward(b)[:n]

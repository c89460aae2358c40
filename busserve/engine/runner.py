"""The model runner: one batched forward per step over the paged KV pool.

``run`` flattens the step's tokens (prefill chunks and decode tokens side by side), builds the attention metadata
once (slot mapping, the padded decode group, the prefill chunks), calls transformers' model with our attention
implementation, and returns logits only for the rows that will be sampled (``logits_to_keep``), so the vocabulary
projection is never paid for prompt tokens.

Every index the step uses is computed on the host with numpy, written into one int64 staging buffer (pinned on a
GPU) and moved to the model's device in one non-blocking copy, then split there into views — as vLLM's input
batch does. No tensor of the step is built on the host and then mixed with device tensors
(tests/engine/test_device_placement.py runs the engine with every implicit allocation sent to the ``meta`` device
to prove it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from busserve.engine.attention import AttentionMetadata, PrefillChunk
from busserve.engine.attention_backends import DecodeBackend, DecodeGroup, PrefillBackend, PrefillGroup, TorchDecode
from busserve.engine.decode_graphs import DecodeGraphs
from busserve.engine.model_loader import LoadedModel
from busserve.engine.scheduler import Batch
from busserve.engine.sequence import Sequence
from busserve.kv.storage import KVLayout, KVStorage

HOST = torch.device("cpu")


def kv_layout_for(loaded: LoadedModel, num_pages: int, page_size: int, dtype: torch.dtype) -> KVLayout:
    cfg = loaded.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVLayout(
        num_layers=cfg.num_hidden_layers, num_pages=num_pages, page_size=page_size,
        num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, dtype=dtype,
    )


class StepStaging:
    """Host int64 arrays of one step, moved to ``device`` as one buffer and handed back as device views.

    On a GPU the host side is a pinned buffer reused from step to step (grown when a step needs more) and the copy is
    non-blocking; before the buffer is written again, the event recorded after the previous copy is waited on — a
    step need not read anything back (a prefill chunk, a PD sender's step), so the stream may still be behind. On a
    CPU the arrays are used where they are.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def to_device(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        sizes = [int(p.size) for p in parts]
        flat = torch.from_numpy(np.concatenate([p.reshape(-1) for p in parts]).astype(np.int64, copy=False))
        if self.device.type != "cpu":
            cuda = self.device.type == "cuda"
            if self._copied is not None:
                self._copied.synchronize()  # the previous step's copy has left the buffer
            if self._pinned is None or self._pinned.numel() < flat.numel():
                self._pinned = torch.empty(max(flat.numel(), 4096) * 2, dtype=torch.long, device=HOST,
                                           pin_memory=cuda)
            host = self._pinned[: flat.numel()]
            host.copy_(flat)
            flat = host.to(self.device, non_blocking=True)
            if cuda:
                self._copied = torch.cuda.Event()
                self._copied.record()
        out, at = [], 0
        for p, n in zip(parts, sizes, strict=True):
            out.append(flat[at : at + n].view(p.shape))
            at += n
        return out


def _prefill_arrays(chunks: list[tuple[int, int, int, np.ndarray | None]], pages: list[np.ndarray], page_size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(q_starts, q_lens, ctx_lens, page_table, rows) of the prefill chunks, for a paged prefill kernel."""
    starts = np.asarray([c[0] for c in chunks], dtype=np.int64)
    lens = np.asarray([c[1] for c in chunks], dtype=np.int64)
    ctxs = np.asarray([c[2] for c in chunks], dtype=np.int64)
    table = np.zeros((len(chunks), int(-(-ctxs.max() // page_size))), dtype=np.int64)
    for r, (p, ctx) in enumerate(zip(pages, ctxs, strict=True)):
        k = int(-(-ctx // page_size))
        table[r, :k] = p[:k]
    rows = np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in zip(starts, lens, strict=True)])
    return starts, lens, ctxs, table, rows


class ModelRunner:
    def __init__(self, loaded: LoadedModel, kv: KVStorage, decode_backend: DecodeBackend | None = None,
                 prefill_backend: PrefillBackend | None = None) -> None:
        self.model = loaded.model
        self.decode_backend = decode_backend or TorchDecode()
        self.prefill_backend = prefill_backend
        # Every token of a step as one decode-kernel row over its own context (engine/deterministic.py).
        self.deterministic = False
        self.kv = kv
        self.page_size = kv.layout.page_size
        self.device = next(self.model.parameters()).device
        self.staging = StepStaging(self.device)
        self.graphs: DecodeGraphs | None = None  # pure decode steps over static buffers (engine/decode_graphs.py)
        self.vocab_size = int(self.model.config.vocab_size)

    def _slots(self, pages: np.ndarray, positions: np.ndarray) -> np.ndarray:
        slots: np.ndarray = pages[positions // self.page_size] * self.page_size + positions % self.page_size
        return slots

    def build_metadata(self, batch: Batch, sample: list[Sequence], layer_hook: Callable[[int], None] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, rows to keep logits of — one per sequence of ``sample`` — and the attention
        metadata), all on the model's device."""
        ids: list[np.ndarray] = []
        positions: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        chunks: list[tuple[int, int, int, np.ndarray | None]] = []  # (q_start, q_len, ctx_len, context slots)
        dec_index: list[int] = []
        dec_ctx: list[int] = []
        dec_pages: list[np.ndarray] = []
        last_row: dict[int, int] = {}
        paged_prefill = self.prefill_backend is not None  # every chunk over its pages, in one kernel
        chunk_pages: list[np.ndarray] = []
        q = 0
        for seq, n in batch:
            c0 = seq.num_computed
            ids.append(np.asarray(seq.token_ids[c0 : c0 + n], dtype=np.int64))
            pos = np.arange(c0, c0 + n, dtype=np.int64)
            pages = np.asarray(seq.pages, dtype=np.int64)
            positions.append(pos)
            slot_parts.append(self._slots(pages, pos))
            if self.deterministic:
                dec_index.extend(range(q, q + n))
                dec_ctx.extend(range(c0 + 1, c0 + n + 1))
                dec_pages.extend([pages] * n)
            elif n == 1 and c0 > 0:
                dec_index.append(q)
                dec_ctx.append(c0 + 1)
                dec_pages.append(pages)
            elif paged_prefill:
                chunks.append((q, n, c0 + n, None))
                chunk_pages.append(pages)
            elif c0 == 0:
                chunks.append((q, n, n, None))
            else:
                ctx = c0 + n
                chunks.append((q, n, ctx, self._slots(pages, np.arange(ctx, dtype=np.int64))))
            last_row[id(seq)] = q + n - 1
            q += n
        keep = np.asarray([last_row[id(s)] for s in sample], dtype=np.int64)
        parts = [np.concatenate(ids), np.concatenate(positions), np.concatenate(slot_parts), keep]
        parts += [c[3] for c in chunks if c[3] is not None]
        max_len = max(dec_ctx, default=0)
        if dec_index:
            max_pages = -(-max_len // self.page_size)
            table = np.zeros((len(dec_index), max_pages), dtype=np.int64)
            for r, pages in enumerate(dec_pages):
                k = min(len(pages), max_pages)
                table[r, :k] = pages[:k]
            parts += [np.asarray(dec_index, dtype=np.int64), table, np.asarray(dec_ctx, dtype=np.int64)]
        prefill_host = _prefill_arrays(chunks, chunk_pages, self.page_size) if chunk_pages else None
        if prefill_host is not None:
            parts += list(prefill_host)
        dev = self.staging.to_device(parts)
        ids_d, pos_d, slots_d, keep_d = dev[:4]
        rest = iter(dev[4:])
        prefills = [PrefillChunk(q_start=a, q_len=n, ctx_len=ctx, slots=None if s is None else next(rest))
                    for a, n, ctx, s in chunks if not paged_prefill]
        decode = None
        if dec_index:
            token_index, table_d, lens_d = next(rest), next(rest), next(rest)
            decode = DecodeGroup(token_index=token_index, page_table=table_d, context_lens=lens_d,
                                 page_size=self.page_size, max_len=max_len, min_len=min(dec_ctx),
                                 host_page_table=table, host_context_lens=np.asarray(dec_ctx, dtype=np.int64))
            self.decode_backend.prepare(decode)
        group = None
        if prefill_host is not None and self.prefill_backend is not None:
            _, lens, ctxs, table_h, _ = prefill_host
            starts_d, lens_d, ctxs_d, ptable_d, rows_d = rest
            group = PrefillGroup(q_starts=starts_d, q_lens=lens_d, ctx_lens=ctxs_d, page_table=ptable_d, rows=rows_d,
                                 page_size=self.page_size, max_q_len=int(lens.max()), host_q_lens=lens,
                                 host_ctx_lens=ctxs, host_page_table=table_h)
            self.prefill_backend.prepare(group)
        meta = AttentionMetadata(kv=self.kv, slot_mapping=slots_d, decode=decode, prefills=prefills,
                                 layer_hook=layer_hook, decode_backend=self.decode_backend,
                                 prefill_backend=self.prefill_backend if group is not None else None,
                                 prefill_group=group)
        return ids_d, pos_d, keep_d, meta

    @torch.inference_mode()
    def run(self, batch: Batch, sample: list[Sequence], layer_hook: Callable[[int], None] | None = None
            ) -> torch.Tensor:
        """Forward the batch; logits ``[len(sample), vocab]`` for the sequences in ``sample`` (in that order)."""
        if self.graphs is not None and self.graphs.eligible(batch, sample, layer_hook):
            return self.graphs.run(batch)
        ids, pos, keep, meta = self.build_metadata(batch, sample, layer_hook)
        out = self.model(input_ids=ids.unsqueeze(0), position_ids=pos.unsqueeze(0), use_cache=False,
                         logits_to_keep=keep, busserve_attn=meta)
        logits: torch.Tensor = out.logits[0].float()
        return logits

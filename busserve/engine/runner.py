"""The model runner: one batched forward per step over the paged KV pool.

``run`` flattens the step's tokens (prefill chunks and decode tokens side by side), builds the attention metadata
once (slot mapping, the padded decode group, the prefill chunks), calls transformers' model with our attention
implementation, and returns logits only for the rows that will be sampled (``logits_to_keep``), so the vocabulary
projection is never paid for prompt tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from busserve.engine.attention import AttentionMetadata, PrefillChunk
from busserve.engine.attention_backends import DecodeBackend, DecodeGroup, TorchDecode
from busserve.engine.model_loader import LoadedModel
from busserve.engine.scheduler import Batch
from busserve.engine.sequence import Sequence
from busserve.kv.storage import KVLayout, KVStorage


def kv_layout_for(loaded: LoadedModel, num_pages: int, page_size: int, dtype: torch.dtype) -> KVLayout:
    cfg = loaded.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVLayout(
        num_layers=cfg.num_hidden_layers, num_pages=num_pages, page_size=page_size,
        num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, dtype=dtype,
    )


class ModelRunner:
    def __init__(self, loaded: LoadedModel, kv: KVStorage, decode_backend: DecodeBackend | None = None) -> None:
        self.model = loaded.model
        self.decode_backend = decode_backend or TorchDecode()
        # Every token of a step as one decode-kernel row over its own context (engine/deterministic.py).
        self.deterministic = False
        self.kv = kv
        self.page_size = kv.layout.page_size
        self.device = next(self.model.parameters()).device
        self.vocab_size = int(self.model.config.vocab_size)

    def _slots(self, pages: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return pages[positions // self.page_size] * self.page_size + positions % self.page_size

    def build_metadata(self, batch: Batch, layer_hook: Callable[[int], None] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        prefills: list[PrefillChunk] = []
        dec_index: list[int] = []
        dec_ctx: list[int] = []
        dec_pages: list[torch.Tensor] = []
        q = 0
        for seq, n in batch:
            c0 = seq.num_computed
            ids.extend(seq.token_ids[c0 : c0 + n])
            pos = torch.arange(c0, c0 + n)
            pages = torch.tensor(seq.pages, dtype=torch.long)
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
            elif c0 == 0:
                prefills.append(PrefillChunk(q_start=q, q_len=n, ctx_len=n, slots=None))
            else:
                ctx = c0 + n
                prefills.append(PrefillChunk(q_start=q, q_len=n, ctx_len=ctx,
                                             slots=self._slots(pages, torch.arange(ctx))))
            q += n
        decode = None
        if dec_index:
            max_len = max(dec_ctx)
            max_pages = -(-max_len // self.page_size)
            table = torch.zeros(len(dec_index), max_pages, dtype=torch.long)
            for r, pages in enumerate(dec_pages):
                k = min(len(pages), max_pages)
                table[r, :k] = pages[:k]
            decode = DecodeGroup(token_index=torch.tensor(dec_index), page_table=table,
                                 context_lens=torch.tensor(dec_ctx), page_size=self.page_size, max_len=max_len)
            self.decode_backend.prepare(decode)
        meta = AttentionMetadata(kv=self.kv, slot_mapping=torch.cat(slot_parts), decode=decode, prefills=prefills,
                                 layer_hook=layer_hook, decode_backend=self.decode_backend)
        return torch.tensor(ids, dtype=torch.long), torch.cat(positions), meta

    @torch.inference_mode()
    def run(self, batch: Batch, sample: list[Sequence], layer_hook: Callable[[int], None] | None = None
            ) -> torch.Tensor:
        """Forward the batch; logits ``[len(sample), vocab]`` for the sequences in ``sample`` (in that order)."""
        ids, pos, meta = self.build_metadata(batch, layer_hook)
        offsets: dict[int, int] = {}
        q = 0
        for seq, n in batch:
            offsets[id(seq)] = q + n - 1
            q += n
        keep = torch.tensor([offsets[id(s)] for s in sample], dtype=torch.long)
        out = self.model(
            input_ids=ids.unsqueeze(0).to(self.device),
            position_ids=pos.unsqueeze(0).to(self.device),
            use_cache=False,
            logits_to_keep=keep.to(self.device),
            busserve_attn=meta,
        )
        return out.logits[0].float()

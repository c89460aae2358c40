"""Paged attention for transformers' own model code, registered as the attention implementation "busserve_paged".

transformers' Llama-family attention modules compute Q, K, V and RoPE, then call the registered attention function
with every keyword argument the model was called with. We pass ``busserve_attn=AttentionMetadata`` (built once
per step by the runner), so this function can

1. write the new K/V of every token of the step into the paged pool at ``slot_mapping`` (the "append" op);
2. tell the layer hook that this layer's KV is in place — the eager, per-layer KV sends hang off this hook;
3. attend: all decoding sequences at once through the decode backend (``attention_backends.py``: torch SDPA over
   the gathered context on CPU, Triton or flashinfer paged kernels on GPU), and the prefill chunks either all at
   once through the paged prefill kernel that goes with a GPU backend, or each in its own SDPA (causal, aligned to
   the end of its context when earlier tokens come from the cache).

The batch is flat: ``query`` is ``[1, heads, tokens, head_dim]`` with the tokens of all sequences side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from busserve.engine.attention_backends import DecodeBackend, DecodeGroup, PrefillBackend, PrefillGroup, TorchDecode
from busserve.kv.storage import KVStorage

ATTN_IMPLEMENTATION = "busserve_paged"


@dataclass
class PrefillChunk:
    q_start: int
    q_len: int
    ctx_len: int  # tokens attended to: the cached/earlier context plus this chunk
    slots: torch.Tensor | None  # [ctx_len] when earlier tokens live in the pool; None when the chunk is all
    mask: torch.Tensor | None = None  # [q_len, ctx_len] causal mask aligned to the end; built once per step

    def __post_init__(self) -> None:
        if self.slots is not None and self.mask is None:
            # Query i (at position ctx-q_len+i) sees keys 0..ctx-q_len+i. Built here rather than in every layer.
            dev = self.slots.device
            rows = torch.arange(self.q_len, device=dev).unsqueeze(1) + (self.ctx_len - self.q_len)
            self.mask = torch.arange(self.ctx_len, device=dev).unsqueeze(0) <= rows


@dataclass
class AttentionMetadata:
    kv: KVStorage
    slot_mapping: torch.Tensor  # [tokens] where each new token's K/V goes
    decode: DecodeGroup | None
    prefills: list[PrefillChunk]
    layer_hook: Callable[[int], None] | None = None
    decode_backend: DecodeBackend = field(default_factory=TorchDecode)  # prepared on ``decode`` by the runner
    # The paged prefill kernel (GPU backends) and the chunks as it takes them; None: SDPA per chunk.
    prefill_backend: PrefillBackend | None = None
    prefill_group: PrefillGroup | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    meta: AttentionMetadata = kwargs["busserve_attn"]
    layer: int = module.layer_idx  # type: ignore[assignment]
    _, num_heads, num_tokens, head_dim = query.shape
    k_new = key[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
    v_new = value[0].transpose(0, 1)
    k_cache, v_cache = meta.kv.layer_kv(layer)
    k_cache.index_copy_(0, meta.slot_mapping, k_new)
    v_cache.index_copy_(0, meta.slot_mapping, v_new)
    if meta.layer_hook is not None:
        meta.layer_hook(layer)

    out = query.new_empty(num_tokens, num_heads, head_dim)
    q = query[0]  # [heads, tokens, head_dim]

    if meta.decode is not None:
        d = meta.decode
        qd = q[:, d.token_index, :].transpose(0, 1)  # [B, heads, head_dim]
        out[d.token_index] = meta.decode_backend.run(qd, k_cache, v_cache, d, scaling)

    if meta.prefill_backend is not None and meta.prefill_group is not None:
        meta.prefill_backend.run(q.transpose(0, 1), k_cache, v_cache, meta.prefill_group, scaling, out)
        return out.unsqueeze(0), None

    for c in meta.prefills:
        qs = q[:, c.q_start : c.q_start + c.q_len, :].unsqueeze(0)
        if c.slots is None:
            ks = key[:, :, c.q_start : c.q_start + c.q_len, :]
            vs = value[:, :, c.q_start : c.q_start + c.q_len, :]
            oc = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            ks = k_cache.index_select(0, c.slots).transpose(0, 1).unsqueeze(0)
            vs = v_cache.index_select(0, c.slots).transpose(0, 1).unsqueeze(0)
            if c.mask is not None and c.mask.dtype == torch.bool:
                # Additive form, once per step: SDPA would convert a boolean mask again in every layer.
                c.mask = torch.zeros(c.mask.shape, dtype=qs.dtype, device=qs.device).masked_fill_(~c.mask, float("-inf"))
            oc = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=c.mask, scale=scaling, enable_gqa=True)
        out[c.q_start : c.q_start + c.q_len] = oc[0].transpose(0, 1)

    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)

"""Chained hashes of full KV pages, the names under which engines announce their cached prefixes.

``hash(page i) = blake2b-64(hash(page i-1) || tokens of page i as little-endian uint32)``, starting from 0. Two
prompts share the hash of page i exactly when their first (i+1)·page_size tokens agree, so a router can find the
engine holding the longest cached prefix of a prompt from KV events alone. The function is specified byte for byte
so that services in other languages can compute it too.
"""

from __future__ import annotations

import hashlib
import struct

ROOT_HASH = 0


def page_hash(parent: int, tokens: list[int] | tuple[int, ...]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return int.from_bytes(h.digest(), "little")


def prefix_page_hashes(tokens: list[int], page_size: int, limit: int | None = None) -> list[int]:
    """Hashes of the full pages of ``tokens`` (at most ``limit`` pages)."""
    n = len(tokens) // page_size
    if limit is not None:
        n = min(n, limit)
    out: list[int] = []
    parent = ROOT_HASH
    for i in range(n):
        parent = page_hash(parent, tokens[i * page_size : (i + 1) * page_size])
        out.append(parent)
    return out

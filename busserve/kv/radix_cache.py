"""Radix prefix cache over full KV pages, with LRU eviction. Plain Python (no torch, no NATS).

One tree node per full page: the node's key is the page's tokens, its value the page id. A path from the root
spells a cached prefix. The tree holds one allocator reference per node; requests that reuse a prefix take their
own references, so a page is *evictable* exactly when the tree's is the only reference left. Eviction removes the
least recently used evictable leaves first (a parent becomes a leaf once its children are gone).

Changes are recorded as KV events (chained page hashes, see ``page_hash``) for the router's cluster view.
"""

from __future__ import annotations

import heapq
import itertools

from busserve.kv.page_hash import ROOT_HASH, page_hash
from busserve.kv.pool import PageAllocator
from busserve.messages import KVCleared, KVEvent, KVRemoved, KVStored


class _Node:
    __slots__ = ("children", "hash", "key", "last_access", "page", "parent")

    def __init__(self, key: tuple[int, ...], page: int, parent: _Node | None, hash_: int, tick: int) -> None:
        self.key = key
        self.page = page
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.hash = hash_
        self.last_access = tick


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self._root = _Node((), -1, None, ROOT_HASH, 0)
        self._clock = itertools.count(1)
        self._num_nodes = 0
        self.events: list[KVEvent] = []
        # Hit statistics over generate requests (tokens asked for vs tokens found).
        self.lookup_tokens = 0
        self.hit_tokens = 0

    @property
    def num_pages(self) -> int:
        return self._num_nodes

    def _key(self, tokens: list[int], i: int) -> tuple[int, ...]:
        ps = self.page_size
        return tuple(tokens[i * ps : (i + 1) * ps])

    def match(self, tokens: list[int], limit: int, *, record: bool = True) -> list[int]:
        """Pages of the longest cached prefix of ``tokens[:limit]`` (whole pages only). Does not take references."""
        tick = next(self._clock)
        node = self._root
        pages: list[int] = []
        for i in range(min(limit, len(tokens)) // self.page_size):
            child = node.children.get(self._key(tokens, i))
            if child is None:
                break
            child.last_access = tick
            pages.append(child.page)
            node = child
        if record:
            self.lookup_tokens += limit
            self.hit_tokens += len(pages) * self.page_size
        return pages

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        """Adopt the full pages ``pages`` holding ``tokens[:len(pages)*page_size]``.

        Where the tree already caches the same tokens (in another page), the tree keeps its page and the caller's
        copy stays the caller's. Returns the number of pages newly adopted.
        """
        tick = next(self._clock)
        node = self._root
        adopted: list[int] = []
        parent_hash = ROOT_HASH
        first_parent: int | None = None
        for i, page in enumerate(pages):
            key = self._key(tokens, i)
            if len(key) < self.page_size:
                break
            child = node.children.get(key)
            if child is None:
                child = _Node(key, page, node, page_hash(node.hash, key), tick)
                node.children[key] = child
                self.allocator.incref([page])
                self._num_nodes += 1
                if not adopted:
                    first_parent = parent_hash
                adopted.append(child.hash)
            child.last_access = tick
            parent_hash = child.hash
            node = child
        if adopted:
            self.events.append(KVStored(page_hashes=adopted, parent_hash=first_parent))
        return len(adopted)

    def evictable_count(self) -> int:
        return sum(1 for n in self._iter_nodes() if self.allocator.refcount(n.page) == 1)

    def evict(self, want: int) -> int:
        """Free up to ``want`` pages held only by the cache, least recently used leaves first."""
        if want <= 0:
            return 0
        heap = [(n.last_access, id(n), n) for n in self._iter_nodes() if not n.children]
        heapq.heapify(heap)
        freed: list[int] = []
        removed: list[int] = []
        while heap and len(freed) < want:
            _, _, node = heapq.heappop(heap)
            if node.children or self.allocator.refcount(node.page) != 1:
                continue  # in use by a request (and so are its ancestors)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            self._num_nodes -= 1
            freed.append(node.page)
            removed.append(node.hash)
            if parent is not self._root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.allocator.decref(freed)
        if removed:
            self.events.append(KVRemoved(page_hashes=removed))
        return len(freed)

    def clear(self) -> int:
        """Evict everything evictable (pages in use stay). Returns pages freed."""
        freed = self.evict(self._num_nodes)
        if self._num_nodes == 0:
            self.events.append(KVCleared())
        return freed

    def drain_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def page_hashes(self) -> list[int]:
        return [n.hash for n in self._iter_nodes()]

    def pages_set(self) -> set[int]:
        return {n.page for n in self._iter_nodes()}

    def _iter_nodes(self):  # type: ignore[no-untyped-def]
        stack = list(self._root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

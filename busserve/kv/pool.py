"""Page allocator for the paged KV pool: page ids, reference counts, a free list. Plain Python.

Ownership: every holder of a page owns one reference — each request that uses it, and the prefix cache when the
page is in the radix tree. A page returns to the free list when its last reference is dropped. So "no leaked
pages" means: once no request is alive, every page is either free or held by the prefix cache alone.
"""

from __future__ import annotations

from collections.abc import Iterable


class OutOfPages(Exception):
    pass


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError("the KV pool needs at least one page")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        # Pop from the end: low page ids go out first, which keeps small pools easy to read in tests.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free_count(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def alloc(self, n: int) -> list[int]:
        """``n`` fresh pages with one reference each; raises OutOfPages (allocating nothing) if short."""
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"page {p} is free; cannot share it")
            self._refs[p] += 1

    def decref(self, pages: Iterable[int]) -> int:
        """Drop one reference per page; returns how many pages became free."""
        freed = 0
        for p in pages:
            r = self._refs[p] - 1
            if r < 0:
                raise ValueError(f"page {p} released more often than taken")
            self._refs[p] = r
            if r == 0:
                self._free.append(p)
                freed += 1
        return freed

"""Where converted models live on disk (``$BUSSERVE_MODEL_CACHE``, default under the state dir), how a GGUF file
names its cached forms, and the file lock that lets two engines starting together share one conversion."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from busserve.bus.config import state_dir


def models_cache_dir() -> Path:
    return Path(os.environ.get("BUSSERVE_MODEL_CACHE", str(state_dir() / "models")))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_key(gguf: Path) -> str:
    """Names the cached forms of ``gguf``: a changed file (size, mtime) gets new ones."""
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]

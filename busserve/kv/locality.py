"""Which engines can reach each other's shared-memory KV pools: a fact of the machine, not of its name.

Two engines may use ``shm`` only if the sender can map the segment the receiver made in /dev/shm. Host names say
nothing about that (containers on two machines often share one, and two containers on one machine may each have
their own /dev/shm), so an engine reports its *shm domain*: the kernel's boot id (one per machine and boot) with
the device and inode of its /dev/shm mount (one per tmpfs instance). Equal domains mean the same tmpfs on the same
running kernel; the sender still checks that the segment is there before writing and falls back to the bus if not
(``SubRequests`` in busserve/engine/subrequests.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from busserve.kv.storage import SHM_DIR

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def shm_domain(shm_dir: Path = SHM_DIR) -> str:
    """An opaque id equal for exactly the processes that see the same /dev/shm ("" where it cannot be known)."""
    try:
        boot = _BOOT_ID.read_text().strip()
        st = os.stat(shm_dir)
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}:{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:16]

"""Give memory back to the OS after floods (glibc malloc).

What stays after a flood (benchmarks/bench_memory.py, benchmarks/RESULTS.md):

* multipart bombs (40 parts of 16 MiB): libzmq assembles the whole message
  before the daemon sees its first part, so the peak (~710 MB) is inside
  libzmq; once answered, RSS went back to its baseline on this box with the old
  and the new code alike: the 724 MB "after" of the issue did not reproduce;
* floods of large valid frames: about 20 MB stays above the baseline, with
  the old and the new code alike. In a probe with the client in the same
  process, ``malloc_trim`` gave back 16 MB without a fixed mmap threshold and
  1 MB with it; the rest is held by native libraries' pools, not free lists.

glibc raises its mmap threshold dynamically after a large block is freed, so
later multi-MiB buffers can come from the heap arenas and stay there. As a
cheap guard the daemon fixes ``M_MMAP_THRESHOLD`` (1 MiB: every large buffer
is its own mapping, unmapped on free) and calls ``malloc_trim(0)`` once it has
been idle for a moment after a burst. Both are no-ops where glibc is absent
(musl, macOS). Python 3.8, no torch.
"""

import ctypes
import ctypes.util
import logging
import os
from typing import Any, Optional

log = logging.getLogger("nexedge.serve")

M_MMAP_THRESHOLD = -3


def _libc() -> Optional[Any]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        libc.mallopt  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def rss_bytes() -> int:
    """Resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class AllocatorTrim:
    """Fixed mmap threshold at start; ``malloc_trim`` after ``idle_s`` without work following activity."""

    def __init__(self, mmap_threshold: int = 1 << 20, idle_s: float = 1.0, enabled: bool = True) -> None:
        self.libc = _libc() if enabled else None
        self.idle_s = idle_s
        self.trims = 0
        self._dirty = False
        self._idle_since: Optional[float] = None
        if self.libc is not None and mmap_threshold > 0:
            if not self.libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)):
                log.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; large buffers may stay in the heap",
                            mmap_threshold)

    def tick(self, now: float, busy: bool) -> None:
        """Called every I/O loop: trim once when the daemon turns idle after being busy."""
        if self.libc is None:
            return
        if busy:
            self._dirty = True
            self._idle_since = None
            return
        if not self._dirty:
            return
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= self.idle_s:
            self.trim()

    def trim(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)
            self.trims += 1
        self._dirty = False
        self._idle_since = None

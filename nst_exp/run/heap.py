"""``trainer.keep_freed_memory``: the memory a step frees stays in the process for the next step (CPU, glibc).

glibc's malloc gives every block above its mmap threshold (32 MiB at most: every large activation
and gradient of a step) a mapping of its own and unmaps it when the tensor is freed. Each step then
maps, faults in and has the kernel zero every page of every large tensor again, one page fault per
4 KiB: a share of the step that grows with the image. With mmap off for the steps
(``mallopt(M_MMAP_MAX, 0)``) those blocks come from the heap, which keeps what a step frees for the
next one (``M_TRIM_THRESHOLD``: not even the heap's top goes back). After the first step almost
nothing faults, at the price of the heap's fragmentation: a higher peak RSS, so the tile plan lets a stage
keep its heap only where the memory budget has room for it (``tiling.plan.with_kept_heap``).
docs/performance-cpu.md has both sides.

Before the steps the setup's freed memory (the style targets' maps) is handed back (``malloc_trim``)
so it leaves no holes in the heap; after them mmap is on again and the heap's free memory handed back.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt's parameters and glibc's defaults for them
_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD = -1, 128 * 1024  # free memory at the heap's top above this goes back
_M_MMAP_MAX, _GLIBC_MMAP_MAX = -4, 65536  # how many blocks may have mappings of their own (0 = none)
_KEEP_ALL = 2**31 - 1  # mallopt takes an int


def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it has glibc's ``mallopt`` and ``malloc_trim`` (elsewhere None)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def freed_memory_kept(enabled: bool) -> Iterator[bool]:
    """Inside, blocks freed by the process stay in its heap (yields whether that applied: glibc only).
    The setting is process-wide: the run's steps are the process's work while it holds."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    libc.malloc_trim(0)
    if not (libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL) and libc.mallopt(_M_MMAP_MAX, 0)):
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
        libc.malloc_trim(0)

"""Handing freed heap memory back to the system.

glibc serves allocations below its mmap threshold (which grows, up to 32 MiB, with the blocks freed) from
heaps that it shrinks only at their top: the activations a batch frees stay counted in the process's
memory, scattered between live blocks, and the next batch's allocations do not fit them all, so resident
memory grows past what is live (on Qwen2.5-0.5B's shapes, about 0.5 GiB over kfac's statistics pass).
`malloc_trim` returns every free page; elsewhere there is nothing to do.

`trim` needs no scope and restores nothing: it is an action, not a setting. ``malloc_trim(0)`` hands the
free pages at the heaps' ends and between live blocks back to the kernel (``madvise``/``sbrk``) and
changes no allocator parameter (``mallopt``'s thresholds, the arenas), so allocation after it behaves as
before, with the pages faulted in again when used. Loading libc through ctypes opens the library the
process already has mapped. Importing this module calls nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim() -> None:
    """Give the heap's free pages back to the system: an action, no setting changed (see the module's note)."""
    release = _malloc_trim()
    if release is not None:
        release(0)

"""Freed heap memory goes back to the system between batches and layers (`core.heap.trim`): glibc keeps
the free blocks that lie between live ones counted in the process's memory until asked to let them go."""

import os

import pytest

from fwsvd_export.core import heap

BLOCK, BLOCKS, KEPT_EVERY = 64 * 1024, 4096, 16  # 256 MiB in blocks below glibc's mmap threshold


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(heap._malloc_trim() is None, reason="trimming the heap is a glibc call")
def test_free_blocks_between_live_ones_are_handed_back_by_a_trim():
    heap.trim()
    before = _resident_mib()
    blocks = [bytearray(BLOCK) for _ in range(BLOCKS)]  # zero-filled: every page resident
    allocated = BLOCK * BLOCKS / 2**20
    kept = blocks[::KEPT_EVERY]  # one live block in every 16 pins the heap around the freed ones
    del blocks
    freed_but_held = _resident_mib() - before
    heap.trim()
    after_trim = _resident_mib() - before
    assert freed_but_held > 0.8 * allocated  # what trim is for: free memory still counted as the process's
    assert after_trim < 0.2 * allocated  # the live sixteenth and little else
    assert len(kept) == BLOCKS // KEPT_EVERY

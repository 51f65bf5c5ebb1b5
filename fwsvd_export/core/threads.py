"""Intra-op threads for one layer's factorization, chosen for the layer and for the cores free now.

A layer's factorization is a handful of LAPACK calls (Cholesky, SVD, triangular solves) that synchronise their
threads many times each. When another process holds a core, every synchronisation waits for the thread that
is not running: on 2 cores beside one busy process, Qwen2.5-0.5B's projections took 244 s on 2 threads against
113 s on one, and MiniLM's layers 15.6 s against 3.6 s idle (benchmarks/logs/statistics-pass.md,
"Factorization"). So a layer gets one thread when it is too small for more to pay (below `PARALLEL_WORK`), and
otherwise as many as torch was given but no more than the cores other processes left free while the previous
layers were factorized (read from /proc/stat; where there is none, all of torch's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# out x in x min(out, in), the order of a layer's SVD: MiniLM's 1536 x 384 is 2.3e8, Qwen's 896 x 896 is 7.2e8
PARALLEL_WORK = 5e8
WINDOW_S = 0.2  # the shortest span that says how busy the other processes are (/proc/stat counts 10 ms ticks)


def layer_work(out_features: int, in_features: int) -> int:
    return out_features * in_features * min(out_features, in_features)


def wanted_threads(work: int, threads: int, cores: int, others_busy: float) -> int:
    """Threads for a layer of `work`: one below PARALLEL_WORK, else `threads` capped by the free cores."""
    if work < PARALLEL_WORK:
        return 1
    return max(1, min(threads, round(cores - others_busy)))


def _busy_s() -> float | None:
    """CPU seconds every process has spent busy since boot, or None without /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class _Neighbours:
    """How many cores other processes kept busy over the last window of at least WINDOW_S."""

    def __init__(self) -> None:
        self.busy = 0.0
        self._mark: tuple[float, float, float | None] = (time.perf_counter(), time.process_time(), _busy_s())

    def update(self) -> float:
        wall, mine, total = time.perf_counter(), time.process_time(), _busy_s()
        then_wall, then_mine, then_total = self._mark
        if total is None or then_total is None:
            return 0.0
        if wall - then_wall >= WINDOW_S:
            self.busy = max(0.0, (total - then_total - (mine - then_mine)) / (wall - then_wall))
            self._mark = (wall, mine, total)
        return self.busy


_NEIGHBOURS = _Neighbours()


def _cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


@contextmanager
def threads_for(out_features: int, in_features: int) -> Iterator[None]:
    """Run the block on the threads `wanted_threads` gives this layer now; torch's setting is restored."""
    before = torch.get_num_threads()
    wanted = wanted_threads(layer_work(out_features, in_features), before, _cores(), _NEIGHBOURS.update())
    if wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)

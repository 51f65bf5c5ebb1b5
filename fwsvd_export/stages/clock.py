"""Wall time and host memory of a run's stages: the stage clock and the memory helpers that the pipeline,
the sweep and the benchmarks share (one reading of /proc/self/status, one way to reset its peak)."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from ..core import heap

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_mb(key: str) -> float:
    """One memory line of /proc/self/status in MiB (Linux): "VmRSS" now, "VmHWM" the peak since the last
    reset. Raises OSError, StopIteration or ValueError where there is no such file or line."""
    with open(_STATUS) as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def reset_peak() -> None:
    """Start the peak (VmHWM) over from the current resident memory (Linux: /proc/self/clear_refs)."""
    _CLEAR_REFS.write_text("5")


def peak_rss_mb(reset: bool) -> float:
    """The process's peak resident memory (MiB) since the last reset (Linux: VmHWM, then reset when `reset`);
    elsewhere the peak since start."""
    try:
        peak = status_mb("VmHWM")
        if reset:
            reset_peak()
        return peak
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere
    nothing more), so that what one stage freed is not counted in the next stage's peak."""
    gc.collect()
    heap.trim()


class Clock:
    """Wall time and peak host memory of each stage, in order; memory a stage freed is returned to the
    system before the next one starts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self._start = self._last = time.perf_counter()
        peak_rss_mb(reset=True)

    def lap(self, stage: str) -> None:
        release_freed_memory()
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self.peak_rss_mb[stage] = round(peak_rss_mb(reset=True), 1)
        self._last = now

    def whole(self) -> dict[str, float]:
        """Seconds since the clock started and the largest stage peak: the run's own peak, which tools
        reading the process's high-water mark at exit (`/usr/bin/time`) cannot see after the resets."""
        return {
            "seconds": time.perf_counter() - self._start,
            "peak_rss_mb": max(self.peak_rss_mb.values(), default=0.0),
        }

"""Measurement helpers the benchmarks share: a training-like reference pass, rotated timings, peak RSS."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from torch import nn


def plain_pass(model: nn.Module, loss: Callable, batches: list) -> Callable[[], None]:
    """A training step minus the optimizer, per batch: forward, backward with parameter gradients."""
    def run() -> None:
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss(model, b).backward()
        model.zero_grad(set_to_none=True)
    return run


def rotated_timings(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each run, `repeats` times, the order rotated every repeat so that drift and
    neighbours' load hit every mode alike."""
    modes = list(runs)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            start = time.perf_counter()
            runs[mode]()
            times[mode].append(time.perf_counter() - start)
    return times


def _status_kb(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def extra_peak(run: Callable[[], None]) -> dict[str, float]:
    """Resident memory (MiB) before `run`, at its peak, and the difference; Linux only. Call it in a
    fresh process: the peak (VmHWM) is reset through /proc/self/clear_refs just before."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    run()
    peak = _status_kb("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_mib": peak / 1024, "extra_peak_mib": (peak - before) / 1024}


# glibc serves large blocks from its heap once frees have raised its dynamic mmap threshold; the
# heap then fragments and RSS grows from batch to batch with no tensor alive. Pinning the threshold
# makes large blocks mmap'd and returned on free, so the peak RSS reflects live memory in every mode.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_memory_worker(args: list[str]) -> dict | None:
    """Run `python <args>` in a fresh process with MEMORY_ENV; its last stdout line is extra_peak's JSON."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **MEMORY_ENV})
    if done.returncode != 0:
        print(f"memory worker {args} failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])

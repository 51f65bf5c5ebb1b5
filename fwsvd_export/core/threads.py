"""Intra-op threads for one layer's factorization, chosen for the layer's size rather than the machine's cores.

A layer's factorization is a handful of LAPACK calls (Cholesky, SVD, triangular solves) that synchronise their
threads many times each. On a small layer a second thread gains little even on idle cores, and when another
process holds a core, every synchronisation waits for the thread that is not running: measured on 2 cores with
two busy neighbours, one MiniLM feed-forward layer (1536 x 384) took 11.7 s on 2 threads against 0.34 s on one
(benchmarks/logs/statistics-pass.md, "Factorization"). So layers below `PARALLEL_WORK` run on one thread; larger
ones (where threads pay: 1.8-1.9x on Qwen2.5-0.5B's shapes with 2 idle cores) on the threads torch was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# out x in x min(out, in), the order of a layer's SVD: MiniLM's 1536 x 384 is 2.3e8, Qwen's 896 x 896 is 7.2e8
PARALLEL_WORK = 5e8


def layer_work(out_features: int, in_features: int) -> int:
    return out_features * in_features * min(out_features, in_features)


@contextmanager
def threads_for(out_features: int, in_features: int) -> Iterator[None]:
    """Run the block on one thread when the layer is too small for more to pay, else as torch is set."""
    before = torch.get_num_threads()
    if before == 1 or layer_work(out_features, in_features) >= PARALLEL_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

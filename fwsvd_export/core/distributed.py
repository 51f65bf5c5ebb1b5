"""Data-parallel compression on torch.distributed. Under ``torchrun``, each rank scores its shard of
the calibration batches and the sums are all-reduced, so every rank ends with the statistics of the
whole set (means are kept per layer, so sums are rebuilt from them and their counts, samples or
tokens, reduced in the accumulators' own float32, and divided again; counts are reduced in float64).
float32 is enough for a sum over a few ranks, and a float64 copy of the Grams would double what gloo
moves and add two conversions of every accumulator. The ranks then build the weights of, and factorize,
disjoint cost-balanced sets of layers, and rank 0 receives the factors; rank 0 alone allocates
global ranks, checks them, and writes.

Failures end every rank, never hang one: each parallel step ends with a small exchange of the ranks'
errors, so when one rank's part raises, all raise its error (a FwsvdError stays one: bad input), and
every collective has the process group's timeout (``FWSVD_COLLECTIVE_TIMEOUT_S``, default 600 s) for
a rank that dies or stops answering outside those steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import FwsvdError
from .batch import Batch
from .statistics import STATISTICS, LayerStats, link_shared_inputs

# The group `joined` made for `start_together`, None outside that block (and where the caller made the group).
_start_group: dist.ProcessGroup | None = None

T = TypeVar("T")


class PeerFailed(RuntimeError):
    """Another rank's part of a parallel step raised an error that is not bad input; the message names
    the rank and its error (the rank prints its own traceback)."""


def world() -> tuple[int, int]:
    """(rank, number of ranks); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_timeout() -> timedelta:
    """Every collective's timeout: ``FWSVD_COLLECTIVE_TIMEOUT_S`` (default 600 s), read when a group is joined."""
    return timedelta(seconds=int(os.environ.get("FWSVD_COLLECTIVE_TIMEOUT_S", "600")))


def start_timeout() -> timedelta:
    """How long the other ranks wait for rank 0 to reach the statistics pass: it exports and validates the
    dense model first, which takes far longer than any collective on a large model. torchrun ends every rank
    when one dies, so this only bounds a rank 0 that hangs. ``FWSVD_START_TIMEOUT_S``, default 6 hours."""
    return timedelta(seconds=int(os.environ.get("FWSVD_START_TIMEOUT_S", str(6 * 3600))))


@contextmanager
def joined() -> Iterator[bool]:
    """Meanwhile, this process is in the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR,
    ...): NCCL on GPUs, one GPU per local rank, gloo on CPUs. Yields whether it runs with other processes:
    False when not launched by torchrun with more than one, and nothing is changed then.

    Scoped: a group made here is left on exit, the block raising or not, while the interpreter still runs
    (left to the teardown at exit, a gloo group whose peer has already gone can abort the process with
    SIGABRT after its error was printed), and the current CUDA device it set is set back. A group that
    was already initialised (its maker's to end) is used as found and left alone; `start_together` is
    then a no-op."""
    global _start_group
    if dist.is_available() and dist.is_initialized():
        yield True
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield False
        return
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    if device is not None:  # NCCL and the object collectives use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    found = _start_group
    try:
        dist.init_process_group("nccl" if device is not None else "gloo", timeout=collective_timeout())
        _start_group = dist.new_group(backend="gloo", timeout=start_timeout())
        yield True
    finally:
        _start_group = found
        if dist.is_initialized():
            dist.destroy_process_group()  # every group, the start group too
        if device is not None:
            torch.cuda.set_device(device)


def start_together() -> None:
    """Every rank waits here until all have arrived (rank 0 after its dense stage), with `start_timeout`
    rather than the collective timeout; a no-op outside a group made by `joined`."""
    if _start_group is not None:
        dist.barrier(group=_start_group)


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def shard(batches: list[Batch]) -> list[Batch]:
    rank, size = world()
    return batches[rank::size]


def all_reduce_statistics(stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Every rank's statistics of its shard -> the statistics of all shards, on every rank. Layers and
    statistics are visited in sorted order, so all ranks issue the same collectives."""
    device = _device()
    for name in sorted(stats):
        s = stats[name]
        counts = torch.tensor([s.samples, s.tokens], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        samples, tokens = int(counts[0]), int(counts[1])
        for stat in sorted(s.values):
            if s.shares_input_with is not None and STATISTICS[stat].reads == "input":
                continue  # the owner's tensor, reduced once with the owner and linked again below
            mine = s.samples if STATISTICS[stat].per == "sample" else s.tokens
            total = s.values[stat].to(device) * mine
            dist.all_reduce(total)
            whole = samples if STATISTICS[stat].per == "sample" else tokens
            s.values[stat] = total.div_(max(whole, 1)).cpu()
        s.samples, s.tokens = samples, tokens
    return link_shared_inputs(stats)


def broadcast_statistics(stats: dict[str, LayerStats], names: list[str]) -> dict[str, LayerStats]:
    """Rank 0's statistics of `names` (a cache hit) on every rank, one layer at a time; an input
    statistic a layer shares with another travels once, with its owner."""
    rank, _ = world()
    received: dict[str, LayerStats] = {}
    for name in sorted(names):
        s = stats[name] if rank == 0 else None
        if s is not None and s.shares_input_with is not None:
            s = LayerStats(
                {k: v for k, v in s.values.items() if STATISTICS[k].reads != "input"},
                s.samples,
                s.tokens,
                s.shares_input_with,
            )
        box = [s]
        dist.broadcast_object_list(box, 0)
        assert box[0] is not None, "rank 0 sends every named layer's statistics"
        received[name] = box[0]
    return stats if rank == 0 else link_shared_inputs(received)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (e.g. whether its statistics cache answered)."""
    value = torch.tensor([int(flag)], device=_device())
    dist.broadcast(value, 0)
    return bool(value.item())


def assign(costs: dict[str, float], size: int) -> dict[str, int]:
    """Each item's rank, balancing the summed cost: the costliest item first, each to the least-loaded
    rank (ties: the lower rank; equal costs keep the given order), so every rank computes the same split."""
    load = [0.0] * size
    owners = {}
    for name in sorted(costs, key=lambda n: -costs[n]):
        rank = min(range(size), key=load.__getitem__)
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def _failure(exc: Exception) -> tuple[bool, str]:
    """(whether it is bad input, the message the other ranks show)."""
    if isinstance(exc, FwsvdError):
        return True, str(exc)
    return False, f"{type(exc).__name__}: {exc}"


def _raise(failures: list[tuple[bool, str] | None], what: str) -> None:
    for rank, failure in enumerate(failures):
        if failure is not None:
            bad_input, message = failure
            raise (FwsvdError if bad_input else PeerFailed)(f"process {rank} of {len(failures)}, {what}: {message}")


def together(work: Callable[[], T], what: str) -> T:
    """This rank's part of a parallel step, then an exchange of the ranks' errors: a rank whose part
    raised re-raises its own error, and the others raise it too, naming the rank (`what` says which
    step), so all ranks stop at once."""
    size = world()[1]
    if size == 1:
        return work()
    failures: list[tuple[bool, str] | None] = [None] * size
    try:
        value = work()
    except Exception as exc:
        dist.all_gather_object(failures, _failure(exc))
        raise
    dist.all_gather_object(failures, None)
    _raise(failures, what)
    return value


def from_first(work: Callable[[], T], what: str) -> T:
    """`work` run on rank 0 alone, its result (or its error) on every rank."""
    rank, size = world()
    if size == 1:
        return work()
    box: list[Any] = [None]  # rank 0's (failure, result), pickled
    try:
        if rank == 0:
            box[0] = (None, work())
    except Exception as exc:
        dist.broadcast_object_list([(_failure(exc), None)], 0)
        raise
    dist.broadcast_object_list(box, 0)
    failure: tuple[bool, str] | None
    value: T
    failure, value = box[0]
    _raise([failure] + [None] * (size - 1), what)
    return value


def to_first(items: list[T]) -> Iterator[T]:
    """Every rank's `items` on rank 0, which yields its own first, then one item from each other rank
    per round, so no rank holds another's items all at once; other ranks yield nothing. Every rank
    must exhaust it (it holds collectives)."""
    rank, size = world()
    if rank == 0:
        yield from items
    if size == 1:
        return
    count = torch.tensor([len(items)], device=_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    for k in range(int(count.item())):
        received: list[T | None] | None = [None] * size if rank == 0 else None
        dist.gather_object(items[k] if rank and k < len(items) else None, received, dst=0)
        yield from (item for item in received or [] if item is not None)

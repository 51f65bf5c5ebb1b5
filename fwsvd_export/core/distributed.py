"""Data-parallel statistics on torch.distributed: under ``torchrun``, each rank scores its shard of the
calibration batches and the sums are all-reduced, so every rank ends with the statistics of the whole
set. Means are kept per layer, so sums are rebuilt from them and their counts (samples or tokens),
reduced in float64, and divided again. Rank 0 alone factorizes and writes; a rank that fails makes the
others fail at the collective's timeout, never hang.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .batch import Batch
from .statistics import STATISTICS, LayerStats, link_shared_inputs

TIMEOUT = timedelta(seconds=int(os.environ.get("FWSVD_COLLECTIVE_TIMEOUT_S", "600")))


def world() -> tuple[int, int]:
    """(rank, number of ranks); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL on GPUs,
    gloo on CPUs. False when not launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return True


def shard(batches: list[Batch]) -> list[Batch]:
    rank, size = world()
    return batches[rank::size]


def all_reduce_statistics(stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Every rank's statistics of its shard -> the statistics of all shards, on every rank. Layers and
    statistics are visited in sorted order, so all ranks issue the same collectives."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    for name in sorted(stats):
        s = stats[name]
        counts = torch.tensor([s.samples, s.tokens], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        samples, tokens = int(counts[0]), int(counts[1])
        for stat in sorted(s.values):
            if s.shares_input_with is not None and STATISTICS[stat].reads == "input":
                continue  # the owner's tensor, reduced once with the owner and linked again below
            mine = s.samples if STATISTICS[stat].per == "sample" else s.tokens
            total = s.values[stat].double().to(device) * mine
            dist.all_reduce(total)
            whole = samples if STATISTICS[stat].per == "sample" else tokens
            s.values[stat] = (total / max(whole, 1)).float().cpu()
        s.samples, s.tokens = samples, tokens
    return link_shared_inputs(stats)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (e.g. whether its statistics cache answered)."""
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(value, 0)
    return bool(value.item())

"""Global rank allocation: spend a parameter budget where it removes the most weighted error.

The paper keeps the same fraction of ranks in every matrix. Here each layer's weighted spectrum s
(singular values of P W Q) says what truncating it costs: keeping rank r leaves sum_{i>r} s_i^2. Under
kfac and fwsvd weightings that tail estimates the loss increase, so tails compare across layers.
A greedy pass grows, one step of `multiple` ranks at a time, the layer whose next step removes the most
error per parameter; a layer that would reach break-even is restored to dense instead.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .factorize import break_even_rank


@dataclass
class Candidate:
    name: str
    in_features: int
    out_features: int
    spectrum: torch.Tensor  # weighted singular values, descending


def _cap(c: Candidate, multiple: int) -> int:
    """The largest rank that is a multiple of `multiple` and still saves parameters."""
    be = break_even_rank(c.in_features, c.out_features)
    top = int(be) if int(be) < be else int(be) - 1
    return (min(top, c.spectrum.numel()) // multiple) * multiple


def allocate_ranks(candidates: list[Candidate], budget_params: int, multiple: int = 1) -> dict[str, int | None]:
    """Rank per layer (None: keep dense) with the factor parameters summing to at most `budget_params`."""
    multiple = max(1, multiple)
    energy = {c.name: c.spectrum.double().square() for c in candidates}
    # Layers too small to factorize at this multiple stay dense; the rest start with one step.
    dense = {c.name for c in candidates if _cap(c, multiple) < multiple}
    ranks = {c.name: multiple for c in candidates}
    spent = sum(c.in_features * c.out_features if c.name in dense else multiple * (c.in_features + c.out_features)
                for c in candidates)
    heap: list[tuple[float, str]] = []
    by_name = {c.name: c for c in candidates}

    def push(c: Candidate) -> None:
        r, cap = ranks[c.name], _cap(c, multiple)
        e = energy[c.name]
        if r + multiple <= cap:
            gain = float(e[r:r + multiple].sum()) / (multiple * (c.in_features + c.out_features))
            heapq.heappush(heap, (-gain, c.name))
        elif r < e.numel():  # the next step is the whole rest: going dense
            cost = c.in_features * c.out_features - r * (c.in_features + c.out_features)
            heapq.heappush(heap, (-float(e[r:].sum()) / max(cost, 1), c.name))

    for c in candidates:
        if c.name not in dense:
            push(c)
    while heap:
        _, name = heapq.heappop(heap)
        c = by_name[name]
        r, cap = ranks[name], _cap(c, multiple)
        if r + multiple <= cap:
            cost = multiple * (c.in_features + c.out_features)
            if spent + cost > budget_params:
                continue
            ranks[name] = r + multiple
            spent += cost
            push(c)
        else:
            cost = c.in_features * c.out_features - r * (c.in_features + c.out_features)
            if spent + cost > budget_params:
                continue
            dense.add(name)
            spent += cost
    return {name: (None if name in dense else r) for name, r in ranks.items()}

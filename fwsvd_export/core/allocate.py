"""Global rank allocation: spend a budget where it removes the most weighted error.

The paper keeps the same fraction of ranks in every matrix. Here each layer's weighted spectrum s
(singular values of P W Q) says what truncating it costs: keeping rank r leaves sum_{i>r} s_i^2. Under
kfac and fwsvd weightings that tail estimates the loss increase, so tails compare across layers.
A greedy pass grows, one step of `multiple` ranks at a time, the layer whose next step removes the most
error per unit of cost; a layer that would reach break-even is restored to dense instead.

The cost is any additive price of a layer at a rank: its parameters (a budget of weights), or its
measured time from a per-layer table of (rank, milliseconds) (a budget of latency, for a speed-up
target). Kernels step with the rank, so a time table can make several ranks cost the same: such steps
are free and taken first.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SpecError
from .lowrank import break_even_rank


@dataclass
class Candidate:
    name: str
    in_features: int
    out_features: int
    spectrum: torch.Tensor  # weighted singular values, descending


Cost = Callable[[Candidate, int | None], float]  # a layer's price at a rank (None: dense); additive over layers


def parameters(c: Candidate, rank: int | None) -> int:
    """The weights a layer keeps: in*out dense, rank*(in+out) as two factors."""
    return c.in_features * c.out_features if rank is None else rank * (c.in_features + c.out_features)


@dataclass(frozen=True)
class CostTable:
    """One layer's measured price (e.g. milliseconds) at a grid of ranks, and dense. Costs must not
    decrease with the rank (smooth measurements first); a rank between grid points costs what the next
    grid rank does (a kernel pads the rank up to its tile), above the grid it is extrapolated in proportion;
    with no grid (no rank saves parameters) every rank is unaffordable."""

    ranks: tuple[int, ...]  # ascending
    costs: tuple[float, ...]  # non-decreasing, one per rank
    dense: float

    def __post_init__(self) -> None:
        if len(self.ranks) != len(self.costs):
            raise ValueError("a cost table needs one cost per rank")
        if any(b <= a for a, b in zip(self.ranks, self.ranks[1:])) or any(
            b < a for a, b in zip(self.costs, self.costs[1:])
        ):
            raise ValueError("a cost table's ranks must ascend and its costs must not decrease")

    def __call__(self, rank: int | None) -> float:
        if rank is None:
            return self.dense
        if not self.ranks:  # no rank saves parameters in this layer
            return math.inf
        i = bisect.bisect_left(self.ranks, rank)
        return self.costs[i] if i < len(self.ranks) else self.costs[-1] * rank / self.ranks[-1]


def table_costs(tables: dict[str, CostTable]) -> Cost:
    """The cost function of per-layer tables (keyed by layer name)."""
    return lambda c, rank: tables[c.name](rank)


def _cap(c: Candidate, multiple: int, cost: Cost = parameters) -> int:
    """The largest rank that is a multiple of `multiple`, still saves parameters and costs less than
    dense (0: none does)."""
    be = break_even_rank(c.in_features, c.out_features)
    top = int(be) if int(be) < be else int(be) - 1
    rank = (min(top, c.spectrum.numel()) // multiple) * multiple
    dense = cost(c, None)
    while rank >= multiple and cost(c, rank) >= dense:
        rank -= multiple
    return rank


def allocate_ranks(candidates: list[Candidate], budget_params: int, multiple: int = 1) -> dict[str, int | None]:
    """Rank per layer (None: keep dense) with the factor parameters summing to at most `budget_params`."""
    return allocate(candidates, budget_params, multiple, parameters)


def allocate(
    candidates: list[Candidate], budget: float, multiple: int = 1, cost: Cost = parameters
) -> dict[str, int | None]:
    """Rank per layer (None: keep dense) with `cost` summed over the layers at most `budget`."""
    multiple = max(1, multiple)
    energy = {c.name: c.spectrum.double().square() for c in candidates}
    caps = {c.name: _cap(c, multiple, cost) for c in candidates}
    # Layers too small (or too slow) to factorize at this multiple stay dense; the rest start with one step.
    dense = {c.name for c in candidates if caps[c.name] < multiple}
    ranks = {c.name: multiple for c in candidates}
    spent = sum(cost(c, None if c.name in dense else multiple) for c in candidates)
    heap: list[tuple[float, str]] = []
    by_name = {c.name: c for c in candidates}

    def step(c: Candidate) -> tuple[int | None, float]:
        """The layer's next rank (None: dense) and what it adds to the cost."""
        r = ranks[c.name]
        nxt = r + multiple if r + multiple <= caps[c.name] else None
        return nxt, cost(c, nxt) - cost(c, r)

    def push(c: Candidate) -> None:
        r, e = ranks[c.name], energy[c.name]
        nxt, price = step(c)
        if nxt is None and r >= e.numel():
            return
        removed = float(e[r:nxt].sum())
        heapq.heappush(heap, (-(removed / price if price > 0 else math.inf), c.name))

    for c in candidates:
        if c.name not in dense:
            push(c)
    while heap:
        _, name = heapq.heappop(heap)
        c = by_name[name]
        nxt, price = step(c)
        if spent + price > budget:
            continue
        spent += price
        if nxt is None:
            dense.add(name)
        else:
            ranks[name] = nxt
            push(c)
    return {name: (None if name in dense else r) for name, r in ranks.items()}


def speedup_budget(
    tables: dict[str, CostTable],
    allocated: list[str],
    fixed: dict[str, int | None],
    model_ms: float,
    target_speedup: float,
    multiple: int,
    where: str,
) -> float:
    """Milliseconds the `allocated` layers may take together for a model measured at `model_ms` to run
    `target_speedup` times faster: their dense time less the saving still needed once the `fixed` layers
    (name: rank, None dense) have given theirs. Raises SpecError when even `multiple` ranks everywhere
    (or dense, where that is faster) would not reach the target; `where` names the provider and shape."""
    saving = model_ms * (1 - 1 / target_speedup)
    fixed_saving = sum(tables[n].dense - tables[n](r) for n, r in fixed.items())
    budget = sum(tables[n].dense for n in allocated) - (saving - fixed_saving)
    floor = sum(min(tables[n](multiple), tables[n].dense) for n in allocated)
    if budget < floor:
        linear = sum(t.dense for t in tables.values())
        best = model_ms - fixed_saving - sum(tables[n].dense for n in allocated) + floor
        reach = model_ms / best if best > 0 else math.inf
        raise SpecError(
            "target_speedup",
            f"{target_speedup:g} {where} cannot be reached: the targeted Linear layers take "
            f"{linear:.3g} ms of the model's {model_ms:.3g} ms, and with rank {multiple} in every allocated layer "
            f"the model would run at most {reach:.2f}x faster; ask for less, or target more layers",
        )
    return budget


@dataclass(frozen=True)
class TimeBudget:
    """What a speed-up target is spent from: each targeted layer's measured cost table, the dense
    model's measured time, and where both were measured (provider, shape, precision), for messages.

    The tables are scaled to the layers' time inside the model (`in_graph_ratio` is the median of
    in-model over alone), and their sum should not exceed the model's time; when it does (per-run
    costs the model pays once), the model is taken to take at least its targeted layers' time, so
    that a saving is never counted against time the model does not spend."""

    tables: dict[str, CostTable]
    model_ms: float
    where: str
    multiple: int = 1  # the tables' ranks are multiples of this
    in_graph_ratio: float = 1.0

    @property
    def linear_ms(self) -> float:
        """The targeted layers' dense time, summed from their tables."""
        return sum(t.dense for t in self.tables.values())

    @property
    def total_ms(self) -> float:
        """The model's time the budget is taken from: as measured, but at least `linear_ms`."""
        return max(self.model_ms, self.linear_ms)

    def budget(self, allocated: list[str], fixed: dict[str, int | None], target_speedup: float, multiple: int) -> float:
        """`speedup_budget` for these tables; raises when the target is out of reach."""
        return speedup_budget(
            self.tables,
            allocated,
            {n: r for n, r in fixed.items() if n in self.tables},
            self.total_ms,
            target_speedup,
            multiple,
            self.where,
        )

    def predicted_speedup(self, ranks: dict[str, int | None]) -> float:
        """The model's speed-up if its targeted layers take their tables' time at `ranks` and the rest stays."""
        saved = sum(self.tables[n].dense - self.tables[n](r) for n, r in ranks.items() if n in self.tables)
        return self.total_ms / max(self.total_ms - saved, 1e-9)

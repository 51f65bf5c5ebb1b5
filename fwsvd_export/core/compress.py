"""The one verb of the Python API: ``compress_(model, spec, calibration, loss_fn)`` picks the Linear
layers a plan targets, gathers the statistics its method needs, and replaces each layer in place by
its two-factor LowRankLinear. Layers whose rank would not save parameters stay dense, with a reason.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import FwsvdError, SpecError
from . import distributed, heap, stats_cache
from .allocate import Candidate, TimeBudget, allocate, allocate_ranks, table_costs
from .allocation_check import Layer, candidates, choose, held_out
from .batch import Batch, LossFn
from .families import family_of
from .lowrank import (
    GramSide,
    LowRankLinear,
    ProjectedSide,
    balance_,
    break_even_rank,
    linear_weight,
    low_rank_from_linear,
    low_rank_module,
    nonfinite,
    pays_off,
    rank_for_ratio,
    weighted_eigen,
    weighted_spectrum,
)
from .methods import Method, Weighting, get_method
from .modules import linear_layers, set_module, tied_parameters
from .spec import CompressionSpec
from .statistics import LayerStats, collect_statistics, statistic_bytes, with_projections
from .threads import threads_for


@dataclass
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    rank: int | None  # None: stays dense
    reason: str = ""  # why it stays dense, or which rule chose the rank
    params_before: int = 0
    params_after: int = 0
    weighted_error: float | None = None  # relative tail energy of the weighted spectrum
    notes: list[str] = field(default_factory=list)
    allocate: bool = False  # rank chosen by the global budget allocation


@dataclass
class CompressionResult:
    method: str
    layers: list[LayerPlan]
    # statistics pass, factorization; the allocation check's candidates and sequential calibration apart
    seconds: dict[str, float] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)  # passes made, cache hit or store
    allocation: dict[str, Any] = field(default_factory=dict)  # budget: the candidates checked, their losses, the winner
    factorization: dict[str, Any] = field(default_factory=dict)  # processes that factorized, layers each

    @property
    def compressed(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.rank is not None]

    def summary(self) -> dict[str, Any]:
        before = sum(p.params_before for p in self.layers)
        after = sum(p.params_after for p in self.layers)
        return {
            "method": self.method,
            "targeted_layers": len(self.layers),
            "compressed_layers": len(self.compressed),
            "dense_layers": len(self.layers) - len(self.compressed),
            "targeted_params_before": before,
            "targeted_params_after": after,
            "targeted_kept_ratio": after / before if before else 1.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "statistics": self.statistics,
            "allocation": self.allocation,
            "factorization": self.factorization,
            "layers": [asdict(p) for p in self.layers],
        }


def _uniform_rank(in_f: int, out_f: int, ratio: float | None, rank: int | None, multiple: int) -> int:
    if rank is None:
        assert ratio is not None, "a uniform cut has a ratio or a rank (CompressionSpec and LayerOverride check)"
        rank = rank_for_ratio(in_f, out_f, ratio)
    return max(multiple, rank // multiple * multiple) if multiple > 1 else rank


def plan_layers(model: nn.Module, spec: CompressionSpec) -> list[LayerPlan]:
    """Decide each targeted layer's rank; raises when the plan cannot apply to this model.
    Under a budget, layers without an override get ``allocate=True`` and their rank later."""
    layers = linear_layers(model)
    family = family_of(model)
    target, exclude = (spec.target, []) if spec.target is not None else (list(family.targets), list(family.exclude))
    exclude = exclude + spec.exclude
    chosen = {
        name: m
        for name, m in layers.items()
        if any(re.search(p, name) for p in target) and not any(re.search(p, name) for p in exclude)
    }
    if not chosen:
        sample = ", ".join(list(layers)[:8]) + (" ..." if len(layers) > 8 else "")
        raise SpecError(
            "target", f"{target} (exclude {exclude}) matches no Linear layer; the model's Linear layers are: {sample}"
        )
    for pattern in spec.overrides:
        if not any(re.search(pattern, name) for name in chosen):
            raise SpecError("overrides", f"key '{pattern}' matches no targeted layer")
    tied = tied_parameters(model)
    plans = []
    for name, module in chosen.items():
        out_f, in_f = linear_weight(module).shape
        dense = in_f * out_f
        ratio, rank, rule = (None, None, "uniform") if spec.allocates else (spec.ratio, spec.rank, "uniform")
        for pattern, override in spec.overrides.items():
            if re.search(pattern, name):
                ratio, rank, rule = override.ratio, override.rank, f"override '{pattern}'"
                break
        plan = LayerPlan(name, in_f, out_f, None, rule, params_before=dense, params_after=dense)
        plans.append(plan)
        if id(module.weight) in tied:
            plan.reason = "weight is tied to another module; kept dense"
            continue
        if rank is not None and rank > min(in_f, out_f):
            raise FwsvdError(
                f"rank {rank} ({rule}) is larger than layer '{name}' allows: "
                f"its weight is {out_f}x{in_f}, so its rank is at most {min(in_f, out_f)}"
            )
        if rank is None and ratio is None:  # budget mode, no override
            plan.allocate, plan.reason = (
                True,
                (
                    f"global allocation, budget {spec.budget:g} of {spec.budget_scope}"
                    if spec.budget is not None
                    else f"global allocation of time, {spec.target_speedup:g}x faster on {spec.latency_provider} at {spec.latency_shape}"
                ),
            )
            continue
        if ratio is not None and ratio >= 1:
            plan.reason = "ratio 1 keeps the layer dense"
            continue
        plan.rank = _uniform_rank(in_f, out_f, ratio, rank, spec.multiple)
        plan.reason = f"{rule}, " + (f"rank {rank}" if rank is not None else f"ratio {ratio:g}")
        if not pays_off(in_f, out_f, plan.rank):
            plan.reason = f"rank {plan.rank} would not save parameters (break-even {break_even_rank(in_f, out_f):.1f}); kept dense"
            plan.rank = None
        else:
            plan.params_after = plan.rank * (in_f + out_f)
    return plans


def _passes(todo: dict[str, nn.Module], needs: set[str], spec: CompressionSpec) -> list[dict[str, nn.Module]]:
    """Groups of layers whose statistics fit `memory_budget_gb`; one calibration pass each."""
    if spec.memory_budget_gb is None:
        return [todo]
    limit = spec.memory_budget_gb * 2**30
    groups: list[dict[str, nn.Module]] = [{}]
    used = 0
    for name, module in todo.items():
        out_f, in_f = linear_weight(module).shape
        size = statistic_bytes(in_f, out_f, needs, spec.max_gram_size)
        if groups[-1] and used + size > limit:
            groups.append({})
            used = 0
        groups[-1][name] = module
        used += size
    return groups


def gather_statistics(
    model: nn.Module,
    todo: dict[str, nn.Module],
    needs: set[str],
    spec: CompressionSpec,
    calibration: list[Batch],
    loss_fn: LossFn | None,
    progress: bool,
    cache_base: Path | None = None,
    runner: nn.Module | None = None,
) -> tuple[dict[str, LayerStats], dict[str, Any]]:
    """Statistics for `todo` from the cache when it has them, else from one pass per memory group,
    run on `runner` (a copy of `model` with the same weights, placed elsewhere) when given. Under
    torch.distributed each rank scores its shard and the sums are all-reduced; the cache is rank 0's,
    and its hit reaches the other ranks by broadcast. Every rank ends with the same statistics. `loss_fn`
    may be None only when there is nothing to gather (`needs` or `todo` empty)."""
    info: dict[str, Any] = {"passes": 0, "cache": None}
    if not needs or not todo:
        return {name: LayerStats() for name in todo}, info
    if loss_fn is None:
        raise FwsvdError(f"the statistics {sorted(needs)} need a task loss")
    rank, ranks = distributed.world()
    folder, key, cached = None, "", None  # rank 0's cache folder, key and hit
    if spec.cache_dir is not None and rank == 0:
        folder = Path(spec.cache_dir) if cache_base is None else cache_base / spec.cache_dir
        key = stats_cache.cache_key(model, todo, calibration, loss_fn, spec.max_gram_size)
        cached = _load_cache(folder, key, todo, needs, info)
    if ranks > 1 and distributed.broadcast_flag(cached is not None):  # rank 0's hit is a hit for all
        return distributed.broadcast_statistics(cached or {}, list(todo)), info
    if cached is not None:
        return cached, info
    stats = _collect(model if runner is None else runner, todo, needs, spec, calibration, loss_fn, progress, info)
    if folder is not None:
        check_finite_statistics(stats, needs)  # never cache what the run will refuse
        info["cache"] = f"stored {stats_cache.save_cached(folder, key, stats)}"
    return stats, info


def _load_cache(
    folder: Path, key: str, todo: dict[str, nn.Module], needs: set[str], info: dict[str, Any]
) -> dict[str, LayerStats] | None:
    """The cached statistics, or None on a miss. A file that cannot be read back or holds non-finite values
    (bit rot, or a file written by hand) is a miss too, noted in `info`: gathered again and replaced."""
    try:
        cached = stats_cache.load_cached(folder, key, list(todo), needs)
    except stats_cache.Unreadable as exc:
        cached, info["cache_unreadable"] = None, f"{exc}; gathered again and replaced"
    found = _first_nonfinite(cached, needs) if cached is not None else None
    if found:
        cached, info["cache_unreadable"] = (
            None,
            f"{folder / key}.safetensors holds non-finite values in {found[0]}.{found[1]}; gathered again and replaced",
        )
    if cached is not None:
        info["cache"] = f"hit {folder / key}.safetensors"
    return cached


def _collect(
    runner: nn.Module,
    todo: dict[str, nn.Module],
    needs: set[str],
    spec: CompressionSpec,
    calibration: list[Batch],
    loss_fn: LossFn,
    progress: bool,
    info: dict[str, Any],
) -> dict[str, LayerStats]:
    """The statistics from one calibration pass per memory group, run on `runner`; under torch.distributed
    each rank scores its shard of `calibration` and the sums are all-reduced. Counts the passes in `info`."""
    rank, ranks = distributed.world()
    if ranks > 1 and len(calibration) < ranks:
        raise FwsvdError(
            f"{len(calibration)} calibration batches cannot be shared by {ranks} processes; "
            "use more calibration data, smaller batches, or fewer processes"
        )
    shard = distributed.shard(calibration) if ranks > 1 else calibration
    stats: dict[str, LayerStats] = {}
    for group in _passes(todo, needs, spec):
        weights = {name: todo[name] for name in group}  # an offloaded runner's own are not there in the hooks
        group = {name: runner.get_submodule(name) for name in group}
        part = distributed.together(
            partial(
                collect_statistics,
                runner,
                group,
                shard,
                loss_fn,
                needs,
                progress and rank == 0,
                spec.max_gram_size,
                spec.gradient_checkpointing,
                weights,
            ),
            "calibration statistics of its shard",
        )
        stats.update(distributed.all_reduce_statistics(part) if ranks > 1 else part)
        info["passes"] += 1
    if ranks > 1:
        info["ranks"] = ranks
    return stats


def check_finite_model(model: nn.Module) -> None:
    """A NaN or inf anywhere in the model poisons every gradient and every factor: refuse it up front."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        bad = nonfinite(tensor.detach())
        if bad:
            raise FwsvdError(
                f"the model's '{name}' holds {bad}; fwsvd-export compresses only models with finite weights"
            )


def _first_nonfinite(stats: dict[str, LayerStats], needs: set[str]) -> tuple[str, str, str] | None:
    """(layer, statistic, what is wrong) for the first non-finite statistic, None when all are finite."""
    for layer, s in stats.items():
        for name in sorted(with_projections(needs)):
            value = getattr(s, name)
            bad = "" if value is None else nonfinite(value)
            if bad:
                return layer, name, bad
    return None


def check_finite_statistics(stats: dict[str, LayerStats], needs: set[str]) -> None:
    found = _first_nonfinite(stats, needs)
    if found:
        layer, name, bad = found
        raise FwsvdError(
            f"calibration statistic '{name}' of layer '{layer}' holds {bad}: the task loss or its gradient "
            "overflowed (a float16 model whose backward pass overflows: load it as float32 with "
            "model.dtype; or calibration data the model cannot score)"
        )


def gather_for(
    model: nn.Module,
    specs: list[CompressionSpec],
    calibration: list[Batch],
    loss_fn: LossFn,
    progress: bool = True,
    cache_base: Path | None = None,
    runner: nn.Module | None = None,
) -> tuple[dict[str, LayerStats], dict[str, Any]]:
    """One statistics pass for several specs that differ in method and cut: the union of the layers
    they target and of the statistics their methods need. Pass settings (memory, Gram size, cache)
    come from the first spec."""
    layers: dict[str, nn.Module] = {}
    for spec in specs:
        layers.update(
            {p.name: model.get_submodule(p.name) for p in plan_layers(model, spec) if p.rank is not None or p.allocate}
        )
    needs = set().union(*(get_method(spec.method).needs for spec in specs))
    calibration = _split(specs[0], calibration, loss_fn)[0]  # the points' allocation checks hold out the same slice
    check_finite_model(model)
    stats, info = gather_statistics(model, layers, needs, specs[0], calibration, loss_fn, progress, cache_base, runner)
    check_finite_statistics(stats, needs)
    return stats, info


def _split(spec: CompressionSpec, calibration: list[Batch], loss_fn: LossFn | None) -> tuple[list[Batch], list[Batch]]:
    """(statistics batches, allocation-check batches): only a budget with a task loss is checked."""
    if spec.budget is None or loss_fn is None:
        return calibration, []
    return held_out(calibration, spec.allocation_check)


def _budget_params(model: nn.Module, plans: list[LayerPlan], spec: CompressionSpec) -> int:
    """Parameters the allocated layers may use, after fixed layers (and, for scope 'model', the rest)."""
    assert spec.budget is not None, "only a parameter budget is spent in parameters (callers check)"
    fixed = sum(p.params_after for p in plans if not p.allocate)
    if spec.budget_scope == "model":
        targeted = sum(p.params_before for p in plans)
        return (
            int(spec.budget * sum(q.numel() for q in model.parameters()))
            - (sum(q.numel() for q in model.parameters()) - targeted)
            - fixed
        )
    return int(spec.budget * sum(p.params_before for p in plans)) - fixed


def _check_budget(model: nn.Module, plans: list[LayerPlan], spec: CompressionSpec) -> None:
    """Fail before the statistics pass when the budget cannot give every allocated layer one rank step."""
    allocated = [p for p in plans if p.allocate]
    if spec.budget is None or not allocated:  # a speed-up target is checked against its time budget instead
        return
    budget = _budget_params(model, plans, spec)
    if budget < sum(spec.multiple * (p.in_features + p.out_features) for p in allocated):
        raise SpecError(
            "budget",
            f"{spec.budget:g} of {spec.budget_scope} parameters leaves {max(budget, 0)} for "
            f"{len(allocated)} layers, too few for rank {spec.multiple} each",
        )


def _checked(
    model: nn.Module,
    allocated: list[LayerPlan],
    todo: dict[str, nn.Module],
    weightings: dict[str, Weighting],
    ranks: dict[str, int | None],
    budget: int,
    spec: CompressionSpec,
    check: list[Batch],
    loss_fn: LossFn,
    result: CompressionResult,
    reused: bool,
) -> dict[str, int | None]:
    """The allocation that wins the check on held-out calibration batches; recorded in `result`."""
    layers = []
    for p in allocated:
        w = weightings[p.name]
        layers.append(Layer(p.name, p.in_features, p.out_features, todo[p.name], w.left, w.right, w.eigen))
    options = candidates(layers, ranks, budget, spec.multiple)
    clock = time.perf_counter()
    winner, scores = choose(model, layers, options, budget, check, loss_fn)
    result.seconds["allocation check"] = time.perf_counter() - clock
    for layer in layers:  # the winner's factors are the leading components of the check's
        weightings[layer.name].factors = layer.factors
    result.allocation = {
        "winner": winner,
        "candidates": scores,
        "check_batches": len(check),
        "held_out": not reused,  # with one calibration batch the check reuses it
        "global_minus_winner_loss": scores["global"]["loss"] - scores[winner]["loss"],
    }
    for p in allocated:
        p.reason += f"; '{winner}' ranks won the allocation check"
    return options[winner]


def compress_(
    model: nn.Module,
    spec: CompressionSpec,
    calibration: list[Batch] | None = None,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    cache_base: Path | None = None,
    statistics_model: nn.Module | None = None,
    statistics: dict[str, LayerStats] | None = None,
    latency: TimeBudget | None = None,
) -> CompressionResult:
    """Factorize the layers `spec` targets, in place, with `spec.method`; returns the per-layer plan.
    `statistics_model`, a copy with the same weights (e.g. spread over accelerators with a device_map),
    runs the calibration pass instead of `model`. `statistics`, from ``gather_for`` over several specs,
    replaces the pass (a sweep gathers once for all its points). `latency`, the layers' measured costs and
    the dense model's time, is what a `spec.target_speedup` allocation spends (rank 0 needs it).

    The steps: plan (every check that can fail before the long compute), gather (the calibration
    statistics), weigh (the weighted spectra of the layers a budget allocates), allocate (their ranks),
    factorize (each layer replaced by its two factors). Under torch.distributed every rank calls this with
    the same model, spec and batches: each gathers the statistics of its shard, then builds the weights of
    and factorizes its cost-balanced share of the layers; rank 0 allocates and checks global ranks, receives
    every layer and is the only rank whose `model` is factorized (the others' stays dense)."""
    work = _plan(model, spec, calibration, loss_fn, latency, progress)
    distributed.start_together()  # under torchrun, the others wait here for rank 0's dense stage
    start = time.perf_counter()
    info = _gather(work, cache_base, statistics_model, statistics)
    result = CompressionResult(work.method.name, work.plans, {"statistics": time.perf_counter() - start}, info)
    start = time.perf_counter()
    _drop_unreached(work)
    spectra = _weigh_mine(work)
    _allocate(work, spectra, latency, result)
    _factorize(work, result)
    apart = sum(result.seconds.get(step, 0.0) for step in ("sequential statistics", "allocation check"))
    result.seconds["factorize"] = time.perf_counter() - start - apart
    return result


@dataclass
class _Work:
    """What the steps of one `compress_` call share: the plan, the layers still to factorize (dropped as
    they are installed), and what each step adds for the next (statistics, owners, weightings)."""

    model: nn.Module
    spec: CompressionSpec
    method: Method
    plans: list[LayerPlan]
    todo: dict[str, nn.Module]
    calibration: list[Batch]  # the statistics batches
    check: list[Batch]  # the allocation check's held-out batches (empty: no check)
    loss_fn: LossFn | None
    progress: bool
    stats: dict[str, LayerStats] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)  # layer -> the process that factorizes it
    weightings: dict[str, Weighting] = field(default_factory=dict)

    @property
    def allocated(self) -> list[LayerPlan]:
        return [p for p in self.plans if p.allocate]


def _plan(
    model: nn.Module,
    spec: CompressionSpec,
    calibration: list[Batch] | None,
    loss_fn: LossFn | None,
    latency: TimeBudget | None,
    progress: bool,
) -> _Work:
    """The layers' plan, with every refusal that does not need the statistics made before the long compute."""
    method = get_method(spec.method)
    plans = plan_layers(model, spec)
    todo = {p.name: model.get_submodule(p.name) for p in plans if p.rank is not None or p.allocate}
    if method.needs and (calibration is None or loss_fn is None):
        raise FwsvdError(f"method '{method.name}' needs calibration data and a task loss")
    _check_budget(model, plans, spec)
    if distributed.world()[0] == 0:
        check_speedup_target(model, spec, latency, plans)
    check_finite_model(model)
    if spec.sequential and distributed.world()[1] > 1:
        raise SpecError("sequential", "runs in one process; launch it without torchrun")
    statistics_batches, check = _split(spec, calibration or [], loss_fn)
    return _Work(model, spec, method, plans, todo, statistics_batches, check, loss_fn, progress)


def _gather(
    work: _Work, cache_base: Path | None, runner: nn.Module | None, shared: dict[str, LayerStats] | None
) -> dict[str, Any]:
    """Fill `work.stats` from one calibration pass (or the cache, or a sweep's `shared` statistics); returns
    how they were had."""
    needs = set(work.method.needs)
    if shared is None:
        work.stats, info = gather_statistics(
            work.model, work.todo, needs, work.spec, work.calibration, work.loss_fn, work.progress, cache_base, runner
        )
    else:
        work.stats = {name: shared.get(name, LayerStats()) for name in work.todo}
        info = {"passes": 0, "cache": None, "shared": True}
    check_finite_statistics(work.stats, needs)
    return info


def _drop_unreached(work: _Work) -> None:
    """A layer the loss never reached (e.g. an unused pooler) has nothing to weight by: it stays dense."""
    for plan in work.plans:
        if plan.name in work.todo and any(getattr(work.stats[plan.name], s) is None for s in work.method.needs):
            del work.todo[plan.name]
            plan.rank, plan.allocate, plan.params_after = None, False, plan.params_before
            plan.reason = "no calibration statistics reached this layer (unused by the task loss); kept dense"


def _weigh_mine(work: _Work) -> dict[str, torch.Tensor]:
    """Share the layers out by cost, then the weighted spectra of this process's allocated layers (their
    weightings kept in `work` when the allocation check needs them)."""
    process, processes = distributed.world()
    work.owners = distributed.assign({name: _cost(module) for name, module in work.todo.items()}, processes)
    mine = [p for p in work.allocated if work.owners[p.name] == process]
    work.weightings, spectra = distributed.together(
        lambda: _weigh(work.method, work.spec, work.stats, work.todo, mine, bool(work.check), work.progress),
        "building the layers' weights",
    )
    return spectra


def _allocate(
    work: _Work, spectra: dict[str, torch.Tensor], latency: TimeBudget | None, result: CompressionResult
) -> None:
    """Rank 0 gathers every allocated layer's spectrum, chooses the ranks (a parameter budget, checked on
    held-out batches, or a time budget) and every process learns them."""
    allocated, spec = work.allocated, work.spec
    if not allocated:
        return
    budget = _budget_params(work.model, work.plans, spec) if spec.budget is not None else 0
    sent = {n: work.weightings[n] for n in spectra} if work.check else {}
    for theirs, weights in distributed.to_first([(spectra, sent)]):
        spectra.update(theirs)
        work.weightings.update(weights)

    def allocate_here() -> dict[str, int | None]:
        layers = [Candidate(p.name, p.in_features, p.out_features, spectra[p.name]) for p in allocated]
        if spec.target_speedup is not None:
            assert latency is not None, "check_speedup_target refused a speed-up target without latencies"
            return _timed_allocation(layers, work.plans, spec, latency, result)
        found = allocate_ranks(layers, budget, spec.multiple)
        if work.check:
            assert work.loss_fn is not None, "_split holds out check batches only with a task loss"
            found = _checked(
                work.model,
                allocated,
                work.todo,
                work.weightings,
                found,
                budget,
                spec,
                work.check,
                work.loss_fn,
                result,
                reused=work.check[0] is work.calibration[0],
            )
        return found

    ranks = distributed.from_first(allocate_here, "allocating ranks")
    process = distributed.world()[0]
    for name in [n for n in work.weightings if work.owners[n] != process]:  # rank 0 held them for the check
        del work.weightings[name]
    for p in allocated:
        p.rank = rank = ranks[p.name]
        p.params_after = p.params_before if rank is None else rank * (p.in_features + p.out_features)
        if rank is None:
            p.reason += "; kept dense by the allocation"


def _factorize(work: _Work, result: CompressionResult) -> None:
    """Replace each chosen layer by its factors, in one block, or block by block in model order when
    `spec.sequential` (each block after the first calibrated through the model as factorized so far; kept-
    dense layers place their block too). Rank 0 installs every process's layers."""
    chosen = [p for p in work.plans if p.rank is not None]
    sequential = work.spec.sequential and bool(work.method.needs)
    blocks = [[p for p in b if p.rank is not None] for b in _blocks(work.plans)] if sequential else [chosen]
    by_name = {p.name: p for p in chosen}
    with tqdm(
        total=len(chosen),
        desc="factorizing" + (" (sequential)" if sequential else ""),
        unit="layer",
        disable=not work.progress,
    ) as bar:
        for i, block in enumerate(blocks):
            if i and block:  # earlier blocks are factorized now: their errors reach this block's statistics
                _recalibrate(work, block, result)
            done = distributed.together(partial(_factor_mine, work, block, bar), "factorizing its layers")
            for layer in done if distributed.world()[0] else ():
                layer.module.cpu()  # sent from the host: unpickled on rank 0, a GPU tensor would land on this rank's GPU
            for layer in distributed.to_first(done):  # rank 0 installs every rank's layers
                _install(work.model, by_name[layer.name], layer, work.todo[layer.name])
                if work.owners[layer.name]:
                    bar.update(1)
    processes = distributed.world()[1]
    result.factorization = {
        "processes": processes,
        "layers_per_process": [sum(work.owners[p.name] == r for p in chosen) for r in range(processes)],
    }


def _recalibrate(work: _Work, block: list[LayerPlan], result: CompressionResult) -> None:
    """Sequential calibration: `block`'s statistics again, through the model as factorized so far."""
    clock = time.perf_counter()
    needs = set(work.method.needs)
    fresh, _ = gather_statistics(
        work.model,
        {p.name: work.todo[p.name] for p in block},
        needs,
        replace(work.spec, cache_dir=None),
        work.calibration,
        work.loss_fn,
        False,
    )
    check_finite_statistics(fresh, needs)
    work.stats.update(fresh)
    for p in block:  # built again from the fresh statistics when the layer is factorized
        work.weightings.pop(p.name, None)
    result.seconds["sequential statistics"] = (
        result.seconds.get("sequential statistics", 0.0) + time.perf_counter() - clock
    )


def _factor_mine(work: _Work, block: list[LayerPlan], bar: tqdm[Any]) -> list[_Factored]:
    """Factorize this process's layers of `block`. In one process each is installed at once, and its dense
    module, statistics and side weights are let go: the host holds one layer's weights twice, not all."""
    process, processes = distributed.world()
    done = []
    mine = [p for p in block if work.owners[p.name] == process]
    for plan, following in zip(mine, [*mine[1:], None]):
        with threads_for(plan.out_features, plan.in_features):
            weighting = work.weightings.pop(plan.name, None) or work.method.build(
                work.stats[plan.name], work.spec.damping
            )
            layer = _factor(plan, work.todo[plan.name], weighting, work.stats[plan.name], work.spec)
        if processes == 1:
            _install(work.model, plan, layer, work.todo.pop(plan.name))
            del work.stats[plan.name]
        else:
            done.append(layer)
        bar.update(1)
        # Once a transformer block: within one, the next layer reuses a layer's freed workspace, where a trim
        # after every layer had each page faulted in again (3 of 20 s on Qwen2.5-0.5B's shapes).
        if following is None or _block_name(following.name) != _block_name(plan.name):
            heap.trim()
    return done


def check_speedup_target(
    model: nn.Module, spec: CompressionSpec, latency: TimeBudget | None, plans: list[LayerPlan] | None = None
) -> None:
    """Raise when `spec.target_speedup` has no measured budget or cannot be reached within it (no-op without
    a target): what `compress_` checks before its statistics pass, for callers that gather them first."""
    if spec.target_speedup is None:
        return
    if latency is None:
        raise SpecError(
            "target_speedup",
            "needs the layers' measured latencies and the dense model's: run it "
            "through the pipeline (fwsvd-export run), not compress alone",
        )
    plans = plans if plans is not None else plan_layers(model, spec)
    latency.budget(
        [p.name for p in plans if p.allocate],
        {p.name: p.rank for p in plans if not p.allocate},
        spec.target_speedup,
        latency.multiple,
    )


def _timed_allocation(
    layers: list[Candidate],
    plans: list[LayerPlan],
    spec: CompressionSpec,
    latency: TimeBudget,
    result: CompressionResult,
) -> dict[str, int | None]:
    """Ranks that spend the time budget of `spec.target_speedup`; the predicted speed-up is recorded."""
    assert spec.target_speedup is not None, "called for a speed-up target only"
    allocated = [c.name for c in layers]
    fixed = {p.name: p.rank for p in plans if not p.allocate}
    budget = latency.budget(allocated, fixed, spec.target_speedup, latency.multiple)
    ranks = allocate(layers, budget, latency.multiple, table_costs(latency.tables))
    result.allocation = {
        "target_speedup": spec.target_speedup,
        "measured_on": latency.where,
        "rank_multiple": latency.multiple,
        "rank_multiple_from": "recipe" if spec.rank_multiple else "kernel timings",
        "dense_model_ms": latency.model_ms,
        "targeted_layers_dense_ms": latency.linear_ms,
        "in_graph_ratio": latency.in_graph_ratio,
        "budget_ms": budget,
        "predicted_speedup": latency.predicted_speedup({**fixed, **ranks}),
    }
    return ranks


def _cost(module: nn.Module) -> float:
    """The order of a layer's factorization flops: the SVD of P W Q and the decompositions of its sides."""
    out_f, in_f = linear_weight(module).shape
    return float(in_f * out_f * min(in_f, out_f) + in_f**3 + out_f**3)


def _weigh(
    method: Method,
    spec: CompressionSpec,
    stats: dict[str, LayerStats],
    todo: dict[str, nn.Module],
    mine: list[LayerPlan],
    keep: bool,
    progress: bool,
) -> tuple[dict[str, Weighting], dict[str, torch.Tensor]]:
    """The weighted spectra of the layers in `mine` (those the budget allocates that this rank owns), and the
    weightings kept for their factorizations: all of them with `keep` (the allocation check factorizes with
    them), else those whose decomposition is worth keeping (`_worth_keeping`), kept with it so that the final
    factorization skips its costliest step. The rest are built again when their layer is factorized. A Gram
    side references its statistic, so a kept weighting adds little beyond its narrow root and decomposition."""
    weightings, spectra = {}, {}
    for p in tqdm(mine, desc="weighted spectra", unit="layer", disable=not progress):
        weight = linear_weight(todo[p.name])
        with threads_for(p.out_features, p.in_features):
            weighting = method.build(stats[p.name], spec.damping)
            if _worth_keeping(weighting, p):
                weighting.eigen = weighted_eigen(weight, weighting.left, weighting.right)
                spectrum = weighting.eigen.singular_values
            else:
                spectrum = weighted_spectrum(weight, weighting.left, weighting.right)
        spectra[p.name] = spectrum * method.spectrum_scale(p.in_features, p.out_features)
        if keep or weighting.eigen is not None:
            weightings[p.name] = weighting
    return weightings, spectra


def _worth_keeping(weighting: Weighting, plan: LayerPlan) -> bool:
    """Whether to keep a layer's decomposition beside its weighting: when it and the narrower side's root
    (2 min(in, out)^2 values) are no more than the layer's Gram statistics, held anyway. So for kfac's full
    sides, where the eigendecomposition is the step it saves; not for a diagonal weighting, beside which it
    would be the largest thing held."""
    sides = (weighting.left, weighting.right)
    grams = sum(side.gram.numel() for side in sides if isinstance(side, GramSide | ProjectedSide))
    return 2 * min(plan.in_features, plan.out_features) ** 2 <= grams


def _block_name(layer: str) -> str:
    """A layer's transformer block: its name up to its first index (e.g. 'model.layers.3'), else the name."""
    match = re.match(r"(.*?\.\d+)\.", layer)
    return match.group(1) if match else layer


def _blocks(plans: list[LayerPlan]) -> list[list[LayerPlan]]:
    """Plans grouped by transformer block, in model order."""
    groups: dict[str, list[LayerPlan]] = {}
    for plan in plans:
        groups.setdefault(_block_name(plan.name), []).append(plan)
    return list(groups.values())


@dataclass
class _Factored:
    """One layer's two-factor replacement: made by the rank that owns the layer, installed by rank 0."""

    name: str
    module: LowRankLinear
    weighted_error: float  # relative tail energy of the weighted spectrum
    notes: list[str]


def _factor(
    plan: LayerPlan, dense: nn.Module, weighting: Weighting, stats: LayerStats, spec: CompressionSpec
) -> _Factored:
    """One layer's factorization at `plan.rank`, balanced and checked finite, with its report row's notes."""
    assert plan.rank is not None, "only layers given a rank are factorized"
    factors = weighting.factors
    if factors is not None and factors.first.shape[0] >= plan.rank:
        module = low_rank_module(dense, factors, plan.rank)
    else:
        module, factors = low_rank_from_linear(dense, plan.rank, weighting.left, weighting.right, weighting.eigen)
    if spec.balance_factors:
        balance_(module)
    bad = next(filter(None, (nonfinite(p.detach()) for p in module.parameters())), "")
    if bad:
        raise SpecError(
            "damping",
            f"{spec.damping:g} left the factors of layer '{plan.name}' with {bad} although its "
            "weight and statistics are finite; a larger damping steadies the weighting",
        )
    energy = factors.singular_values.square()
    return _Factored(
        plan.name,
        module,
        float((energy[plan.rank :].sum() / energy.sum().clamp(min=1e-300)).sqrt()),
        weighting.notes
        + ([f"shares input statistics with {stats.shares_input_with}"] if stats.shares_input_with else []),
    )


def _install(model: nn.Module, plan: LayerPlan, layer: _Factored, dense: nn.Module) -> None:
    """Replace the dense layer by its factorization, in place, on the dense layer's device."""
    plan.weighted_error, plan.notes = layer.weighted_error, layer.notes
    set_module(model, plan.name, layer.module.to(linear_weight(dense).device))

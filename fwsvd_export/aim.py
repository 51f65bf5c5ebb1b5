"""A speed-up target (`compression.target_speedup`), aimed by measurement: compress, export, time the
trial's graph against the dense one, and aim again where the miss says, up to AIM_TRIALS times.

The kernel timings predict; the trial's own graph, timed beside the dense one on the target's provider,
shape and precision, decides."""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from torch import nn

from .config import Recipe
from .core import CompressionResult, LayerStats, check_speedup_target, compress_, gather_for, get_method
from .core.allocate import TimeBudget
from .core.distributed import world
from .errors import FwsvdError
from .stages.export import export_onnx
from .stages.kernel_timing import time_budget
from .stages.precision import make_variant
from .stages.prepared import Dense, Prepared
from .stages.validate import threads, time_graphs

AIM_TRIALS = 3  # compressions at most for one speed-up target
AIM_TOLERANCE = 0.03  # a trial measured within this share of the target ends the search

Trial = tuple[nn.Module, CompressionResult]


def next_aim(aimed: float, target: float, measured: float) -> float:
    """The speed-up to allocate for next: the last aim corrected by how far its measurement missed, taking
    the timings' error to hold near the target (the kernels of a small factor pair run relatively
    faster inside the model than alone, so a prediction's error grows with the cut)."""
    return max(1.0 + AIM_TOLERANCE, aimed * target / measured)


def aimed(
    prepared: Prepared,
    recipe: Recipe,
    dense: Dense,
    latency: TimeBudget,
    statistics: dict[str, LayerStats] | None,
    scratch: Path,
    progress: bool,
) -> Trial:
    """Compressions of copies of the dense model for `compression.target_speedup`, each measured: exported
    into `scratch`, timed against the dense graph (interleaved, on the target's provider, shape and
    precision) and, when off by more than AIM_TOLERANCE, followed by one aimed at `next_aim`, up to
    AIM_TRIALS. Trials timed minutes apart are not comparable on a machine whose speed drifts, so after
    several their graphs are timed once more, all in the same rounds with the dense one, and the trial
    closest to the target there is kept. The host holds one trial's model at a time: a kept trial that is
    not the last is compressed again (the same statistics and aim give the same factors). The statistics
    are gathered once for all trials. Under torch.distributed the other ranks take part in one
    compression, so there is one trial."""
    spec, target = recipe.compression, recipe.compression.target_speedup
    assert target is not None, "compress_stage aims only at a recipe's speed-up target"
    check_speedup_target(prepared.model, spec, latency)  # before the statistics pass
    trials = AIM_TRIALS if world()[1] == 1 else 1
    gathered = None
    if trials > 1 and statistics is None and get_method(spec.method).needs:
        start = time.perf_counter()
        statistics, info = gather_for(
            prepared.model,
            [spec],
            prepared.calibration,
            prepared.task.loss,
            progress,
            Path(recipe.base_dir or "."),
            prepared.runner,
        )
        gathered = (info, time.perf_counter() - start)
    compress_at = partial(_compress_at, prepared, recipe, latency, statistics, progress)
    folder = scratch / ".aim"
    folder.mkdir()  # new: only what this call wrote is removed below
    try:
        measured, held, stopped = _search(prepared, recipe, dense, compress_at, trials, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    key = "measured_together" if len(measured) > 1 else "measured"
    kept = min(range(len(measured)), key=lambda k: abs(measured[k][key] / target - 1))
    model, result = held[:2] if held is not None and held[2] == kept else compress_at(measured[kept]["aimed_at"])
    del held
    if gathered is not None:
        result.statistics, result.seconds["statistics"] = gathered
    result.allocation.update(
        target_speedup=target,
        aimed_at=measured[kept]["aimed_at"],
        aim={
            "tolerance": AIM_TOLERANCE,
            "max_trials": trials,
            "trials": measured,
            "kept": kept,
            "kept_by": key,
            "stopped": stopped,
        },
    )
    return model, result


def _compress_at(
    prepared: Prepared,
    recipe: Recipe,
    latency: TimeBudget,
    statistics: dict[str, LayerStats] | None,
    progress: bool,
    aim: float,
) -> Trial:
    """A copy of the dense model compressed for a speed-up of `aim`."""
    model = copy.deepcopy(prepared.model)
    spec = replace(recipe.compression, target_speedup=aim)
    return model, compress_(
        model,
        spec,
        prepared.calibration,
        prepared.task.loss,
        progress,
        Path(recipe.base_dir or "."),
        statistics_model=prepared.runner,
        statistics=statistics,
        latency=latency,
    )


def _search(
    prepared: Prepared, recipe: Recipe, dense: Dense, compress_at: Callable[[float], Trial], trials: int, folder: Path
) -> tuple[list[dict], tuple[nn.Module, CompressionResult, int] | None, str]:
    """The trials, each exported into `folder` and timed against the dense graph; after several, all of
    them timed again in the same rounds ("measured_together"). Returns each trial's measurements, the last
    trial's model and result (and its number), and why the search stopped."""
    target = recipe.compression.target_speedup
    assert target is not None
    aim, measured, graphs, held, stopped = target, [], {}, None, "trials spent"
    for trial in range(trials):
        held = None  # one trial model at a time
        try:
            model, result = compress_at(aim)
        except FwsvdError as exc:
            if not trial:
                raise
            stopped = f"next aim out of reach: {exc}"  # keep the trials measured so far
            break
        name = f"trial {trial + 1}"
        graphs[name] = trial_graph(prepared, recipe, model, folder / f"trial-{trial + 1}")
        timed = time_against_dense(prepared, recipe, dense, {name: graphs[name]})
        speedup = timed["dense"] / timed[name]
        measured.append(
            {
                "aimed_at": aim,
                "predicted": result.allocation["predicted_speedup"],
                "measured": speedup,
                "dense_ms": timed["dense"],
                "compressed_ms": timed[name],
                "kept_ratio": result.summary()["targeted_kept_ratio"],
            }
        )
        held = (model, result, trial)
        del model
        if abs(speedup / target - 1) <= AIM_TOLERANCE:
            stopped = "within tolerance"
            break
        aim = next_aim(aim, target, speedup)
    if len(measured) > 1:
        together = time_against_dense(prepared, recipe, dense, graphs)
        for trial, entry in enumerate(measured):
            entry["measured_together"] = together["dense"] / together[f"trial {trial + 1}"]
    return measured, held, stopped


def trial_graph(prepared: Prepared, recipe: Recipe, model: nn.Module, folder: Path) -> Path:
    """`model`'s graph in `folder`, in the precision the speed-up target is measured in."""
    spec = recipe.compression
    graph = export_onnx(
        model, prepared.tokenizer, folder, prepared.task.onnx_task(recipe.export.with_past), recipe.export.opset
    )
    if spec.latency_precision != "fp32":
        graph = make_variant(graph, spec.latency_precision, recipe.export.int8_mode, prepared.calibration)
    return graph


def time_against_dense(prepared: Prepared, recipe: Recipe, dense: Dense, graphs: dict[str, Path]) -> dict[str, float]:
    """Median ms of the dense graph ("dense") and of each of `graphs`, timed in the same interleaved rounds
    where the speed-up target is measured."""
    spec = recipe.compression
    paths = {"dense": budget_graph(dense, spec.latency_precision), **graphs}
    timed = time_graphs(
        paths, spec.latency_provider, recipe.validation, [spec.latency_shape], prepared.model.config, decode=False
    )
    return {name: timed[name][spec.latency_shape]["median_ms"] for name in paths}


def budget_graph(dense: Dense, precision: str) -> Path:
    """The dense graph in `precision`: what a speed-up target is measured against."""
    return dense.reference.graphs["dense" if precision == "fp32" else f"dense-{precision}"]


def layer_time_budget(prepared: Prepared, recipe: Recipe, dense: Dense, progress: bool) -> TimeBudget:
    """The layers' kernel timings (cached beside the statistics cache, else in the user's cache folder)
    and the dense graph's time, in the precision and on the provider the speed-up target names."""
    spec, lat = recipe.compression, recipe.validation.latency
    graph = budget_graph(dense, spec.latency_precision)
    cache = recipe.resolve(spec.cache_dir) if spec.cache_dir else Path.home() / ".cache" / "fwsvd-export"
    return time_budget(
        prepared.model,
        spec,
        graph,
        prepared.model.config,
        threads(recipe.validation),
        lat.warmup,
        lat.runs,
        lat.rounds,
        cache,
        progress,
    )

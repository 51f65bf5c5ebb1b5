"""The whole run: recipe -> data -> statistics -> factorize -> checkpoint -> export -> validate -> report.

Everything is written into a staging folder beside the output, made before any compute and moved into
place at the end (``outputs.py``), so a run that fails on bad input, crashes or is interrupted leaves no
half-written output behind. A run that completes but misses a validation threshold keeps its artifacts
and report (that is what one debugs from).
"""
from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .core import Batch, CompressionResult, LayerStats, check_speedup_target, compress_, gather_for, get_method
from .core import heap
from .core.allocate import TimeBudget
from .core.distributed import world
from .errors import FwsvdError
from .recipe import DATA_ROLES, Recipe
from .stages.checkpoint import library_versions, save_checkpoint
from .stages.data import load_records
from .stages.export import export_onnx, inspect_graph
from .stages.finetune import finetune_
from .stages.kernel_timing import time_budget
from .stages.models import load_for_statistics, load_model, loading_notes
from .stages.outputs import resolve_output, staged_output
from .stages.precision import make_variant
from .stages.report import write_report
from .stages.tasks import Task, get_task
from .stages.validate import (Check, Reference, graph_bytes, reference, threads, time_artifacts, time_graphs,
                               torch_results, validate)

log = logging.getLogger("fwsvd_export")
_MANY_SEQUENCES = 8192  # the statistics settle within a few hundred to a few thousand sequences


@dataclass
class RunResult:
    output: Path
    report: dict

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def read_paths(recipe: Recipe) -> list[Path]:
    """The local files and folders a run reads (the model folder, the data files): an output may not hold them."""
    data = [source.path for source in (getattr(recipe.data, role) for role in DATA_ROLES) if source]
    return [recipe.resolve(p) for p in [recipe.model.path, *data] if p]


def output_path(recipe: Recipe, output: Optional[str | Path]) -> Path:
    """Where the run's results go: `output`, else the recipe's export.output (relative to the recipe)."""
    return resolve_output(output if output is not None else recipe.resolve(recipe.export.output))


def _batches(recipe: Recipe, tokenizer, config, role: str) -> list[Batch]:
    task = get_task(recipe.model.task)
    source = getattr(recipe.data, role)
    training = role != "evaluation"  # calibration and fine-tuning rows need what the task loss reads
    records = load_records(recipe, role, task.columns(source, training), skip_empty=task.skip_empty)
    return task.make_batches(records, source, tokenizer, recipe.data.max_length, recipe.data.batch_size,
                             training, config)


def _prompts(recipe: Recipe, tokenizer, evaluation: list[Batch]) -> list:
    """Prompts for the greedy-generation check: the recipe's, else the openings of two held-out windows."""
    if not get_task(recipe.model.task).generates:
        return []
    if recipe.validation.prompts:
        return [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in recipe.validation.prompts]
    rows = [row for b in evaluation for row in b.inputs["input_ids"]][:2]
    return [row[: min(8, len(row))].unsqueeze(0) for row in rows]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_flop_ratio(plans: list) -> float:
    """Multiply-adds of the targeted Linear layers after / before (they scale with parameter counts)."""
    before = sum(p["params_before"] for p in plans)
    return sum(p["params_after"] for p in plans) / before if before else 1.0


def _peak_rss_mb(reset: bool) -> float:
    """The process's peak resident memory since the last reset (Linux: VmHWM, reset through clear_refs);
    elsewhere the peak since start."""
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
        if reset:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
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
        _peak_rss_mb(reset=True)

    def lap(self, stage: str) -> None:
        release_freed_memory()
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self.peak_rss_mb[stage] = round(_peak_rss_mb(reset=True), 1)
        self._last = now

    def whole(self) -> dict[str, float]:
        """Seconds since the clock started and the largest stage peak: the run's own peak, which tools
        reading the process's high-water mark at exit (`/usr/bin/time`) cannot see after the resets."""
        return {"seconds": time.perf_counter() - self._start, "peak_rss_mb": max(self.peak_rss_mb.values(), default=0.0)}


@dataclass
class Prepared:
    """What every compression of one model shares: loaded once per run, or once per sweep."""

    recipe: Recipe
    task: Task
    model: nn.Module
    tokenizer: object
    location: str
    calibration: list[Batch]
    evaluation: list[Batch]
    runner: Optional[nn.Module]  # a copy placed with the recipe's device_map for the statistics pass
    dense_params: int = 0
    finetune: Optional[list[Batch]] = None  # data.finetune's batches, when the recipe names them
    loading_notes: list[str] = field(default_factory=list)  # what loading let pass (a new or unused head)

    def release_models(self) -> None:
        """Drop the torch models once no later stage reads them (after the last point's PyTorch results)."""
        self.model = self.runner = None  # type: ignore[assignment]
        release_freed_memory()


def prepare(recipe: Recipe, clock: Clock, methods: Optional[list[str]] = None) -> Prepared:
    """Load the model and read the data (and, when any of `methods` needs statistics, the runner)."""
    task = get_task(recipe.model.task)
    model, tokenizer, location = load_model(recipe)
    clock.lap("load model")
    calibration = _batches(recipe, tokenizer, model.config, "calibration")
    evaluation = _batches(recipe, tokenizer, model.config, "evaluation")
    finetune = _batches(recipe, tokenizer, model.config, "finetune") if recipe.data.finetune else None
    clock.lap("data")
    needs = any(get_method(m).needs for m in (methods or [recipe.compression.method]))
    if needs:
        _announce_calibration(model, calibration, recipe.data.max_length)
    runner = load_for_statistics(recipe, location) if needs else None
    if runner is not None:
        clock.lap("load model (device_map)")
    return Prepared(recipe, task, model, tokenizer, location, calibration, evaluation, runner, count_params(model),
                    finetune, loading_notes(model))


def _announce_calibration(model: nn.Module, batches: list[Batch], max_length: int) -> None:
    """Say what the statistics pass will read and roughly how long it takes, and warn when it is far beyond
    what the statistics need: the pass takes time and memory in proportion, and a 50 MB one-line file once
    became 35,330 batches (about 50 minutes and 6 GB) without a word."""
    sequences = sum(b.samples for b in batches)
    tokens = int(sum(int(b.token_mask.sum()) for b in batches))
    size = (f"{len(batches)} batches, {sequences} sequences, {tokens} tokens of 'data.calibration' "
            f"(roughly {_duration(_pass_seconds(model, batches))})")
    if sequences <= _MANY_SEQUENCES:
        log.info("the statistics pass reads %s", size)
        return
    log.warning("the statistics pass will read %s (up to data.max_length=%d tokens a sequence): far more than the "
                "statistics need (a few hundred to a few thousand sequences), and time and memory grow with it. Cap "
                "it with 'data.calibration.max_samples' (the records kept, drawn at random), or give a shorter file: "
                "max_samples does not cut a record, so a text of a few very long lines must be cut itself",
                size, max_length)


def _pass_seconds(model: nn.Module, batches: list[Batch]) -> float:
    """The statistics pass's time, estimated from one forward of its longest batch: a forward and its
    backward cost about three forwards a batch (the statistics' hooks add to that)."""
    longest = max(batches, key=lambda b: b.token_mask.numel())
    with torch.no_grad():
        start = time.perf_counter()
        model(**longest.inputs)
        return 3 * (time.perf_counter() - start) * len(batches)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def compress_stage(prepared: Prepared, recipe: Recipe, clock: Clock, progress: bool,
                   statistics: Optional[dict[str, LayerStats]] = None, last: bool = False,
                   dense: Optional["Dense"] = None, scratch: Optional[Path] = None
                   ) -> tuple[nn.Module, CompressionResult, list[float]]:
    """Factorize the dense model per `recipe` (with `statistics` when a sweep gathered them), then
    fine-tune it if the recipe asks. When this is the `last` use of the dense model (and distillation
    does not need it as teacher), it is factorized in place: the host holds one copy of the model.
    A speed-up target is measured against `dense`'s graph, its trials exported into `scratch`."""
    teacher_needed = recipe.finetune.epochs and recipe.finetune.objective == "distill"
    if recipe.compression.target_speedup is not None:
        if dense is None or scratch is None:
            raise FwsvdError("compression.target_speedup is measured against the dense ONNX graph: use `fwsvd-export run`")
        latency = _time_budget(prepared, recipe, dense, progress)
        clock.lap("kernel timing")
        compressed, result = _aimed(prepared, recipe, dense, latency, statistics, scratch, progress)
        if last and not teacher_needed:
            prepared.model = compressed  # the dense copy goes: as if factorized in place
    else:
        compressed = prepared.model if last and not teacher_needed else copy.deepcopy(prepared.model)
        result = compress_(compressed, recipe.compression, prepared.calibration, prepared.task.loss, progress,
                           Path(recipe.base_dir or "."), statistics_model=prepared.runner, statistics=statistics)
    if last:
        prepared.runner = None  # the statistics are gathered: the device_map copy is not needed again
    clock.seconds.update({f"compress: {k}": v for k, v in result.seconds.items()})
    clock.lap("compress")
    finetune_loss: list[float] = []
    if recipe.finetune.epochs:
        finetune_loss = finetune_(compressed, prepared.task, prepared.finetune or prepared.calibration, recipe.finetune,
                                  recipe.data.seed, progress, teacher=prepared.model)
        clock.lap("finetune")
    return compressed, result, finetune_loss


AIM_TRIALS = 3  # compressions at most for one speed-up target
AIM_TOLERANCE = 0.03  # a trial measured within this share of the target ends the search


def next_aim(aimed: float, target: float, measured: float) -> float:
    """The speed-up to allocate for next: the last aim corrected by how far its measurement missed, taking
    the timings' error to hold near the target (the kernels of a small factor pair run relatively
    faster inside the model than alone, so a prediction's error grows with the cut)."""
    return max(1.0 + AIM_TOLERANCE, aimed * target / measured)


def _aimed(prepared: Prepared, recipe: Recipe, dense: "Dense", latency: TimeBudget,
           statistics: Optional[dict[str, LayerStats]], scratch: Path, progress: bool
           ) -> tuple[nn.Module, CompressionResult]:
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
    base = Path(recipe.base_dir or ".")
    check_speedup_target(prepared.model, spec, latency)  # before the statistics pass
    trials = AIM_TRIALS if world()[1] == 1 else 1
    gathered = None
    if trials > 1 and statistics is None and get_method(spec.method).needs:
        start = time.perf_counter()
        statistics, info = gather_for(prepared.model, [spec], prepared.calibration, prepared.task.loss, progress, base,
                                      prepared.runner)
        gathered = (info, time.perf_counter() - start)

    def compress_at(aim: float) -> tuple[nn.Module, CompressionResult]:
        model = copy.deepcopy(prepared.model)
        return model, compress_(model, replace(spec, target_speedup=aim), prepared.calibration, prepared.task.loss,
                                progress, base, statistics_model=prepared.runner, statistics=statistics, latency=latency)

    aim, measured, graphs, held, stopped = target, [], {}, None, "trials spent"
    folder = scratch / ".aim"
    folder.mkdir()  # new: only what this call wrote is removed below
    try:
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
            graphs[name] = _trial_graph(prepared, recipe, model, folder / f"trial-{trial + 1}")
            timed = _time_graphs(prepared, recipe, dense, {name: graphs[name]})
            speedup = timed["dense"] / timed[name]
            measured.append({"aimed_at": aim, "predicted": result.allocation["predicted_speedup"], "measured": speedup,
                             "dense_ms": timed["dense"], "compressed_ms": timed[name],
                             "kept_ratio": result.summary()["targeted_kept_ratio"]})
            held = (model, result, trial)
            del model
            if abs(speedup / target - 1) <= AIM_TOLERANCE:
                stopped = "within tolerance"
                break
            aim = next_aim(aim, target, speedup)
        if len(measured) > 1:
            together = _time_graphs(prepared, recipe, dense, graphs)
            for trial, entry in enumerate(measured):
                entry["measured_together"] = together["dense"] / together[f"trial {trial + 1}"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    key = "measured_together" if len(measured) > 1 else "measured"
    kept = min(range(len(measured)), key=lambda k: abs(measured[k][key] / target - 1))
    if held is None or held[2] != kept:
        held = None
        model, result = compress_at(measured[kept]["aimed_at"])
    else:
        model, result, _ = held
    if gathered is not None:
        result.statistics, result.seconds["statistics"] = gathered
    result.allocation.update(target_speedup=target, aimed_at=measured[kept]["aimed_at"],
                             aim={"tolerance": AIM_TOLERANCE, "max_trials": trials, "trials": measured, "kept": kept,
                                  "kept_by": key, "stopped": stopped})
    return model, result


def _trial_graph(prepared: Prepared, recipe: Recipe, model: nn.Module, folder: Path) -> Path:
    """`model`'s graph in `folder`, in the precision the speed-up target is measured in."""
    spec = recipe.compression
    graph = export_onnx(model, prepared.tokenizer, folder, prepared.task.onnx_task(recipe.export.with_past),
                        recipe.export.opset)
    if spec.latency_precision != "fp32":
        graph = make_variant(graph, spec.latency_precision, recipe.export.int8_mode, prepared.calibration)
    return graph


def _time_graphs(prepared: Prepared, recipe: Recipe, dense: "Dense", graphs: dict[str, Path]) -> dict[str, float]:
    """Median ms of the dense graph ("dense") and of each of `graphs`, timed in the same interleaved rounds
    where the speed-up target is measured."""
    spec = recipe.compression
    paths = {"dense": _budget_graph(dense, spec.latency_precision), **graphs}
    timed = time_graphs(paths, spec.latency_provider, recipe.validation, [spec.latency_shape],
                        prepared.model.config.vocab_size, decode=False)
    return {name: timed[name][spec.latency_shape]["median_ms"] for name in paths}


def _budget_graph(dense: "Dense", precision: str) -> Path:
    return dense.reference.graphs["dense" if precision == "fp32" else f"dense-{precision}"]


def _time_budget(prepared: Prepared, recipe: Recipe, dense: "Dense", progress: bool) -> TimeBudget:
    """The layers' kernel timings (cached beside the statistics cache, else in the user's cache folder)
    and the dense graph's time, in the precision and on the provider the speed-up target names."""
    spec, lat = recipe.compression, recipe.validation.latency
    graph = _budget_graph(dense, spec.latency_precision)
    cache = recipe.resolve(spec.cache_dir) if spec.cache_dir else Path.home() / ".cache" / "fwsvd-export"
    return time_budget(prepared.model, spec, graph, prepared.model.config.vocab_size, threads(recipe.validation),
                       lat.warmup, lat.runs, lat.rounds, cache, progress)


def lend_compute(recipe: Recipe, progress: bool = False) -> None:
    """A torchrun rank other than 0: load the model and data, then, in step with rank 0, score this rank's
    shard of the calibration batches and factorize its share of the layers for rank 0; write nothing."""
    prepared = prepare(recipe, Clock())
    compress_(prepared.model, recipe.compression, prepared.calibration, prepared.task.loss, progress,
              Path(recipe.base_dir or "."), statistics_model=prepared.runner)


def compress_only(recipe: Recipe, output: Optional[str | Path] = None, progress: bool = True) -> tuple[Path, dict]:
    """The compress stage alone: writes the checkpoint folder (no export, no validation)."""
    if recipe.compression.target_speedup is not None:
        raise FwsvdError(f"{recipe.source}: 'compression.target_speedup' is measured against the dense ONNX graph, "
                         "which `compress` does not make; use `fwsvd-export run`")
    folder = output_path(recipe, output)
    with staged_output(folder, inputs=read_paths(recipe)) as staged:
        clock = Clock()
        prepared = prepare(recipe, clock)
        compressed, result, _ = compress_stage(prepared, recipe, clock, progress, last=True)
        compression = result.to_dict()
        save_checkpoint(compressed, prepared.tokenizer, staged.path, recipe.model.task, compression, recipe.to_dict(),
                        prepared.location)
    return folder, compression


@dataclass
class Dense:
    """The dense model's graph and reference results, which every compressed point is compared with."""

    onnx: Path
    graph: dict
    reference: Reference


def dense_stage(prepared: Prepared, folder: Path, clock: Clock, progress: bool) -> Dense:
    """Export the dense model into `folder` and measure it once (PyTorch outputs, ORT latency)."""
    recipe = prepared.recipe
    onnx = export_onnx(prepared.model, prepared.tokenizer, folder, prepared.task.onnx_task(recipe.export.with_past),
                       recipe.export.opset)
    graph = inspect_graph(onnx, prepared.model)
    variants = _variants(prepared, onnx)
    clock.lap("export (dense)")
    ref = reference(prepared.task, recipe.validation, prepared.model, prepared.evaluation, onnx, progress, variants)
    clock.lap("validate (dense)")
    return Dense(onnx, graph, ref)


def _variants(prepared: Prepared, graph: Path, recipe: Optional[Recipe] = None) -> dict[str, Path]:
    """The recipe's other precisions of an fp32 graph, each in its own folder beside it."""
    export = (recipe or prepared.recipe).export
    return {p: make_variant(graph, p, export.int8_mode, prepared.calibration) for p in export.precisions if p != "fp32"}


def point_stage(prepared: Prepared, dense: Dense, recipe: Recipe, folder: Path, clock: Clock, progress: bool,
                statistics: Optional[dict[str, LayerStats]] = None, last: bool = False) -> dict:
    """One compressed model: factorize, checkpoint, export, validate against `dense`; writes its report
    into `folder` and returns it. `last`: no later point needs the dense model."""
    task = prepared.task
    compressed, result, finetune_loss = compress_stage(prepared, recipe, clock, progress, statistics, last, dense, folder)
    compression = result.to_dict()
    save_checkpoint(compressed, prepared.tokenizer, folder / "compressed", task.name, compression, recipe.to_dict(),
                    prepared.location)
    clock.lap("checkpoint")
    small_onnx = export_onnx(compressed, prepared.tokenizer, folder / "onnx" / "compressed",
                             task.onnx_task(recipe.export.with_past), recipe.export.opset)
    graph = {"dense": dense.graph, "compressed": inspect_graph(small_onnx, compressed)}
    variants = _variants(prepared, small_onnx, recipe)
    clock.lap("export")
    prompts = _prompts(recipe, prepared.tokenizer, prepared.evaluation)
    vocab_size, params_compressed = prepared.model.config.vocab_size, count_params(compressed)
    evidence = torch_results(task, recipe.validation, compressed, prepared.evaluation, prompts, progress)
    if last:  # what follows needs the models' graphs and results only: the host holds the graphs alone
        del compressed
        prepared.release_models()
    validation = validate(task, recipe.validation, dense.reference, evidence, prepared.evaluation, small_onnx,
                          progress, prompts, variants)
    del evidence  # the timing needs the graphs alone
    time_artifacts(recipe.validation, dense.reference, validation, small_onnx, variants, vocab_size)
    clock.lap("validate")
    missing = graph["compressed"]["layers_missing_split"]
    if missing:
        validation.checks.append(Check("graph: split MatMuls", False, f"not found for {', '.join(missing)}"))
    report = {
        "tool": "fwsvd-export",
        "versions": library_versions(),
        "recipe_file": recipe.source,
        "recipe": recipe.to_dict(),
        "model": {"source": prepared.location, "task": task.name, "dtype": recipe.model.dtype,
                  "notes": prepared.loading_notes},
        "compression": compression,
        "finetune": {"epochs": recipe.finetune.epochs, "epoch_loss": finetune_loss,
                     "data": "finetune" if prepared.finetune else "calibration",
                     "batches": len(prepared.finetune or prepared.calibration) if recipe.finetune.epochs else 0},
        "sizes": {
            "params_dense": prepared.dense_params,
            "params_compressed": params_compressed,
            "onnx_dense_bytes": graph_bytes(dense.onnx.parent),
            "onnx_compressed_bytes": graph_bytes(small_onnx.parent),
        },
        "flop_ratio": linear_flop_ratio(compression["layers"]),
        "graph": graph,
        "validation": validation.to_dict(),
        "seconds": clock.seconds,
        "peak_rss_mb": clock.peak_rss_mb,  # per stage: the host memory high-water mark while it ran
        "artifacts": {"checkpoint": "compressed", "onnx_dense": os.path.relpath(dense.onnx, folder),
                      "onnx_compressed": os.path.relpath(small_onnx, folder),
                      **{f"onnx_compressed_{p}": os.path.relpath(g, folder) for p, g in variants.items()}},
        "passed": validation.passed,
    }
    write_report(report, folder)
    return report


def run(recipe: Recipe, output: Optional[str | Path] = None, progress: bool = True) -> RunResult:
    """Run every stage of `recipe`; the report's ``passed`` says whether validation held."""
    folder = output_path(recipe, output)
    clock = Clock()
    with staged_output(folder, inputs=read_paths(recipe)) as staged:
        prepared = prepare(recipe, clock)
        dense = dense_stage(prepared, staged.path / "onnx" / "dense", clock, progress)
        report = point_stage(prepared, dense, recipe, staged.path, clock, progress, last=True)
        unreadable = report["compression"]["statistics"].get("cache_unreadable")
        report["output_notes"] = staged.notes + ([f"statistics cache: {unreadable}"] if unreadable else [])
        report["whole_run"] = clock.whole()
        write_report(report, staged.path)
    return RunResult(folder, report)

"""The whole run: recipe -> data -> statistics -> factorize -> checkpoint -> export -> validate -> report.

Everything is written into a staging folder beside the output, made before any compute and moved into
place at the end (``outputs.py``), so a run that fails on bad input, crashes or is interrupted leaves no
half-written output behind. A run that completes but misses a validation threshold keeps its artifacts
and report (that is what one debugs from).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import aim
from .aim import AIM_TOLERANCE, AIM_TRIALS, next_aim  # noqa: F401 - the pipeline's names before aim.py
from .config import DATA_ROLES, Recipe
from .core import Batch, CompressionResult, LayerStats, compress_, get_method
from .errors import FwsvdError, section
from .stages.checkpoint import library_versions, save_checkpoint
from .stages.clock import Clock, release_freed_memory  # noqa: F401 - release_freed_memory: the pipeline's name before
from .stages.data import fingerprint, load_records
from .stages.export import export_onnx, inspect_graph
from .stages.finetune import Recovery, finetune_
from .stages.kernel_timing import machine
from .stages.model_card import CARD_FILE, checkpoint_card
from .stages.models import fit_batches, load_for_statistics, load_model, loading_notes
from .stages.outputs import resolve_output, staged_output
from .stages.precision import make_variant
from .stages.prepared import Dense, Prepared
from .stages.report import write_report
from .stages.run_report import Artifacts, FinetuneInfo, ModelInfo, RunReport, Sizes, WholeRun
from .stages.tasks import get_task
from .stages.validate import Check, Validation, graph_bytes, reference, time_artifacts, torch_results, validate

log = logging.getLogger("fwsvd_export")
_MANY_SEQUENCES = 8192  # the statistics settle within a few hundred to a few thousand sequences


@dataclass
class RunResult:
    output: Path
    report: RunReport  # as written to report.json (`report.to_dict()`) and report.md

    @property
    def passed(self) -> bool:
        return self.report.passed


def read_paths(recipe: Recipe) -> list[Path]:
    """The local files and folders a run reads (the model folder, the data files): an output may not hold them."""
    data = [source.path for source in (getattr(recipe.data, role) for role in DATA_ROLES) if source]
    return [recipe.resolve(p) for p in [recipe.model.path, *data] if p]


def output_path(recipe: Recipe, output: str | Path | None) -> Path:
    """Where the run's results go: `output`, else the recipe's export.output (relative to the recipe)."""
    return resolve_output(output if output is not None else recipe.resolve(recipe.export.output))


def _batches(recipe: Recipe, preprocessor, model: nn.Module, role: str) -> list[Batch]:
    """The `role` data's batches, made by the task with the model's preprocessor, holding only the inputs
    the model's forward takes."""
    task = get_task(recipe.model.task)
    source = getattr(recipe.data, role)
    training = role != "evaluation"  # calibration and fine-tuning rows need what the task loss reads
    records = load_records(recipe, role, task.columns(source, training), skip_empty=task.skip_empty)
    return fit_batches(
        task.make_batches(
            records, source, preprocessor, recipe.data.max_length, recipe.data.batch_size, training, model.config
        ),
        model,
    )


def _prompts(recipe: Recipe, tokenizer, evaluation: list[Batch]) -> list:
    """Prompts for the greedy-generation check: the recipe's, else the openings of two held-out windows."""
    if not get_task(recipe.model.task).generates:
        return []
    if recipe.validation.prompts:
        return [
            tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in recipe.validation.prompts
        ]
    rows = [row for b in evaluation for row in b.inputs["input_ids"]][:2]
    return [row[: min(8, len(row))].unsqueeze(0) for row in rows]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prepare(recipe: Recipe, clock: Clock, methods: list[str] | None = None) -> Prepared:
    """Load the model and read the data (and, when any of `methods` needs statistics, the runner)."""
    model, tokenizer, location = load_model(recipe)
    task = get_task(recipe.model.task).for_model(model)  # its pooling, its head: as the model says
    clock.lap("load model")
    calibration = _batches(recipe, tokenizer, model, "calibration")
    evaluation = _batches(recipe, tokenizer, model, "evaluation")
    finetune = _batches(recipe, tokenizer, model, "finetune") if recipe.data.finetune else None
    clock.lap("data")
    needs = any(get_method(m).needs for m in (methods or [recipe.compression.method]))
    if needs:
        _announce_calibration(model, calibration, recipe.data.max_length)
    runner = load_for_statistics(recipe, location) if needs else None
    if runner is not None:
        clock.lap("load model (device_map)")
    return Prepared(
        recipe,
        task,
        model,
        tokenizer,
        location,
        calibration,
        evaluation,
        runner,
        count_params(model),
        finetune,
        loading_notes(model),
    )


def _announce_calibration(model: nn.Module, batches: list[Batch], max_length: int) -> None:
    """Say what the statistics pass will read and roughly how long it takes, and warn when it is far beyond
    what the statistics need: the pass takes time and memory in proportion, and a 50 MB one-line file once
    became 35,330 batches (about 50 minutes and 6 GB) without a word."""
    sequences = sum(b.samples for b in batches)
    tokens = int(sum(int(b.token_mask.sum()) for b in batches))
    size = (
        f"{len(batches)} batches, {sequences} sequences, {tokens} tokens of 'data.calibration' "
        f"(roughly {_duration(_pass_seconds(model, batches))})"
    )
    if sequences <= _MANY_SEQUENCES:
        log.info("the statistics pass reads %s", size)
        return
    log.warning(
        "the statistics pass will read %s (up to data.max_length=%d tokens a sequence): far more than the "
        "statistics need (a few hundred to a few thousand sequences), and time and memory grow with it. Cap "
        "it with 'data.calibration.max_samples' (the records kept, drawn at random), or give a shorter file: "
        "max_samples does not cut a record, so a text of a few very long lines must be cut itself",
        size,
        max_length,
    )


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


@section("compression")  # the core names its spec's fields; the recipe's reader knows them as compression.*
def compress_stage(
    prepared: Prepared,
    recipe: Recipe,
    clock: Clock,
    progress: bool,
    statistics: dict[str, LayerStats] | None = None,
    last: bool = False,
    dense: Dense | None = None,
    scratch: Path | None = None,
) -> tuple[nn.Module, CompressionResult, Recovery]:
    """Factorize the dense model per `recipe` (with `statistics` when a sweep gathered them), then
    fine-tune it if the recipe asks. When this is the `last` use of the dense model (and distillation
    does not need it as teacher), it is factorized in place: the host holds one copy of the model.
    A speed-up target is measured against `dense`'s graph, its trials exported into `scratch`."""
    teacher_needed = recipe.finetune.epochs and recipe.finetune.objective != "task"  # distill, task+distill
    if recipe.compression.target_speedup is not None:
        if dense is None or scratch is None:
            raise FwsvdError(
                "compression.target_speedup is measured against the dense ONNX graph: use `fwsvd-export run`"
            )
        latency = aim.layer_time_budget(prepared, recipe, dense, progress)
        clock.lap("kernel timing")
        compressed, result = aim.aimed(prepared, recipe, dense, latency, statistics, scratch, progress)
        if last and not teacher_needed:
            prepared.model = compressed  # the dense copy goes: as if factorized in place
    else:
        compressed = prepared.model if last and not teacher_needed else copy.deepcopy(prepared.model)
        result = compress_(
            compressed,
            recipe.compression,
            prepared.calibration,
            prepared.task.loss,
            progress,
            Path(recipe.base_dir or "."),
            statistics_model=prepared.runner,
            statistics=statistics,
        )
    if last:
        prepared.runner = None  # the statistics are gathered: the device_map copy is not needed again
    clock.seconds.update({f"compress: {k}": v for k, v in result.seconds.items()})
    clock.lap("compress")
    recovery = Recovery()
    if recipe.finetune.epochs:
        recovery = finetune_(
            compressed,
            prepared.task,
            prepared.finetune or prepared.calibration,
            recipe.finetune,
            recipe.data.seed,
            progress,
            teacher=prepared.model,
        )
        clock.lap("finetune")
    return compressed, result, recovery


@section("compression")
def lend_compute(recipe: Recipe, progress: bool = False) -> None:
    """A torchrun rank other than 0: load the model and data, then, in step with rank 0, score this rank's
    shard of the calibration batches and factorize its share of the layers for rank 0; write nothing."""
    prepared = prepare(recipe, Clock())
    compress_(
        prepared.model,
        recipe.compression,
        prepared.calibration,
        prepared.task.loss,
        progress,
        Path(recipe.base_dir or "."),
        statistics_model=prepared.runner,
    )


def compress_only(recipe: Recipe, output: str | Path | None = None, progress: bool = True) -> tuple[Path, dict]:
    """The compress stage alone: writes the checkpoint folder (no export, no validation)."""
    if recipe.compression.target_speedup is not None:
        raise FwsvdError(
            f"{recipe.source}: 'compression.target_speedup' is measured against the dense ONNX graph, "
            "which `compress` does not make; use `fwsvd-export run`"
        )
    folder = output_path(recipe, output)
    with staged_output(folder, inputs=read_paths(recipe)) as staged:
        clock = Clock()
        prepared = prepare(recipe, clock)
        compressed, result, _ = compress_stage(prepared, recipe, clock, progress, last=True)
        compression = result.to_dict()
        save_checkpoint(
            compressed,
            prepared.tokenizer,
            staged.path,
            recipe.model.task,
            compression,
            recipe.to_dict(),
            prepared.location,
        )
        checkpoint_card(prepared.location, recipe.model.task, recipe.to_dict(), result, data_fingerprints(recipe)).save(
            staged.path / CARD_FILE
        )
    return folder, compression


def data_fingerprints(recipe: Recipe) -> dict[str, str]:
    """The SHA-256 of each data role the recipe reads (the model card names the calibration data by it)."""
    return {role: fingerprint(recipe, role) for role in DATA_ROLES if getattr(recipe.data, role) is not None}


def dense_stage(prepared: Prepared, folder: Path, clock: Clock, progress: bool) -> Dense:
    """Export the dense model into `folder` and measure it once (PyTorch outputs, ORT latency)."""
    recipe = prepared.recipe
    onnx = export_onnx(
        prepared.model,
        prepared.tokenizer,
        folder,
        prepared.task.onnx_task(recipe.export.with_past),
        recipe.export.opset,
    )
    graph = inspect_graph(onnx, prepared.model)
    variants = _variants(prepared, onnx)
    clock.lap("export (dense)")
    ref = reference(prepared.task, recipe.validation, prepared.model, prepared.evaluation, onnx, progress, variants)
    clock.lap("validate (dense)")
    return Dense(onnx, graph, ref)


def _variants(prepared: Prepared, graph: Path, recipe: Recipe | None = None) -> dict[str, Path]:
    """The recipe's other precisions of an fp32 graph, each in its own folder beside it."""
    export = (recipe or prepared.recipe).export
    return {p: make_variant(graph, p, export.int8_mode, prepared.calibration) for p in export.precisions if p != "fp32"}


def point_stage(
    prepared: Prepared,
    dense: Dense,
    recipe: Recipe,
    folder: Path,
    clock: Clock,
    progress: bool,
    statistics: dict[str, LayerStats] | None = None,
    last: bool = False,
) -> RunReport:
    """One compressed model: factorize, checkpoint, export, validate against `dense`, its files in
    `folder`; returns its report, which the caller writes (`write_report`). `last`: no later point needs
    the dense model."""
    task = prepared.task
    compressed, result, recovery = compress_stage(prepared, recipe, clock, progress, statistics, last, dense, folder)
    save_checkpoint(
        compressed,
        prepared.tokenizer,
        folder / "compressed",
        task.name,
        result.to_dict(),
        recipe.to_dict(),
        prepared.location,
    )
    clock.lap("checkpoint")
    small_onnx = export_onnx(
        compressed,
        prepared.tokenizer,
        folder / "onnx" / "compressed",
        task.onnx_task(recipe.export.with_past),
        recipe.export.opset,
    )
    graph = {"dense": dense.graph, "compressed": inspect_graph(small_onnx, compressed)}
    variants = _variants(prepared, small_onnx, recipe)
    clock.lap("export")
    prompts = _prompts(recipe, prepared.tokenizer, prepared.evaluation)
    params_compressed = count_params(compressed)
    evidence = torch_results(task, recipe.validation, compressed, prepared.evaluation, prompts, progress)
    config = prepared.model.config  # what the graphs' timing inputs are sized by
    if last:  # what follows needs the models' graphs and results only: the host holds the graphs alone
        del compressed
        prepared.release_models()
    validation = validate(
        task, recipe.validation, dense.reference, evidence, prepared.evaluation, small_onnx, progress, prompts, variants
    )
    del evidence  # the timing needs the graphs alone
    time_artifacts(recipe.validation, dense.reference, validation, small_onnx, variants, config)
    clock.lap("validate")
    missing = graph["compressed"]["layers_missing_split"]
    if missing:
        validation.checks.append(Check("graph: split MatMuls", False, f"not found for {', '.join(missing)}"))
    sizes = Sizes(
        prepared.dense_params, params_compressed, graph_bytes(dense.onnx.parent), graph_bytes(small_onnx.parent)
    )
    artifacts = Artifacts(
        "compressed",
        os.path.relpath(dense.onnx, folder),
        os.path.relpath(small_onnx, folder),
        {p: os.path.relpath(g, folder) for p, g in variants.items()},
    )
    return _run_report(prepared, recipe, result, recovery, sizes, graph, validation, clock, artifacts)


def _run_report(
    prepared: Prepared,
    recipe: Recipe,
    result: CompressionResult,
    recovery: Recovery,
    sizes: Sizes,
    graph: dict,
    validation: Validation,
    clock: Clock,
    artifacts: Artifacts,
) -> RunReport:
    """The report of one compressed model, from what its stages returned."""
    tuned = bool(recipe.finetune.epochs)
    return RunReport(
        recipe_file=recipe.source,
        recipe=recipe.to_dict(),
        model=ModelInfo(
            prepared.location,
            prepared.task.name,
            recipe.model.dtype,
            prepared.loading_notes,
            prepared.task.settings.get("head"),
            prepared.task.settings.get("pooling"),
        ),
        compression=result,
        finetune=FinetuneInfo(
            recipe.finetune.epochs,
            recovery.train_loss,
            "finetune" if prepared.finetune else "calibration",
            len(prepared.finetune or prepared.calibration) if tuned else 0,
            recovery.heldout_loss,
            recovery.learning_rate,
            recovery.best_epoch,
            recovery.stopped_early,
            recovery.heldout_batches,
            recovery.start_loss,
        ),
        sizes=sizes,
        graph=graph,
        validation=validation,
        seconds=dict(clock.seconds),
        peak_rss_mb=dict(clock.peak_rss_mb),
        artifacts=artifacts,
        versions=library_versions(),
        data_sha256=data_fingerprints(recipe),
        machine=machine("cuda" if "cuda" in _timed(validation) else "cpu"),
    )


def _timed(validation: Validation) -> set[str]:
    """The providers the run's latencies were measured on."""
    return {name for name, entry in validation.providers.items() if entry.get("latency")}


def run(recipe: Recipe, output: str | Path | None = None, progress: bool = True) -> RunResult:
    """Run every stage of `recipe`; the report's ``passed`` says whether validation held."""
    folder = output_path(recipe, output)
    clock = Clock()
    with staged_output(folder, inputs=read_paths(recipe)) as staged:
        prepared = prepare(recipe, clock)
        dense = dense_stage(prepared, staged.path / "onnx" / "dense", clock, progress)
        report = point_stage(prepared, dense, recipe, staged.path, clock, progress, last=True)
        unreadable = report.compression.statistics.get("cache_unreadable")
        report = replace(
            report,
            output_notes=staged.notes + ([f"statistics cache: {unreadable}"] if unreadable else []),
            whole_run=WholeRun(**clock.whole()),
        )
        report = write_report(report, staged.path)
    return RunResult(folder, report)

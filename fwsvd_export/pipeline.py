"""The whole run: recipe -> data -> statistics -> factorize -> checkpoint -> export -> validate -> report.

Everything is written into a staging folder beside the output, made before any compute and moved into
place at the end (``outputs.py``), so a run that fails on bad input, crashes or is interrupted leaves no
half-written output behind. A run that completes but misses a validation threshold keeps its artifacts
and report (that is what one debugs from).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from .core import Batch, compress_, get_method
from .recipe import Recipe
from .stages.checkpoint import library_versions, save_checkpoint
from .stages.data import load_records
from .stages.export import ONNX_FILE, export_onnx, inspect_graph
from .stages.finetune import finetune_
from .stages.models import load_for_statistics, load_model
from .stages.outputs import resolve_output, staged_output
from .stages.report import write_report
from .stages.tasks import get_task
from .stages.validate import Check, validate



@dataclass
class RunResult:
    output: Path
    report: dict

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def output_path(recipe: Recipe, output: Optional[str | Path]) -> Path:
    """Where the run's results go: `output`, else the recipe's export.output (relative to the recipe)."""
    return resolve_output(output if output is not None else recipe.resolve(recipe.export.output))


def _batches(recipe: Recipe, tokenizer, config, role: str) -> list[Batch]:
    task = get_task(recipe.model.task)
    source = getattr(recipe.data, role)
    records = load_records(recipe, role, task.columns(source, role == "calibration"), skip_empty=task.skip_empty)
    return task.make_batches(records, source, tokenizer, recipe.data.max_length, recipe.data.batch_size,
                             role == "calibration", config)


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


class _Clock:
    """Wall time of each stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


@dataclass
class Compressed:
    """What the compress stage hands to export and validation."""

    model: nn.Module
    compressed: nn.Module
    tokenizer: object
    location: str
    result: object
    evaluation: list[Batch]
    finetune_loss: list[float]


def compress_stage(recipe: Recipe, clock: _Clock, progress: bool) -> Compressed:
    """Load, read the data, gather statistics, factorize and (optionally) fine-tune."""
    task = get_task(recipe.model.task)
    model, tokenizer, location = load_model(recipe)
    clock.lap("load model")
    calibration = _batches(recipe, tokenizer, model.config, "calibration")
    evaluation = _batches(recipe, tokenizer, model.config, "evaluation")
    clock.lap("data")
    runner = load_for_statistics(recipe, location) if get_method(recipe.compression.method).needs else None
    if runner is not None:
        clock.lap("load model (device_map)")
    compressed = copy.deepcopy(model)
    result = compress_(compressed, recipe.compression, calibration, task.loss, progress, Path(recipe.base_dir or "."),
                       statistics_model=runner)
    del runner
    clock.seconds.update({f"compress: {k}": v for k, v in result.seconds.items()})
    clock.lap("compress")
    finetune_loss = []
    if recipe.finetune.epochs:
        finetune_loss = finetune_(compressed, task, calibration, recipe.finetune, recipe.data.seed, progress)
        clock.lap("finetune")
    return Compressed(model, compressed, tokenizer, location, result, evaluation, finetune_loss)


def compress_only(recipe: Recipe, output: Optional[str | Path] = None, progress: bool = True) -> tuple[Path, dict]:
    """The compress stage alone: writes the checkpoint folder (no export, no validation)."""
    folder = output_path(recipe, output)
    with staged_output(folder) as staged:
        done = compress_stage(recipe, _Clock(), progress)
        compression = done.result.to_dict()
        save_checkpoint(done.compressed, done.tokenizer, staged.path, recipe.model.task, compression, recipe.to_dict(),
                        done.location)
    return folder, compression


def run(recipe: Recipe, output: Optional[str | Path] = None, progress: bool = True) -> RunResult:
    """Run every stage of `recipe`; the report's ``passed`` says whether validation held."""
    folder = output_path(recipe, output)
    task = get_task(recipe.model.task)
    clock = _Clock()
    lap, seconds = clock.lap, clock.seconds
    with staged_output(folder) as staged:
        stage = staged.path
        done = compress_stage(recipe, clock, progress)
        model, compressed, tokenizer, location, result = done.model, done.compressed, done.tokenizer, done.location, done.result
        evaluation, finetune_loss = done.evaluation, done.finetune_loss
        compression = result.to_dict()
        save_checkpoint(compressed, tokenizer, stage / "compressed", task.name, compression, recipe.to_dict(), location)
        lap("checkpoint")
        onnx_task = task.onnx_task(recipe.export.with_past)
        dense_onnx = export_onnx(model, tokenizer, stage / "onnx" / "dense", onnx_task, recipe.export.opset)
        small_onnx = export_onnx(compressed, tokenizer, stage / "onnx" / "compressed", onnx_task, recipe.export.opset)
        graph = {"dense": inspect_graph(dense_onnx, model), "compressed": inspect_graph(small_onnx, compressed)}
        lap("export")
        validation = validate(task, recipe.validation, model, compressed, evaluation, dense_onnx, small_onnx,
                              model.config.vocab_size, progress, _prompts(recipe, tokenizer, evaluation))
        lap("validate")
        missing = graph["compressed"]["layers_missing_split"]
        if missing:
            validation.checks.append(Check("graph: split MatMuls", False, f"not found for {', '.join(missing)}"))
        report = {
            "tool": "fwsvd-export",
            "versions": library_versions(),
            "recipe_file": recipe.source,
            "recipe": recipe.to_dict(),
            "model": {"source": location, "task": task.name, "dtype": recipe.model.dtype},
            "compression": compression,
            "finetune": {"epochs": recipe.finetune.epochs, "epoch_loss": finetune_loss},
            "sizes": {
                "params_dense": count_params(model),
                "params_compressed": count_params(compressed),
                "onnx_dense_bytes": _bytes(dense_onnx.parent),
                "onnx_compressed_bytes": _bytes(small_onnx.parent),
            },
            "flop_ratio": linear_flop_ratio(compression["layers"]),
            "graph": graph,
            "validation": validation.to_dict(),
            "seconds": seconds,
            "artifacts": {"checkpoint": "compressed", "onnx_dense": f"onnx/dense/{ONNX_FILE}",
                          "onnx_compressed": f"onnx/compressed/{ONNX_FILE}"},
            "output_notes": staged.notes,
            "passed": validation.passed,
        }
        write_report(report, stage)
    return RunResult(folder, report)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*"))

"""The one-call Python API, beside ``compress_``: `compress` a model (an instance, a local folder or a hub id) on
a list of texts or records, `export` it to ONNX and its precision copies, `validate` it in ONNX Runtime
against the dense model::

    import fwsvd_export as fx
    small = fx.compress("path/to/model", records, ratio=0.5)   # the task from the model's head
    graphs = fx.export(small, "onnx-out", precisions=("fp32", "int8"))
    print(fx.validate(small, held_out, graphs).passed)

Thin wrappers over the stages a recipe run uses (stages.models loads and checks the model, the task
registry makes the batches and the loss, core.compress_ factorizes, stages.export, stages.precision and
stages.validate do the rest): the same checks and the same numbers, without a recipe file. What they cannot
tell (the task of a model without a known head, the columns of a record) is a FwsvdError naming what to pass.

A record holds what its task reads (`Task.columns`) under the keys a recipe's data section defaults to: text
and label (classifiers; also under sentence, labels...: `_KEYS`), tokens and tags (token-classification),
question, context and answers (question-answering, SQuAD's form), context, choices and label (multiple-choice).
Every column field of `config.DataSource` is looked for, so a task that adds one needs nothing here.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from .config import DataSource, ExportSpec, ProviderSpec, ValidationSpec
from .core import Batch, CompressionResult, CompressionSpec, compress_
from .errors import FwsvdError
from .stages.checkpoint import MANIFEST, load, save_checkpoint
from .stages.data import Record
from .stages.export import export_onnx
from .stages.models import (
    check_local_model,
    fit_batches,
    is_local_path,
    load_preprocessor,
    load_pretrained,
    text_tokenizer,
)
from .stages.precision import make_variant
from .stages.tasks import TASKS, Task, get_task
from .stages.validate import Validation, reference, torch_results
from .stages.validate import validate as validate_stage

__all__ = ["Compressed", "compress", "export", "infer_task", "validate"]

# A model class's name ends in its head: the task that head serves. A bare encoder ("BertModel") embeds.
_HEADS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForCausalLM", "text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
)
# The record keys a column is looked for under, in order, where records spell it several ways.
_KEYS = {
    "text_column": ("text", "sentence", "sentence1", "content"),
    "text_pair_column": ("text_pair", "sentence2", "pair"),
    "label_column": ("label", "labels"),
}
# Every column field of DataSource (a task's own, such as tokens_column or answers_column, under its default
# name), so records of any task find their columns as a recipe's defaults would.
_COLUMNS = {
    f.name: _KEYS.get(f.name, (f.default,))
    for f in fields(DataSource)
    if f.name in _KEYS or (f.name.endswith("_column") and isinstance(f.default, str))
}


@dataclass
class Compressed:
    """A compressed model with what made it: its preprocessor (tokenizer), task, and the compression's result
    (per-layer plans; `summary` is the short form). `source`, where the dense model was loaded from, and
    `dense`, the model passed in (left dense: `compress` factorized a copy), are what `validate` compares with."""

    model: nn.Module
    tokenizer: Any
    task: str
    result: CompressionResult
    params_dense: int
    source: str | None = None
    dense: nn.Module | None = field(default=None, repr=False)
    max_length: int = 128
    batch_size: int = 16

    @property
    def summary(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "task": self.task,
            **self.result.summary(),
            "params_dense": self.params_dense,
            "params_compressed": params,
            "model_kept_ratio": params / self.params_dense,
        }

    def save(self, folder: str | Path) -> Path:
        """Write the checkpoint folder (``fwsvd_export.load`` reads it back)."""
        return save_checkpoint(
            self.model, self.tokenizer, Path(folder), self.task, self.result.to_dict(), None, self.source
        )

    def __str__(self) -> str:
        s = self.summary
        return (
            f"{s['task']}: {s['method']} factorized {s['compressed_layers']} of {s['targeted_layers']} targeted "
            f"Linear layers (they keep {s['targeted_kept_ratio']:.1%} of their weights); the model keeps "
            f"{s['params_compressed']:,} of {s['params_dense']:,} parameters ({s['model_kept_ratio']:.1%})"
        )


def infer_task(architectures: Sequence[str], what: str) -> str:
    """The task a model serves, from its class names (config.json's `architectures`, or the instance's class)."""
    for name in architectures:
        for suffix, task in _HEADS:
            if name.endswith(suffix):
                return task
        if name.endswith("Model") and "For" not in name:
            return "feature-extraction"
    named = ", ".join(architectures) or "no architectures in its config.json"
    raise FwsvdError(f"cannot tell the task of {what} from its head ({named}); pass task= one of: {', '.join(TASKS)}")


def _architectures(location: str) -> list[str]:
    if is_local_path(location):
        config = json.loads((Path(check_local_model(location)) / "config.json").read_text())
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(location).to_dict()
    return list(config.get("architectures") or [])


def _padded(tokenizer: Any) -> Any:
    """The tokenizer with a pad token (causal LMs often ship without one: EOS pads, as load_pretrained does)."""
    text = text_tokenizer(tokenizer)
    if text is not None and text.pad_token is None:
        if text.eos_token is None and text.unk_token is None:
            raise FwsvdError("the tokenizer has no pad, EOS or unknown token to pad batches with")
        text.pad_token = text.eos_token or text.unk_token
    return tokenizer


def _load(
    model_or_path: Any, task: str | None, tokenizer: Any
) -> tuple[nn.Module, Any, str, str | None, nn.Module | None]:
    """(model to factorize, preprocessor, task, source location, the dense model passed in)."""
    if isinstance(model_or_path, nn.Module):
        task = task or infer_task([type(model_or_path).__name__], f"a {type(model_or_path).__name__}")
        source = getattr(model_or_path, "name_or_path", None) or None
        if tokenizer is None and source is None:
            raise FwsvdError("pass tokenizer=: the model instance does not say where it was loaded from")
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = load_preprocessor(str(tokenizer or source), {"trust_remote_code": False})
        return copy.deepcopy(model_or_path).eval(), _padded(tokenizer), task, source, model_or_path.eval()
    if not isinstance(model_or_path, (str, Path)):
        raise FwsvdError(f"model_or_path must be a model, a folder or a hub id, not {type(model_or_path).__name__}")
    location = str(model_or_path)
    task = task or infer_task(_architectures(location), f"'{location}'")
    model, preprocessor = load_pretrained(location, get_task(task).name)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_preprocessor(str(tokenizer), {"trust_remote_code": False})
    return model, _padded(tokenizer) if tokenizer is not None else preprocessor, task, location, None


def _column(record: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in record), None)


def _source(data: Sequence[Any]) -> tuple[list[Record], DataSource]:
    """`data` (texts, (text, pair) tuples, or records) as records and the columns they hold."""
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence) or not data:
        raise FwsvdError("data must be a non-empty list of texts, of (text, pair) tuples or of records (dicts)")
    if all(isinstance(d, str) for d in data):
        return [Record({"text": t}, f"data[{i}]") for i, t in enumerate(data)], DataSource()
    if all(isinstance(d, (tuple, list)) and len(d) == 2 for d in data):
        return (
            [Record({"text": a, "text_pair": b}, f"data[{i}]") for i, (a, b) in enumerate(data)],
            DataSource(text_pair_column="text_pair"),
        )
    if not all(isinstance(d, Mapping) for d in data):
        raise FwsvdError("data mixes kinds: give all texts, all (text, pair) tuples, or all records (dicts)")
    found = {c: _column(data[0], keys) for c, keys in _COLUMNS.items()}
    source = DataSource(**{c: k for c, k in found.items() if k is not None})
    return [Record(dict(d), f"data[{i}]") for i, d in enumerate(data)], source


def _check_keys(records: list[Record], task: Task, source: DataSource, required: list[str]) -> None:
    """Every record holds each column the task reads under the key data[0] has it under; one that lacks it is
    named, with the keys looked under where data[0] has it under none of them."""
    looked = {getattr(source, c): (c.removesuffix("_column"), keys) for c, keys in _COLUMNS.items()}
    for record in records:
        for column in (c for c in required if c not in record):
            noun, keys = looked.get(column, (column, (column,)))
            found = len(keys) == 1 or column in records[0]
            named = f"'{column}'" if found else f"{noun} under any of {', '.join(keys)}"
            raise FwsvdError(
                f"{record.where} has no {named}, which {task.name} reads (its keys: {', '.join(map(str, record))})"
            )


def _check_columns(task: Task, source: DataSource, training: bool) -> list[str]:
    """The columns the task reads, in the API's words where data lacks what a recipe would name."""
    if task.name in ("text-classification", "image-classification") and source.label_column is None:
        raise FwsvdError(
            f"{task.name} needs labelled records: pass dicts such as "
            "{'text': ..., 'label': ...} (a label is a class index or a name from the model's labels)"
        )
    if task.name == "feature-extraction" and training and source.text_pair_column is None:
        raise FwsvdError(
            "feature-extraction calibrates on text pairs (in-batch contrastive loss): pass (text, pair) tuples"
        )
    return task.columns(source, training)


def batches(
    data: Sequence[Any],
    task: Task,
    preprocessor: Any,
    model: nn.Module,
    max_length: int,
    batch_size: int,
    training: bool,
) -> list[Batch]:
    """`data`'s batches as the task makes them, holding what the model's forward takes: training batches
    carry what the task's loss reads (labels, pairs), evaluation ones what its metric reads."""
    records, source = _source(data)
    required = _check_columns(task, source, training)
    _check_keys(records, task, source, required)
    if task.skip_empty:
        records = [r for r in records if all(str(r.get(c) or "").strip() for c in required)]
    for record in records:
        for column in required:
            if record.get(column) in (None, ""):
                raise FwsvdError(f"{record.where}: no value for '{column}'")
    if not records:
        raise FwsvdError(f"every record is empty in {', '.join(required)}")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and max_length > limit:
        raise FwsvdError(f"max_length {max_length} exceeds the model's {limit} positions")
    return fit_batches(
        task.make_batches(records, source, preprocessor, max_length, batch_size, training, model.config), model
    )


def compress(
    model_or_path: Any,
    data: Sequence[Any],
    *,
    task: str | None = None,
    method: str = "kfac",
    ratio: float | None = None,
    budget: float | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> Compressed:
    """Factorize the model's Linear layers with `method`, each keeping `ratio` of its weights, or, with
    `budget`, ranks allocated globally to keep that fraction of the targeted parameters (neither: ratio 0.5).
    `data` calibrates: texts (decoders), (text, pair) tuples (embedding models), or records with the task's
    columns (classifiers: text and label; token-classification: tokens and tags; question-answering: question,
    context and answers; multiple-choice: context, choices and label). The task comes from the model's head
    unless given. A model passed as an instance is left as it was (a copy is factorized); a folder or hub id
    is loaded as a run loads it."""
    spec = CompressionSpec(method=method, ratio=ratio, budget=budget)
    model, preprocessor, task_name, source, dense = _load(model_or_path, task, tokenizer)
    kind = get_task(task_name).for_model(model)  # its pooling, its head
    calibration = batches(data, kind, preprocessor, model, max_length, batch_size, True)
    params = sum(p.numel() for p in model.parameters())
    result = compress_(model, spec, calibration, kind.loss, progress)
    return Compressed(model, preprocessor, task_name, result, params, source, dense, max_length, batch_size)


def export(
    compressed: Compressed,
    folder: str | Path,
    precisions: Sequence[str] = ("fp32",),
    *,
    opset: int | None = None,
    with_past: bool = True,
) -> dict[str, Path]:
    """Write the compressed model's ONNX graph into ``folder/compressed/`` (with its config and tokenizer, so
    optimum's ORTModelFor* loads the folder) and each other precision (int8, int4: CPU; fp16: CUDA) into
    ``folder/compressed-PRECISION/``; returns each precision's graph file. A decoder is exported with its
    key/value cache unless `with_past` is False."""
    ExportSpec(precisions=list(precisions))  # the names, and fp32 among them, checked as a recipe's are
    task = get_task(compressed.task)
    graph = export_onnx(
        compressed.model, compressed.tokenizer, Path(folder) / "compressed", task.onnx_task(with_past), opset
    )
    return {"fp32": graph, **{p: make_variant(graph, p) for p in precisions if p != "fp32"}}


def _compressed(given: Any) -> Compressed:
    """A Compressed as given, or read back from a checkpoint folder (its manifest names the task and source)."""
    if isinstance(given, Compressed):
        return given
    folder = Path(given)
    model, tokenizer = load(folder, with_tokenizer=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    result = CompressionResult(manifest["compression"]["summary"]["method"], [])
    return Compressed(model, _padded(tokenizer), manifest["task"], result, 0, manifest.get("source_model"))


def validate(
    compressed_or_folder: Any,
    data: Sequence[Any],
    exported: Mapping[str, str | Path] | None = None,
    *,
    providers: Sequence[str] = ("cpu",),
    max_metric_loss: float = 0.05,
    max_quantization_loss: float = 0.005,
    max_length: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Validation:
    """The compressed model's task metric on `data` against the dense model's, in PyTorch and in ONNX Runtime
    on each of `providers` (the first is required), with numeric parity and, for a decoder, greedy generation:
    the checks a run makes (`.passed`, `.checks`, `.metric`, `.original_torch`, `.compressed_torch`,
    `.providers`, `.variants`). `exported`: what `export` returned (its other precisions are checked too);
    without it the fp32 graph is exported to a temporary folder. `compressed_or_folder`: what `compress`
    returned, or a checkpoint folder (its dense source model is loaded again)."""
    small = _compressed(compressed_or_folder)
    task = get_task(small.task)
    dense = small.dense
    if dense is None:
        if not small.source:
            raise FwsvdError(
                "the dense model to compare with is unknown: compress a folder or hub id, or a model instance"
            )
        dense = load_pretrained(small.source, task.name)[0]
    task = task.for_model(dense)
    spec = ValidationSpec(
        providers=[ProviderSpec(p, required=i == 0) for i, p in enumerate(providers)],
        max_metric_loss=max_metric_loss,
        max_quantization_loss=max_quantization_loss,
    )
    evaluation = batches(
        data, task, small.tokenizer, dense, max_length or small.max_length, batch_size or small.batch_size, False
    )
    with tempfile.TemporaryDirectory(prefix="fwsvd-validate-") as scratch:
        graphs = {p: Path(g) for p, g in (exported or export(small, scratch)).items()}
        prompts = (
            [row[: min(8, len(row))].unsqueeze(0) for b in evaluation for row in b.inputs["input_ids"]][:2]
            if task.generates
            else []
        )
        ref = reference(task, spec, dense, evaluation, graphs["fp32"], progress)  # the dense graph: never timed here
        evidence = torch_results(task, spec, small.model, evaluation, prompts, progress)
        return validate_stage(
            task,
            spec,
            ref,
            evidence,
            evaluation,
            graphs["fp32"],
            progress,
            prompts,
            {p: g for p, g in graphs.items() if p != "fp32"},
        )

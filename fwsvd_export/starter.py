"""`fwsvd-export init`: a commented starter recipe for a model and a task, its data columns guessed from a
data file's header, written where no file is (never over one). What it writes is read back by the recipe's
own loader before it is written, so `fwsvd-export check` sees a valid recipe; what it could not guess is
marked TODO and said.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import yaml

from .config import Recipe
from .core.methods import METHODS
from .errors import FwsvdError
from .loader import parse_recipe
from .stages.precision import PRECISIONS
from .stages.tasks import TASKS

TEXT = ("text", "sentence", "sentence1", "question", "premise", "query", "content", "document", "input")
PAIR = ("text_pair", "sentence2", "pair", "hypothesis", "positive", "answer", "passage")
LABEL = ("label", "labels", "class", "category", "target", "y")
IMAGE = ("image", "image_path", "path", "file", "filename")
MAX_LENGTH = 128


def _q(value: str) -> str:
    """A string as a YAML scalar (a JSON string is one)."""
    return json.dumps(value)


def data_columns(path: Path) -> tuple[str, list[str]]:
    """The data file's format and its columns, from its first row or header."""
    suffix = path.suffix.lower()
    fmt = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}.get(
        suffix, "text"
    )
    if fmt == "text":
        return fmt, ["text"]
    try:
        with path.open(encoding="utf-8-sig") as f:
            if fmt == "jsonl":
                first = next((line for line in f if line.strip()), "{}")
                row = json.loads(first)
                return fmt, list(row) if isinstance(row, dict) else []
            return fmt, next(csv.reader(f, dialect="excel-tab" if fmt == "tsv" else "excel"), [])
    except (OSError, ValueError, csv.Error) as exc:
        raise FwsvdError(f"{path}: cannot read its columns: {exc}") from None


def _pick(columns: list[str], names: tuple[str, ...], taken: tuple[str, ...] = ()) -> str | None:
    lowered = {c.lower(): c for c in columns if c not in taken}
    return next((lowered[n] for n in names if n in lowered), None)


def _source_keys(task: str, fmt: str, columns: list[str], notes: list[str]) -> list[tuple[str, str, str]]:
    """(key, YAML value, comment) of a data source's column keys for `task`, guessed from `columns`."""
    keys: list[tuple[str, str, str]] = []
    if fmt == "text":
        keys.append(("format", "text", "one text a line"))
    if task == "image-classification":
        image = _pick(columns, IMAGE) or "image"
        keys.append(("image_column", _q(image), "an image file's path, relative to the data file"))
    else:
        text = _pick(columns, TEXT) or next(iter(columns), "text")
        keys.append(
            (
                "text_column",
                _q(text),
                "guessed from the file's columns: " + ", ".join(columns) if columns else "the column holding the text",
            )
        )
        pair = _pick(columns, PAIR, (text,))
        if task == "feature-extraction":
            if pair is None:
                notes.append("feature-extraction calibrates on text pairs: set data.*.text_pair_column")
            keys.append(
                (
                    "text_pair_column",
                    _q(pair or "text_pair"),
                    "the text each row's text should embed close to"
                    + ("" if pair else " (TODO: no such column was found)"),
                )
            )
        elif task == "text-classification" and pair:
            keys.append(("text_pair_column", _q(pair), "the second text of a pair (null for single texts)"))
    if task in ("text-classification", "image-classification"):
        label = _pick(columns, LABEL)
        if label is None:
            notes.append("no label column was found: set data.*.label_column")
        keys.append(
            (
                "label_column",
                _q(label or "label"),
                "a class index, or a name from the model's label2id"
                + ("" if label else " (TODO: no such column was found)"),
            )
        )
    return keys


def _source(role: str, path: str, keys: list[tuple[str, str, str]], comment: str, extra: str = "") -> str:
    lines = [
        f"  {role}:  # {comment}",
        f"    path: {_q(path)}  # JSONL, CSV, TSV or plain text; or dataset: NAME (a "
        "hub dataset, pip install datasets)",
    ]
    lines += [f"    {key}: {value}  # {note}" for key, value, note in keys]
    return "\n".join(lines + ([extra] if extra else [])) + "\n"


def _model_lines(model: str, task: str, base: Path) -> tuple[str, int]:
    """The model section and the max_length its config allows (MAX_LENGTH at most)."""
    from .stages.models import check_local_model, is_local_path

    if not is_local_path(model):
        return f"  hub_id: {_q(model)}  # a Hugging Face hub id (downloaded by run); or path: FOLDER\n", MAX_LENGTH
    folder = Path(check_local_model(model))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    positions = config.get("max_position_embeddings") or config.get("n_positions") if isinstance(config, dict) else None
    length = min(MAX_LENGTH, positions) if isinstance(positions, int) and positions > 1 else MAX_LENGTH
    relative = os.path.relpath(folder.resolve(), base.resolve())
    return (
        f"  path: {_q(relative)}  # a model folder (config.json and safetensors weights), relative to this file; "
        "or hub_id: ORG/NAME, or package: NAME\n"
    ), length


def starter_recipe(model: str, task: str, data: Path | None, output: Path) -> tuple[str, list[str]]:
    """The starter recipe's text for `output`, and notes on what it could not guess."""
    if task not in TASKS:
        raise FwsvdError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    notes: list[str] = []
    base = output.parent
    model_lines, max_length = _model_lines(model, task, base)
    if data is not None:
        if not data.is_file():
            raise FwsvdError(f"--data {data}: no such file")
        fmt, columns = data_columns(data)
        data_path = os.path.relpath(data.resolve(), base.resolve())
    else:
        fmt, columns, data_path = "jsonl", [], "data/calibration.jsonl"
        notes.append(f"no --data: data.calibration.path and data.evaluation.path ({data_path}) are placeholders")
    keys = _source_keys(task, fmt, columns, notes)
    name = Path(model.rstrip("/")).name or "model"
    text = _TEMPLATE.format(
        schema_note=f"fwsvd-export schema > {base / 'recipe.schema.json'}",
        file=output.name,
        model=model_lines,
        task=task,
        tasks=" | ".join(TASKS),
        calibration=_source(
            "calibration",
            data_path,
            keys,
            "the rows the Fisher statistics are gathered on",
            "    max_samples: 1000  # at most this many rows, drawn at random (a few hundred to a few "
            "thousand suffice)",
        ),
        evaluation=_source("evaluation", data_path, keys, "the rows the metric is measured on: better a held-out file"),
        max_length=max_length,
        methods=" | ".join(METHODS),
        precisions=", ".join(p for p in PRECISIONS if p != "fp32"),
        output=_q(f"outputs/{name}"),
    )
    return text, notes


def write_starter(output: Path, model: str, task: str, data: Path | None) -> list[str]:
    """Write the starter recipe to `output`, never over an existing file; returns the notes."""
    if output.exists() or output.is_symlink():
        raise FwsvdError(f"{output} exists; init never overwrites a file: choose another with -o")
    text, notes = starter_recipe(model, task, data, output)
    recipe: Recipe = parse_recipe(yaml.safe_load(io.StringIO(text)), str(output), output.parent.resolve())
    assert recipe.model.task == task, "the starter recipe reads back as written"
    try:
        with output.open("x", encoding="utf-8") as f:  # "x": a file made meanwhile is not overwritten either
            f.write(text)
    except FileExistsError:
        raise FwsvdError(f"{output} exists; init never overwrites a file: choose another with -o") from None
    except OSError as exc:
        raise FwsvdError(f"cannot write {output}: {exc.strerror or exc}") from None
    return notes


_TEMPLATE = """\
# yaml-language-server: $schema=recipe.schema.json
# (an editor then checks this file's keys and choices; write the schema with: {schema_note})
#
# A starter recipe from `fwsvd-export init`. `fwsvd-export check {file}` reads everything it names (the data,
# the model's config against its weights' headers) and prints the plan without running it; `fwsvd-export run
# {file}` compresses, exports to ONNX and validates. Relative paths are relative to this file.

model:
{model}  task: {task}  # {tasks}
  dtype: float32  # float32 | float16 | bfloat16: the precision the model is loaded and compressed in
  trust_remote_code: false  # true runs the model folder's own Python (config.json's auto_map): only for a trusted folder

data:
{calibration}{evaluation}  max_length: {max_length}  # tokens a sequence is cut to (at most the model's positions)
  batch_size: 16  # rows a batch, for the statistics pass and the evaluation
  seed: 0  # draws max_samples

compression:
  method: kfac  # {methods} (`fwsvd-export methods` says what each weighs by)
  # How far to cut, one of: ratio (each targeted layer keeps this fraction of its weights), rank (one rank for
  # every layer), budget (keep this fraction of the targeted parameters, ranks allocated from the statistics)
  # or target_speedup (times faster on latency_provider, measured).
  ratio: 0.5
  # target: ['regex']  # which Linear layers (regexes over module names); default: the family's attention and MLP
  # exclude: ['regex']  # layers to leave dense
  # rank_multiple: 8  # round ranks down to a multiple of this (8, 16, 32 suit fast GEMMs)

finetune:
  epochs: 0  # recovery fine-tuning after factorizing (0: off)

export:
  output: {output}  # the run's folder, relative to this file; an earlier run's output is replaced, nothing else
  precisions: [fp32]  # fp32, and copies in: {precisions}

validation:
  providers:  # ONNX Runtime providers to validate on; a required one must be available
    - {{name: cpu, required: true}}
    - {{name: cuda}}
  max_metric_loss: 0.05  # the task metric may lose this much (accuracy/cosine absolute, perplexity relative)
"""

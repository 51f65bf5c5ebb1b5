"""Calibration and evaluation records: local JSONL/CSV/plain-text files, or a `datasets` hub dataset.

A record is a plain dict of column -> value. Which columns must exist depends on the task; the check
happens here, before any model work, so a typo in a column name fails in seconds with the file named.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from .errors import FwsvdError
from .recipe import DataSource, Recipe

Record = dict[str, Any]


def _detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".txt", ".text", ".raw"):
        return "text"
    raise FwsvdError(f"{path}: cannot tell the format from the extension '{suffix}'; set 'format' (jsonl, csv, text)")


def _read_file(path: Path, fmt: str, text_column: str) -> list[Record]:
    if fmt == "text":
        return [{text_column: line.rstrip("\n")} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
            return list(csv.DictReader(handle, dialect=dialect))
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FwsvdError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise FwsvdError(f"{path}:{number}: each line must be a JSON object")
            records.append(record)
    return records


def _read_hub(source: DataSource) -> list[Record]:
    try:
        import datasets  # optional: only hub users need it
    except ImportError:
        raise FwsvdError(f"dataset '{source.dataset}' needs the `datasets` package: pip install datasets") from None
    try:
        table = datasets.load_dataset(source.dataset, source.dataset_config, split=source.split)
    except Exception as exc:  # network, auth, unknown name: all surface as one clear message
        raise FwsvdError(f"could not load dataset '{source.dataset}' (split {source.split}): {exc}") from None
    return [dict(row) for row in table]


def load_records(recipe: Recipe, role: str, required: list[str], skip_empty: bool = False) -> list[Record]:
    """Records of `data.<role>` with every column in `required` present and non-empty (or, with
    `skip_empty`, records with an empty value dropped)."""
    source: DataSource = getattr(recipe.data, role)
    where = f"data.{role}"
    if source.path is not None:
        path = recipe.resolve(source.path)
        if not path.is_file():
            raise FwsvdError(f"{recipe.source}: '{where}.path' points to a missing file: {path}")
        try:
            records = _read_file(path, _detect_format(path, source.format), source.text_column)
        except UnicodeDecodeError as exc:
            raise FwsvdError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); from '{where}'") from None
        label = str(path)
    else:
        records = _read_hub(source)
        label = f"dataset {source.dataset}"
    if not records:
        raise FwsvdError(f"{label}: no records found (from '{where}')")
    columns = sorted(records[0].keys())
    for column in required:
        if column not in records[0]:
            raise FwsvdError(f"{label}: no column '{column}' (from '{where}'); columns are: {', '.join(columns)}")
    if skip_empty:  # running text (e.g. WikiText) has blank lines between paragraphs
        records = [r for r in records if all(str(r.get(c) or "").strip() for c in required)]
    for index, record in enumerate(records):
        for column in required:
            if record.get(column) in (None, ""):
                raise FwsvdError(f"{label}: record {index + 1} has no value in column '{column}'")
    if not records:
        raise FwsvdError(f"{label}: every record is empty in {', '.join(required)} (from '{where}')")
    if source.max_samples is not None and len(records) > source.max_samples:
        records = random.Random(recipe.data.seed).sample(records, source.max_samples)
    return records

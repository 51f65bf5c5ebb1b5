"""Calibration and evaluation records: local JSONL/CSV/TSV/plain-text/CoNLL files, or a `datasets` hub dataset.

A record is a dict of column -> value that also knows where it came from. Which columns must exist
depends on the task; the check happens here, before any model work, so a typo in a column name fails in
seconds with the file named.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import DataSource, Recipe
from ..errors import FwsvdError


class Record(dict[str, Any]):
    """A row of column -> value that remembers its origin (`file:line`, or a hub dataset row), so an
    error about a value found later (e.g. an unknown label) can point the user at the line to fix; and
    the `folder` of the file it was read from (None for a hub dataset), which paths it holds (an image
    file's) are relative to."""

    def __init__(self, values: dict[str, Any], where: str, folder: Path | None = None) -> None:
        super().__init__(values)
        self.where = where
        self.folder = folder
        self.token_wheres: list[str] | None = None  # a CoNLL sentence's: each word's own file:line


def _detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix in (".txt", ".text", ".raw"):
        return "text"
    if suffix == ".conll":
        return "conll"
    raise FwsvdError(
        f"{path}: cannot tell the format from the extension '{suffix}'; set 'format' (jsonl, csv, tsv, text, conll)"
    )


def _decode(path: Path, origin: str) -> str:
    """The file's text without a byte-order mark (Excel writes one; it would join the first column's
    name). Decoded whole, so a bad byte is reported on its true line (chunked reads lose the position)."""
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as exc:  # unreadable (permissions, a vanished network mount, ...)
        raise FwsvdError(f"{path}: cannot read the file ({exc.strerror or exc}); from '{origin}'") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FwsvdError(f"{path}:{line}: not UTF-8 text ({exc.reason}); from '{origin}'") from None


def _read_csv(path: Path, text: str, tabs: bool) -> list[Record]:
    """Rows keyed by the header. A row with more or fewer fields than the header is refused here, with
    its line: `csv.DictReader` would file the extras under the key None, or fill the gaps with None."""
    records = []
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect="excel-tab" if tabs else "excel")
    for row in _csv_rows(path, reader, "TSV" if tabs else "CSV"):
        where = f"{path}:{reader.line_num}"
        header = len(reader.fieldnames)
        if None in row:
            raise FwsvdError(
                f"{where}: the row has {header + len(row[None])} fields, more than the header's {header}"
                " (an unquoted delimiter inside a value?)"
            )
        missing = [column for column, value in row.items() if value is None]
        if missing:
            raise FwsvdError(
                f"{where}: the row has {header - len(missing)} fields but the header has {header};"
                f" no value for column {', '.join(repr(c) for c in missing)}"
            )
        records.append(Record(row, where, path.parent))
    return records


def _csv_rows(path: Path, reader: csv.DictReader, kind: str) -> Iterator[dict]:
    """The reader's rows; a line the csv module cannot parse (e.g. a field over its size limit) is a user
    error naming the file and line."""
    rows = iter(reader)
    while True:
        try:
            yield next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            # DictReader.line_num is the last good row's; its inner reader's is the line that failed
            raise FwsvdError(f"{path}:{reader.reader.line_num}: not valid {kind} ({exc})") from None


def _read_file(path: Path, fmt: str, text_column: str, origin: str) -> list[Record]:
    text = _decode(path, origin)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, text, tabs=fmt == "tsv")
    records = []
    for number, line in enumerate(io.StringIO(text, newline=None), 1):  # \n, \r\n or \r ends a line
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if fmt == "text":
            records.append(Record({text_column: line.rstrip("\n")}, where, path.parent))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FwsvdError(f"{where}: not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise FwsvdError(f"{where}: each line must be a JSON object")
        if "\\u" in line:  # only a \u escape can write a lone surrogate into text that decoded as UTF-8
            _refuse_lone_surrogates(record, where, origin)
        records.append(Record(record, where, path.parent))
    return records


def _read_conll(path: Path, text: str, source: DataSource) -> list[Record]:
    """A CoNLL column file, the format CoNLL-2003 ships in: one word a line, the word in the first
    whitespace-separated column and its tag in `conll_tag_column` (-1: the last); a blank line ends a
    sentence; `-DOCSTART-` lines are skipped. Each sentence is a record of two lists, the words under
    `tokens_column` and the tags under `tags_column`, found at its first word's line; each word's own
    line is kept (`token_wheres`), so a bad tag is reported where it stands."""
    records: list[Record] = []
    words: list[str] = []
    tags: list[str] = []
    wheres: list[str] = []
    for number, line in enumerate(io.StringIO(text + "\n\n", newline=None), 1):  # a blank line ends the last sentence
        fields = line.split()
        if fields and fields[0] == "-DOCSTART-":
            continue
        if not fields:
            if words:
                record = Record({source.tokens_column: words, source.tags_column: tags}, wheres[0], path.parent)
                record.token_wheres = wheres
                records.append(record)
                words, tags, wheres = [], [], []
            continue
        where = f"{path}:{number}"
        column = source.conll_tag_column if source.conll_tag_column >= 0 else len(fields) + source.conll_tag_column
        if not 1 <= column < len(fields):
            raise FwsvdError(
                f"{where}: the line has {len(fields)} column(s) ({' '.join(fields)!r}), so no tag in column "
                f"{source.conll_tag_column} (data.*.conll_tag_column; the word is column 0)"
            )
        words.append(fields[0])
        tags.append(fields[column])
        wheres.append(where)
    return records


def _refuse_lone_surrogates(record: dict, where: str, origin: str) -> None:
    """JSON may spell half of a UTF-16 surrogate pair (``"\\ud800"``); Python keeps it as a string no encoder
    accepts, and the tokenizer would fail on it later with a bare TypeError. Refused here like any other
    text that is not UTF-8, with its line and column."""
    for column, value in record.items():
        try:
            json.dumps([column, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            escape = exc.object[exc.start : exc.end].encode("unicode_escape").decode("ascii")
            raise FwsvdError(
                f"{where}: not UTF-8 text (the escape '{escape}' in column {ascii(column)} is half of "
                f"a surrogate pair, with no other half); from '{origin}'"
            ) from None


def _hub_errors(datasets) -> tuple[type[BaseException], ...]:
    """What `datasets.load_dataset` raises for a user's mistake or an unreachable hub: OSError (network,
    auth, a missing dataset: `DatasetNotFoundError` is a FileNotFoundError), ValueError (an unknown config
    or split) and the package's own DatasetsError where it has one."""
    own = getattr(getattr(datasets, "exceptions", None), "DatasetsError", None)
    return (OSError, ValueError) + ((own,) if isinstance(own, type) else ())


def _read_hub(source: DataSource) -> list[Record]:
    try:
        import datasets  # optional: only hub users need it
    except ImportError:
        raise FwsvdError(f"dataset '{source.dataset}' needs the `datasets` package: pip install datasets") from None
    try:
        table = datasets.load_dataset(source.dataset, source.dataset_config, split=source.split)
    except _hub_errors(datasets) as exc:  # network, auth, unknown name or split; a bug keeps its traceback
        raise FwsvdError(f"could not load dataset '{source.dataset}' (split {source.split}): {exc}") from None
    # Row numbers are the dataset's own indices (table[17]), so the user can look a row up directly.
    return [Record(row, f"dataset {source.dataset}[{source.split}] row {index}") for index, row in enumerate(table)]


def load_records(recipe: Recipe, role: str, required: list[str], skip_empty: bool = False) -> list[Record]:
    """Records of `data.<role>` with every column in `required` present and non-empty (or, with
    `skip_empty`, records with an empty value dropped)."""
    source: DataSource = getattr(recipe.data, role)
    where = f"data.{role}"
    if source.path is not None:
        path = recipe.resolve(source.path)
        if not path.is_file():
            raise FwsvdError(f"{recipe.source}: '{where}.path' points to a missing file: {path}")
        fmt = _detect_format(path, source.format)
        if fmt == "conll":
            records = _read_conll(path, _decode(path, where), source)
        else:
            records = _read_file(path, fmt, source.text_column, where)
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
    for record in records:
        for column in required:
            if record.get(column) in (None, ""):
                raise FwsvdError(f"{record.where}: no value in column '{column}' (from '{where}')")
    if not records:
        raise FwsvdError(f"{label}: every record is empty in {', '.join(required)} (from '{where}')")
    if source.max_samples is not None and len(records) > source.max_samples:
        records = random.Random(recipe.data.seed).sample(records, source.max_samples)
    return records


def fingerprint(recipe: Recipe, role: str) -> str:
    """What identifies `data.<role>`'s records: the SHA-256 of its file's bytes, or for a hub dataset of its id,
    config and split (the rows are the hub's to change; a model card says which data made the model)."""
    source: DataSource = getattr(recipe.data, role)
    digest = hashlib.sha256()
    if source.path is None:
        digest.update(json.dumps([source.dataset, source.dataset_config, source.split]).encode())
        return digest.hexdigest()
    try:
        with recipe.resolve(source.path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise FwsvdError(f"{recipe.source}: cannot read 'data.{role}.path' ({exc.strerror or exc})") from None
    return digest.hexdigest()

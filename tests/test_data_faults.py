"""Data files as users write them: CSV/TSV quirks, byte-order marks, short or long rows, unknown labels and
too few text pairs each get an error naming the file and line, before any compute."""

import codecs
import json

import pytest

from fwsvd_export.config import DataSource
from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import load_recipe, parse_recipe
from fwsvd_export.pipeline import run
from fwsvd_export.stages.data import load_records
from fwsvd_export.stages.tasks import TASKS

from conftest import sentences, write_recipe

COLUMNS = ["sentence", "label"]


def records_of(tmp_path, recipe: dict, path, required=COLUMNS, **source) -> list:
    """Calibration records of `path` through the public loader, with the fixture recipe's other settings."""
    recipe["data"]["calibration"] = {"path": str(path), "text_column": "sentence", "label_column": "label", **source}
    return load_records(parse_recipe(recipe, "recipe.yaml", tmp_path), "calibration", required)


def load_error(tmp_path, recipe: dict, path, required=COLUMNS) -> str:
    with pytest.raises(FwsvdError) as info:
        records_of(tmp_path, recipe, path, required)
    return str(info.value)


def run_error(tmp_path, recipe: dict, *fragments) -> str:
    """The full run refuses the recipe with every fragment in its message and leaves no output."""
    with pytest.raises(FwsvdError) as info:
        run(load_recipe(write_recipe(tmp_path, recipe)), tmp_path / "out", progress=False)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    return message


# --- CSV and TSV -----------------------------------------------------------------------------------


def test_csv_columns_values_and_a_quoted_comma(tmp_path, classifier_recipe):
    path = tmp_path / "data.csv"
    path.write_text('sentence,label\n"hello, world",red\nplain words,2\n')
    records = records_of(tmp_path, classifier_recipe, path)
    assert records == [{"sentence": "hello, world", "label": "red"}, {"sentence": "plain words", "label": "2"}]
    assert [r.where for r in records] == [f"{path}:2", f"{path}:3"]


def test_tsv_splits_on_tabs_only(tmp_path, classifier_recipe):
    path = tmp_path / "data.tsv"
    path.write_text('sentence\tlabel\nhello, world\tgreen\n"a\ttab inside"\tblue\n')
    records = records_of(tmp_path, classifier_recipe, path)
    assert records == [{"sentence": "hello, world", "label": "green"}, {"sentence": "a\ttab inside", "label": "blue"}]


def test_a_bom_before_the_csv_header_is_not_part_of_the_first_column(tmp_path, classifier_recipe):
    path = tmp_path / "excel.csv"
    path.write_bytes(codecs.BOM_UTF8 + b"sentence,label\nhello there,red\n")
    records = records_of(tmp_path, classifier_recipe, path)
    assert records == [{"sentence": "hello there", "label": "red"}]


@pytest.mark.parametrize(
    "name, content",
    [
        ("data.jsonl", json.dumps({"sentence": "hello there", "label": "red"}) + "\n"),
        ("data.txt", "hello there\n"),
    ],
)
def test_a_bom_in_jsonl_and_text_files_is_dropped(tmp_path, classifier_recipe, name, content):
    path = tmp_path / name
    path.write_bytes(codecs.BOM_UTF8 + content.encode())
    records = records_of(tmp_path, classifier_recipe, path, required=["sentence"], text_column="sentence")
    assert records[0]["sentence"] == "hello there"
    assert records[0].where == f"{path}:1"


def test_a_row_with_more_fields_than_the_header_names_its_line(tmp_path, classifier_recipe):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nfine,red\nhello, world,green\n")
    message = load_error(tmp_path, classifier_recipe, path)
    assert f"{path}:3: the row has 3 fields, more than the header's 2" in message, message


def test_the_first_row_with_more_fields_is_refused_too(tmp_path, classifier_recipe):
    """It used to surface as `TypeError: '<' not supported between NoneType and str` from sorting the columns."""
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nhello, world,green\n")
    assert f"{path}:2: the row has 3 fields" in load_error(tmp_path, classifier_recipe, path, required=["category"])


def test_a_row_with_fewer_fields_names_its_line_and_the_missing_column(tmp_path, classifier_recipe):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nfine,red\nlonely sentence\n")
    message = load_error(tmp_path, classifier_recipe, path)
    assert f"{path}:3: the row has 1 fields but the header has 2; no value for column 'label'" in message, message


def test_csv_lines_count_the_lines_of_a_quoted_multi_line_value(tmp_path, classifier_recipe):
    path = tmp_path / "data.csv"
    path.write_text('sentence,label\n"two\nlines",red\nshort\n')
    assert f"{path}:4: " in load_error(tmp_path, classifier_recipe, path)


# --- where each record came from ---------------------------------------------------------------------


def test_records_keep_their_line_through_max_samples(tmp_path, classifier_recipe):
    path = tmp_path / "data.jsonl"
    texts = sentences(12, 5)
    lines = []
    for text in texts:
        lines += [json.dumps({"sentence": text, "label": "red"}), ""]  # blank lines: line != record index
    path.write_text("\n".join(lines))
    records = records_of(tmp_path, classifier_recipe, path, max_samples=5)
    assert len(records) == 5
    for record in records:
        assert record.where == f"{path}:{2 * texts.index(record['sentence']) + 1}"
    assert json.loads(json.dumps(records[0])) == records[0]  # still a plain dict for everything else


def test_text_lines_are_numbered_as_in_an_editor(tmp_path, classifier_recipe):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first line\r\n\r\nthird line\r\n")
    records = records_of(tmp_path, classifier_recipe, path, required=["sentence"], text_column="sentence")
    assert [(r["sentence"], r.where) for r in records] == [("first line", f"{path}:1"), ("third line", f"{path}:3")]


def test_a_missing_value_names_the_file_and_line(tmp_path, classifier_recipe):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"sentence": "fine", "label": "red"}) + "\n\n" + json.dumps({"sentence": "no label"}) + "\n"
    )
    message = load_error(tmp_path, classifier_recipe, path)
    assert f"{path}:3: no value in column 'label' (from 'data.calibration')" in message, message


def test_bytes_that_are_not_utf8_name_their_line(tmp_path, classifier_recipe):
    path = tmp_path / "data.csv"
    path.write_bytes(b"sentence,label\nfine,red\ncaf\xe9,blue\n")
    assert f"{path}:3: not UTF-8 text" in load_error(tmp_path, classifier_recipe, path)


def test_an_unknown_label_names_the_file_and_line(tmp_path, classifier_recipe):
    path = tmp_path / "labels.jsonl"
    rows = [
        {"sentence": "hello there", "label": "red"},
        {"sentence": "good morning", "label": "green"},
        {"sentence": "odd one", "label": "purple"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    classifier_recipe["data"]["calibration"]["path"] = str(path)
    run_error(tmp_path, classifier_recipe, f"{path}:4: label 'purple' in column 'label'", "red, green, blue")


def test_a_label_index_out_of_range_names_the_file_and_line(tmp_path, classifier_recipe):
    path = tmp_path / "labels.csv"
    path.write_text("sentence,label\nhello there,0\nodd one,5\n")
    classifier_recipe["data"]["evaluation"]["path"] = str(path)
    run_error(tmp_path, classifier_recipe, f"{path}:3: label 5 in column 'label' is outside the model's 3 classes")


# --- feature-extraction calibration needs in-batch negatives ------------------------------------------


def pairs(n: int) -> list[dict]:
    return [{"text": a, "text_pair": b} for a, b in zip(sentences(n, 8), sentences(n, 9))]


def test_feature_extraction_refuses_a_single_calibration_pair(tmp_path, classifier_recipe):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pairs(1)[0]) + "\n")
    source = {"path": str(path), "text_pair_column": "text_pair"}
    classifier_recipe["model"]["task"] = "feature-extraction"
    classifier_recipe["data"].update(calibration=source, evaluation=source)
    run_error(tmp_path, classifier_recipe, "feature-extraction calibration needs at least 2 text pairs", "got 1")


def emb_batch_sizes(tokenizer, n: int, batch_size: int, calibration: bool) -> list[int]:
    """Pairs per batch, after checking that every pair is in exactly one batch, in order."""
    records = pairs(n)
    batches = TASKS["feature-extraction"].make_batches(
        records, DataSource(text_pair_column="text_pair"), tokenizer, 32, batch_size, calibration, None
    )
    anchors = [
        text
        for b in batches
        for text in tokenizer.batch_decode(b.inputs["input_ids"][: b.samples], skip_special_tokens=True)
    ]
    assert anchors == [r["text"] for r in records]
    return [b.samples for b in batches]


def test_a_lone_last_calibration_pair_joins_the_previous_batch(tokenizer):
    assert emb_batch_sizes(tokenizer, 5, 2, calibration=True) == [2, 3]
    assert emb_batch_sizes(tokenizer, 4, 2, calibration=True) == [2, 2]
    assert emb_batch_sizes(tokenizer, 5, 2, calibration=False) == [2, 2, 1]  # evaluation has no loss: unchanged


def test_feature_extraction_refuses_calibration_batches_of_one_pair(tokenizer):
    with pytest.raises(FwsvdError, match=r"data.batch_size >= 2 \(in-batch negatives\); it is 1"):
        emb_batch_sizes(tokenizer, 4, 1, calibration=True)

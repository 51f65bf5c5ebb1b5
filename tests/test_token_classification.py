"""token-classification (NER, chunking, POS): the strict entity metrics against hand-worked cases, JSONL and
CoNLL reading, bad data named with its file and line, and recipes run end to end on a tiny BERT tagger whose
data is labelled with its own predictions (entity F1 1.0 dense, so the metric measures the factorization)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fwsvd_export
from fwsvd_export.cli import main
from fwsvd_export.config import DataSource
from fwsvd_export.errors import FwsvdError, SpecError
from fwsvd_export.loader import load_recipe, parse_recipe
from fwsvd_export.stages.data import load_records
from fwsvd_export.stages.tasks import TASKS
from fwsvd_export.stages.tasks.tokens import IGNORED, check_scheme, entity_scores, token_accuracy

from conftest import RECIPES, TAGS, bert_config, ner_recipe, write_recipe

TASK = TASKS["token-classification"]


# --- the metric, worked by hand ----------------------------------------------------------------------


def test_a_partly_overlapping_span_is_a_miss_for_both_sides():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]  # PER[0..1], LOC[3], ORG[5]: 3 spans
    predicted = [["B-PER", "O", "O", "B-LOC", "O", "O"]]  # PER[0] (overlaps PER[0..1], wrong bounds), LOC[3]: 2
    # Only LOC[3] matches: precision 1/2, recall 1/3, F1 = 2 * (1/2 * 1/3) / (1/2 + 1/3) = (1/3) / (5/6) = 2/5.
    assert entity_scores(gold, predicted) == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4})


def test_a_wrong_type_is_a_miss_and_strict_iob2_needs_the_b_tag():
    # Same bounds, other type: no match. Gold 2 spans, predicted 2, matched 1 (PER[0..1]): P = R = F1 = 1/2.
    assert entity_scores([["B-PER", "I-PER", "B-LOC"]], [["B-PER", "I-PER", "B-ORG"]]) == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    )
    # Strict IOB2 starts a span only at B-: "I-PER I-PER" spells none (a lenient reading, conlleval's or seqeval's
    # default mode, would count PER[0..1] and score 1.0). Predicted 0 spans: precision 0/0 -> 0, recall 0/1 = 0.
    assert entity_scores([["B-PER", "I-PER"]], [["I-PER", "I-PER"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_bioes_spans():
    gold = [["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "O", "B-ORG", "E-ORG"]]  # PER[0], LOC[2..4], ORG[6..7]
    predicted = [["S-PER", "O", "B-LOC", "E-LOC", "O", "O", "B-ORG", "E-ORG"]]  # PER[0], LOC[2..3], ORG[6..7]
    # LOC's end differs: matched PER and ORG, 2 of 3 either way: P = R = F1 = 2/3.
    assert entity_scores(gold, predicted, "BIOES") == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    # A B- never closed by E- is no span under strict BIOES: predicted PER[0] alone, matched 1 of gold's 3.
    # P = 1/1, R = 1/3, F1 = 2 * (1/3) / (4/3) = 1/2.
    unclosed = [["S-PER", "O", "B-LOC", "I-LOC", "I-LOC", "O", "B-ORG", "I-ORG"]]
    assert entity_scores(gold, unclosed, "BIOES") == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 0.5})


def test_iob1_spans():
    # IOB1 (CoNLL-2003's own files): I- opens a span, B- only splits two adjacent spans of one type.
    gold = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]  # PER[0..1], PER[2], LOC[4]: 3 spans
    predicted = [["I-PER", "I-PER", "I-PER", "O", "I-LOC"]]  # PER[0..2], LOC[4]: 2 spans
    # Matched LOC[4] only: P = 1/2, R = 1/3, F1 = 2/5.
    assert entity_scores(gold, predicted, "IOB1") == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4})


def test_plain_class_tags_count_each_tagged_word():
    # Scheme none (part of speech): each word not O is a one-word span. Gold NN[0], VB[1]; predicted NN[0],
    # NN[1]: matched NN[0], P = R = F1 = 1/2.
    assert entity_scores([["NN", "VB", "O"]], [["NN", "NN", "O"]], "none") == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    )


def test_token_accuracy_reads_only_labelled_positions():
    labels = torch.tensor([[IGNORED, 1, 2, IGNORED, 0], [IGNORED, 3, 3, IGNORED, IGNORED]])
    predicted = torch.tensor([[0, 1, 0, 4, 0], [1, 3, 1, 2, 2]])
    # Labelled: 1=1 yes, 2 vs 0 no, 0=0 yes, 3=3 yes, 3 vs 1 no: 3 of 5 (the 5 unlabelled disagree 4 times).
    assert token_accuracy(predicted, labels) == pytest.approx(0.6)


def test_labels_that_spell_no_spans_are_refused_for_the_scheme():
    check_scheme(TAGS, "IOB2")
    check_scheme(["O", "S-PER", "E-PER", "B-PER", "I-PER"], "BIOES")
    check_scheme(["NN", "VB"], "none")
    with pytest.raises(FwsvdError, match="label 'S-PER' is not a IOB2 tag"):
        check_scheme(["O", "S-PER"], "IOB2")
    with pytest.raises(FwsvdError, match="label 'NN' is not a BIOES tag"):
        check_scheme(["NN"], "BIOES")


# --- reading JSONL and CoNLL -------------------------------------------------------------------------

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC"""  # no blank line at the end: the last sentence still closes


def records(tmp_path, source: dict, role="calibration"):
    recipe = {
        "model": {"path": "unused", "task": "token-classification"},
        "data": {"calibration": source, "evaluation": source},
    }
    s = parse_recipe(recipe, "recipe.yaml", tmp_path).data.calibration
    return load_records(parse_recipe(recipe, "recipe.yaml", tmp_path), role, [s.tokens_column, s.tags_column])


def test_conll_sentences_skip_docstart_and_read_the_chosen_column(tmp_path):
    path = tmp_path / "eng.conll"
    path.write_text(CONLL)
    found = records(tmp_path, {"path": str(path)})  # .conll: the format is told by the extension
    assert [r["tokens"] for r in found] == [
        ["EU", "rejects", "German", "call", "."],
        ["Peter", "Blackburn"],
        ["BRUSSELS"],
    ]
    assert [r["tags"] for r in found] == [["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert [r.where for r in found] == [f"{path}:3", f"{path}:10", f"{path}:14"]
    assert found[1].token_wheres == [f"{path}:10", f"{path}:11"]
    pos = records(tmp_path, {"path": str(path), "conll_tag_column": 1, "tokens_column": "w", "tags_column": "t"})
    assert pos[0] == {"w": ["EU", "rejects", "German", "call", "."], "t": ["NNP", "VBZ", "JJ", "NN", "."]}
    chunk = records(tmp_path, {"path": str(path), "conll_tag_column": -2})
    assert chunk[1]["tags"] == ["B-NP", "I-NP"]


def test_conll_line_without_the_tag_column_is_named(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(FwsvdError, match=f"{path}:2: the line has 1 column"):
        records(tmp_path, {"path": str(path), "format": "conll"})
    with pytest.raises(FwsvdError, match=f"{path}:1: the line has 2 column.*column 3"):
        records(tmp_path, {"path": str(path), "format": "conll", "conll_tag_column": 3})
    with pytest.raises(SpecError, match="conll_tag_column"):
        DataSource(conll_tag_column=0)


def test_jsonl_columns_are_configurable_and_tags_land_on_first_sub_tokens(tmp_path, tokenizer):
    path = tmp_path / "ner.jsonl"
    rows = [{"words": ["Ada", "Lovelace", "visited", "Babbage"], "ner": ["B-PER", "I-PER", "O", 1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"path": str(path), "tokens_column": "words", "tags_column": "ner"}
    found = records(tmp_path, source)
    config = bert_config(tokenizer)
    config.num_labels, config.id2label, config.label2id = (
        len(TAGS),
        dict(enumerate(TAGS)),
        {t: i for i, t in enumerate(TAGS)},
    )
    (batch,) = TASK.make_batches(
        found, DataSource(**{k: v for k, v in source.items() if k != "path"}), tokenizer, 32, 8, False, config
    )
    pieces = tokenizer(rows[0]["words"], is_split_into_words=True)
    expected = []
    for position, word in enumerate(pieces.word_ids()):
        first = word is not None and (position == 0 or pieces.word_ids()[position - 1] != word)
        expected.append([1, 2, 0, 1][word] if first else IGNORED)
    assert len(pieces["input_ids"]) > 6  # [CLS] [SEP] and a word cut into several sub-tokens
    assert batch.labels.tolist() == [expected]
    assert batch.meta == {"tags": tuple(TAGS), "scheme": "IOB2"}
    # The dense model's own predictions score 1.0 on every metric.
    logits = torch.nn.functional.one_hot(batch.labels.clamp(min=0), len(TAGS)).float()
    scores = TASK.score([TASK.summary(logits, batch)], [batch], None)
    assert scores == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}


# --- the tiny tagger and recipes ---------------------------------------------------------------------


# Measured on the tagger: fwsvd at ratio 0.5 keeps F1 0.987 (3 of 227 spans lost), in torch and ONNX Runtime alike.
TAGGER_MAX_LOSS = 0.1


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("fault", ["unknown tag", "length mismatch"])
def test_bad_data_exits_2_naming_the_file_and_line(tmp_path, tagger, fault):
    recipe = ner_recipe(tagger)
    if fault == "unknown tag":
        path = tmp_path / "bad.conll"
        path.write_text("Ada B-PER\nLovelace I-PER\n\nParis B-LOC\nis O\nbig B-CITY\n")
        recipe["data"]["calibration"]["path"] = str(path)
        expected = f"{path}:6: tag 'B-CITY' of word 3 ('big') is not one of the model's labels"
    else:
        path = tmp_path / "bad.jsonl"
        path.write_text(
            json.dumps({"tokens": ["a", "b"], "tags": ["O", "O"]})
            + "\n"
            + json.dumps({"tokens": ["Ada", "Lovelace"], "tags": ["B-PER"]})
            + "\n"
        )
        recipe["data"]["evaluation"]["path"] = str(path)
        expected = f"{path}:2: 2 words in 'tokens' but 1 tags in 'tags'"
    result = invoke("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not (tmp_path / "out").exists()


def test_the_recipe_in_recipes_parses_and_reads_its_conll_sample():
    recipe = load_recipe(RECIPES / "token-classification.yaml")
    assert recipe.model.task == "token-classification" and recipe.validation.metric == "f1"
    found = load_records(recipe, "evaluation", ["tokens", "tags"])
    assert len(found) == 40
    assert found[0]["tokens"][:2] == ["Ada", "Lovelace"] and found[0]["tags"][:2] == ["B-PER", "I-PER"]
    for record in found:
        assert len(record["tokens"]) == len(record["tags"])
        check_scheme(sorted(set(record["tags"])), "IOB2")
    assert {t for r in found for t in r["tags"]} == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}


@pytest.mark.slow
def test_run_end_to_end_on_the_tiny_tagger(tmp_path, tagger, tokenizer):
    from optimum.onnxruntime import ORTModelForTokenClassification

    out = tmp_path / "out"
    result = invoke(
        "run", write_recipe(tmp_path, ner_recipe(tagger, max_metric_loss=TAGGER_MAX_LOSS)), "-o", out, "--quiet"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    validation = report["validation"]
    assert validation["metric"] == "f1"
    assert validation["scores"]["original_torch"] == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}
    cpu = validation["providers"]["cpu"]
    assert cpu["status"] == "passed" and cpu["parity"]["passed"] and cpu["parity"]["max_abs_error"] < 1e-4
    assert set(cpu["scores"]) == {"f1", "precision", "recall", "accuracy"}
    assert cpu["metric"] == pytest.approx(validation["compressed_torch"])
    assert report["graph"]["compressed"]["split_matmul_pairs_found"] == 12
    assert report["passed"]
    words = ["silver", "mountain", "letter", "Lovelace"]
    enc = tokenizer([words], is_split_into_words=True, return_tensors="pt")
    ort_model = ORTModelForTokenClassification.from_pretrained(out / "onnx/compressed")
    with torch.no_grad():
        torch_logits = fwsvd_export.load(out / "compressed")(**enc).logits.numpy()
    np.testing.assert_allclose(ort_model(**enc).logits.numpy(), torch_logits, atol=1e-4)


@pytest.mark.slow
def test_sweep_compress_and_export_on_the_tagger(tmp_path, tagger):
    path = write_recipe(tmp_path, ner_recipe(tagger, max_metric_loss=TAGGER_MAX_LOSS))
    result = invoke("sweep", path, "--ratios", "0.6,0.3", "-o", tmp_path / "sweep", "--quiet")
    assert result.exit_code == 0, result.output
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"]
    assert [p["ratio"] for p in points] == [0.6, 0.3]
    assert "f1 (cpu)" in (tmp_path / "sweep" / "sweep.md").read_text()
    result = invoke("compress", path, "-o", tmp_path / "ckpt", "--quiet")
    assert result.exit_code == 0, result.output
    assert (
        json.loads((tmp_path / "ckpt" / "fwsvd_manifest.json").read_text())["recipe"]["model"]["task"]
        == "token-classification"
    )
    result = invoke("export", tmp_path / "ckpt", "-o", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "model.onnx").is_file()

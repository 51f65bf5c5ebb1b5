"""Extractive question answering (SQuAD format): SQuAD's metric, span decoding, windows over a long context,
bad answers named with their line, and a tiny BertForQuestionAnswering end to end."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import BertForQuestionAnswering

from fwsvd_export.cli import main
from fwsvd_export.config import DataSource
from fwsvd_export.stages.tasks import TASKS, run_torch
from fwsvd_export.stages.tasks.qa import best_spans, exact_match, f1_score, normalize_answer, predictions, squad_scores

from conftest import qa_config, qa_recipe, qa_records, write_recipe

TASK = TASKS["question-answering"]


# SQuAD's normalisation, exact match and F1, worked by hand


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   Apple, a pear and THE plum. ", "apple pear and plum"),
        ("Another theory", "another theory"),  # an article inside a word stays
        ("U.S.A.", "usa"),  # punctuation goes, leaving the letters joined
        ("rock-and-roll's", "rockandrolls"),
        ("A", ""),
    ],
)
def test_squad_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_is_after_normalisation_and_the_best_gold_counts():
    assert exact_match("the Eiffel Tower", ["Eiffel Tower."]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("1911", ["in 1911", "1911"]) == 1.0


def test_f1_over_normalised_tokens():
    # pred [big, red, dog] against gold [red, dog, barked]: 2 common, precision 2/3, recall 2/3
    assert f1_score("the big red dog", ["a red dog barked"]) == pytest.approx(2 / 3)
    # [red] against [red, dog]: precision 1, recall 1/2, F1 = 2 * 1/2 / (3/2) = 2/3
    assert f1_score("red", ["red dog"]) == pytest.approx(2 / 3)
    # a repeated token counts as often as the gold holds it: [dog, dog] against [dog], precision 1/2, recall 1
    assert f1_score("dog dog", ["dog"]) == pytest.approx(2 / 3)
    assert f1_score("red dog", ["blue cat", "The red dog."]) == 1.0  # the best gold answer
    assert f1_score("the", ["cat"]) == 0.0  # nothing left of the prediction after normalisation
    assert f1_score("cat", ["dog"]) == 0.0
    scores = squad_scores(["Paris", "the big red dog"], [["paris"], ["a red dog barked"]])
    assert scores == {"exact_match": pytest.approx(0.5), "f1": pytest.approx((1 + 2 / 3) / 2)}


# Decoding the best valid span


def _spans_batch():
    """Two features of six tokens: [CLS], a question token, three context tokens, [SEP]."""
    context = "red big dog"
    offsets = torch.tensor([[[-1, -1], [-1, -1], [0, 3], [4, 7], [8, 11], [-1, -1]]] * 2)
    # feature 0: the best pair (start 4, end 2: 18) ends before it starts; the best valid one is (4, 4): 11
    # feature 1: (2, 4) scores 13, but is 3 tokens long; at most 2, the best is (3, 4): 8
    start = torch.tensor([[10.0, 9, 1, 0, 9, 10], [10.0, 9, 6, 1, 0, 10]])
    end = torch.tensor([[10.0, 9, 9, 0, 2, 10], [10.0, 9, 0, 1, 7, 10]])
    from fwsvd_export.core.batch import Batch

    meta = {"example": [0, 1], "offsets": offsets, "examples": {0: (context, ["dog"]), 1: (context, ["big dog"])}}
    ids = torch.ones(2, 6, dtype=torch.long)
    return torch.stack([start, end], -1), Batch({"input_ids": ids}, ids.bool(), None, meta=meta), meta


def test_best_span_is_within_the_context_ends_after_it_starts_and_is_at_most_max_answer_length():
    logits, batch, meta = _spans_batch()
    found = best_spans(logits, meta["offsets"], 3)
    assert found.tolist() == [[11, 4, 4], [13, 2, 4]]
    assert best_spans(logits, meta["offsets"], 2).tolist() == [[11, 4, 4], [8, 3, 4]]
    batch.meta["max_answer_length"] = 2
    spans = [TASK.summary(logits, batch)]
    assert predictions(spans, [batch]) == {0: "dog", 1: "big dog"}  # cut from the context's characters
    assert TASK.score(spans, [batch], None) == {"exact_match": 1.0, "f1": 1.0}
    batch.meta["max_answer_length"] = 3
    assert predictions([TASK.summary(logits, batch)], [batch])[1] == "red big dog"


# Windows over a long context


def test_a_long_context_is_cut_into_overlapping_windows_and_the_answer_is_found_in_the_second(tokenizer):
    context = (
        "The old harbour town sits between two rivers and a range of low green hills. " * 2
        + "Its lighthouse was built by Margaret Ellison in the spring of 1862."
    )
    answer = "Margaret Ellison"
    record = {
        "question": "Who built the lighthouse?",
        "context": context,
        "answers": {"text": [answer], "answer_start": [context.index(answer)]},
    }
    (batch,) = TASK.make_batches([record], DataSource(doc_stride=8), tokenizer, 32, 8, False, None)
    rows = batch.inputs["input_ids"].shape[0]
    assert rows >= 2 and batch.meta["example"] == [0] * rows
    offsets, labels = batch.meta["offsets"], batch.labels.tolist()
    # consecutive windows share doc_stride (8) context tokens
    first = [tuple(o) for o in offsets[0].tolist() if o[0] >= 0]
    second = [tuple(o) for o in offsets[1].tolist() if o[0] >= 0]
    assert first[-8:] == second[:8]
    assert labels[0] == [0, 0]  # not in the first window: the [CLS] label
    found = [k for k, (s, e) in enumerate(labels) if s > 0]
    assert found and found[0] == 1
    s, e = labels[1]
    assert tokenizer.decode(batch.inputs["input_ids"][1, s : e + 1]) == answer.lower()
    # logits that point there decode to the answer, with the context's own casing
    logits = torch.zeros(rows, batch.inputs["input_ids"].shape[1], 2)
    logits[1, s, 0] = logits[1, e, 1] = 5.0
    spans = [TASK.summary(logits, batch)]
    assert predictions(spans, [batch]) == {0: answer}
    assert TASK.score(spans, [batch], None) == {"exact_match": 1.0, "f1": 1.0}


def test_loss_and_distillation_read_both_logits(tokenizer):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(qa_config(tokenizer)).eval()
    context = "Completed in 1889, the tower was designed by Gustave Eiffel's company."
    records = [
        {
            "question": "Who designed it?",
            "context": context,
            "answers": {"text": ["Gustave Eiffel"], "answer_start": [context.index("Gustave Eiffel")]},
        }
    ]
    (batch,) = TASK.make_batches(records, DataSource(), tokenizer, 64, 4, True, model.config)
    start, end = batch.labels[0].tolist()
    assert tokenizer.decode(batch.inputs["input_ids"][0, start : end + 1]) == "gustave eiffel"
    with torch.no_grad():
        output = run_torch(model, TASK, batch)
        reference = model(**batch.inputs, start_positions=batch.labels[:, 0], end_positions=batch.labels[:, 1])
        assert TASK.loss(model, batch) == pytest.approx(float(reference.loss), rel=1e-5)  # one feature: sum = mean
    assert torch.equal(output[..., 0], reference.start_logits) and torch.equal(output[..., 1], reference.end_logits)
    assert float(TASK.distill(output, output, batch, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(TASK.distill(output, output.flip(1), batch, 2.0)) > 0


# A tiny model, its data and its recipe


def test_an_answer_start_that_misses_its_text_is_exit_2_naming_file_and_line(tmp_path, qa_dir):
    records = qa_records(3, 1)
    records[2]["answers"]["answer_start"] = [3]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = write_recipe(tmp_path, qa_recipe(qa_dir, data))
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"{data}:3: answer_start 3 of answer 0" in result.output and "does not point at its text" in result.output
    assert not (tmp_path / "out").exists()


def test_answers_that_are_not_squad_format_are_named(tmp_path, qa_dir):
    records = qa_records(2, 1)
    records[1]["answers"] = ["a list"]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(
        main, ["run", str(write_recipe(tmp_path, qa_recipe(qa_dir, data))), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and f"{data}:2: column 'answers' must hold" in result.output, result.output


def test_doc_stride_must_leave_the_window_room(tmp_path, qa_dir, qa_data):
    recipe = qa_recipe(qa_dir, qa_data)
    recipe["data"]["evaluation"]["doc_stride"] = 48
    result = CliRunner().invoke(main, ["check", str(write_recipe(tmp_path, recipe))])
    assert result.exit_code == 2 and "data.evaluation.doc_stride" in result.output, result.output


@pytest.mark.slow
def test_question_answering_end_to_end(tmp_path, qa_dir, qa_data):
    recipe = write_recipe(tmp_path, qa_recipe(qa_dir, qa_data))
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    validation = report["validation"]
    assert validation["scores"]["original_torch"] == {"exact_match": 1.0, "f1": 1.0}
    assert set(validation["scores"]["compressed_torch"]) == {"exact_match", "f1"}
    assert validation["metric"] == "exact_match"
    cpu = validation["providers"]["cpu"]
    assert cpu["status"] == "passed" and cpu["parity"]["max_abs_error"] < 1e-3
    assert cpu["scores"] == pytest.approx(validation["scores"]["compressed_torch"])
    assert report["graph"]["compressed"]["split_matmul_pairs_found"] == 12
    # The exported graph loads with optimum's class for the task and gives both logits.
    from optimum.onnxruntime import ORTModelForQuestionAnswering
    from transformers import AutoTokenizer

    folder = out / "onnx" / "compressed"
    model, tok = ORTModelForQuestionAnswering.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    answer = model(**tok("Which river?", "A quiet river at morning.", return_tensors="pt"))
    assert answer.start_logits.shape == answer.end_logits.shape and answer.start_logits.shape[0] == 1
    print(json.dumps(validation["scores"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "compression, finetune",
    [
        ({"method": "fwsvd", "budget": 0.6}, {"epochs": 1, "objective": "distill"}),
        ({"method": "svd", "ratio": 0.7}, {"epochs": 1, "objective": "task", "learning_rate": 1e-4}),
    ],
)
def test_question_answering_with_allocation_recovery_and_int8(tmp_path, qa_dir, qa_data, compression, finetune):
    recipe = qa_recipe(qa_dir, qa_data, max_metric_loss=1.0, max_quantization_loss=1.0)
    recipe.update(compression=compression, finetune=finetune, export={"precisions": ["fp32", "int8"]})
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, recipe)), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    validation = json.loads((tmp_path / "out" / "report.json").read_text())["validation"]
    assert validation["providers"]["cpu"]["parity"]["passed"]
    int8 = validation["variants"]["compressed-int8"]["cpu"]
    assert int8["status"] == "measured" and set(int8["scores"]) == {"exact_match", "f1"}
    assert 0.0 <= validation["compressed_torch"] <= 1.0


@pytest.mark.slow
def test_question_answering_sweep(tmp_path, qa_dir, qa_data):
    path = write_recipe(tmp_path, qa_recipe(qa_dir, qa_data, max_metric_loss=1.0))
    result = CliRunner().invoke(
        main, ["sweep", str(path), "--ratios", "0.8,0.4", "--methods", "kfac", "-o", str(tmp_path / "sweep"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"]
    assert [p["ratio"] for p in points] == [0.8, 0.4]
    assert "exact_match (cpu)" in (tmp_path / "sweep" / "sweep.md").read_text()

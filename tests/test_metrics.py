"""Text classification's metrics against hand-worked examples, the head read from the config, the
headline rule (the first metric the model has, a chosen one refused where it does not apply), and tiny
regression and multi-label BERTs through `fwsvd-export run`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import BertConfig, BertForSequenceClassification

from fwsvd_export.cli import main
from fwsvd_export.core.batch import Batch
from fwsvd_export.errors import FwsvdError, SpecError
from fwsvd_export.stages.tasks import get_task
from fwsvd_export.stages.tasks.classification import (
    METRICS,
    MULTI,
    REGRESSION,
    SINGLE,
    head,
    labels,
    multi_label_scores,
    regression_scores,
    score,
    single_label_scores,
)

from conftest import bert_config, low_rank_encoder_, quick_validation, sentences, write_recipe

TASK = get_task("text-classification")


def test_mcc_of_a_constant_prediction_is_zero_and_its_binary_f1_hand_worked():
    # gold 0 1 0 1, always 1: tp 2, fp 2, fn 0 -> precision 1/2, recall 1, F1 2/3; MCC's denominator has
    # no predicted negatives: sklearn (and GLUE's CoLA score) give 0.
    s = single_label_scores([1, 1, 1, 1], [0, 1, 0, 1], classes=2)
    assert s == pytest.approx({"accuracy": 0.5, "f1": 2 / 3, "macro_f1": (2 / 3 + 0) / 2, "mcc": 0.0})


def test_one_class_in_gold_and_predictions_alike_gives_mcc_zero_without_a_warning(recwarn):
    # gold 1 1 1, predicted 1 1 1: all right, but MCC has no negatives at all: 0, as scikit-learn defines it.
    s = single_label_scores(np.array([1, 1, 1]), np.array([1, 1, 1]), classes=2)
    assert s["accuracy"] == 1.0 and s["mcc"] == 0.0 and len(recwarn) == 0


def test_binary_f1_macro_f1_and_mcc_hand_worked():
    # gold 1 1 0 0 0, predicted 1 0 0 0 1. Class 1: tp 1, fp 1, fn 1 -> F1 1/2. Class 0: tp 2, fp 1, fn 1
    # -> F1 2/3; macro F1 = (1/2 + 2/3) / 2 = 7/12. MCC = (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    # = (1*2 - 1*1) / sqrt(2*2*3*3) = 1/6.
    s = single_label_scores([1, 0, 0, 0, 1], [1, 1, 0, 0, 0], classes=2)
    assert s == pytest.approx({"accuracy": 3 / 5, "f1": 1 / 2, "macro_f1": 7 / 12, "mcc": 1 / 6})


def test_three_classes_have_no_binary_f1():
    s = single_label_scores([0, 1, 2, 2], [0, 1, 2, 1], classes=3)
    assert set(s) == {"accuracy", "macro_f1", "mcc"} and s["accuracy"] == 0.75


def test_spearman_with_ties_and_pearson_hand_worked():
    # predicted 10 20 20 40 ranks as 1 2.5 2.5 4 (ties share their mean rank); gold 1 2 3 4 as 1 2 3 4.
    # Spearman = Pearson of the ranks: deviations (-1.5 0 0 1.5) and (-1.5 -0.5 0.5 1.5): 4.5 / sqrt(4.5 * 5)
    # = sqrt(0.9). Pearson of the values: deviations (-12.5 -2.5 -2.5 17.5): 45 / sqrt(475 * 5).
    s = regression_scores([10.0, 20.0, 20.0, 40.0], [1.0, 2.0, 3.0, 4.0])
    assert s == pytest.approx({"pearson": 45 / math.sqrt(475 * 5), "spearman": math.sqrt(0.9)})


def test_a_constant_regression_has_no_correlation():
    assert regression_scores([0.5, 0.5, 0.5], [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_micro_and_macro_f1_hand_worked():
    # label 0: tp 3 -> F1 1; label 1: tp 0, fn 1 -> F1 0; macro 1/2. Micro pools them: tp 3, fp 0, fn 1 ->
    # precision 1, recall 3/4, F1 6/7.
    s = multi_label_scores([[1, 0], [1, 0], [1, 0]], [[1, 0], [1, 0], [1, 1]])
    assert s == pytest.approx({"micro_f1": 6 / 7, "macro_f1": 1 / 2})


def _batch(labels: torch.Tensor) -> Batch:
    ids = torch.ones(len(labels), 3, dtype=torch.long)
    return Batch({"input_ids": ids}, ids.bool(), labels)


def test_score_reports_the_metrics_of_the_head_the_labels_show():
    logits = torch.tensor([[2.0, -1.0], [-1.0, 2.0], [0.5, 0.0]])
    assert set(score([logits], [_batch(torch.tensor([0, 1, 1]))])) == {"accuracy", "f1", "macro_f1", "mcc"}
    regression = score([torch.tensor([[0.1], [0.3], [0.2]])], [_batch(torch.tensor([1.0, 3.0, 2.0]))])
    assert regression == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    multi = score([logits], [_batch(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))])  # on: logit > 0
    assert multi == pytest.approx({"micro_f1": 6 / 7, "macro_f1": (1 + 2 / 3) / 2})


def test_the_head_and_its_labels_follow_the_config():
    single = BertConfig(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    regression = BertConfig(num_labels=1)
    multi = BertConfig(
        num_labels=3, label2id=single.label2id, id2label=single.id2label, problem_type="multi_label_classification"
    )
    assert (head(single), head(regression), head(multi)) == (SINGLE, REGRESSION, MULTI)
    assert labels([{"y": "b"}, {"y": 2}], "y", single).tolist() == [1, 2]
    assert labels([{"y": "0.25"}, {"y": 4}], "y", regression).tolist() == [0.25, 4.0]
    assert labels([{"y": ["a", 2]}, {"y": "b"}, {"y": []}], "y", multi).tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(FwsvdError, match="not a number"):
        labels([{"y": "high"}], "y", regression)
    with pytest.raises(FwsvdError, match="not one of the model's labels"):
        labels([{"y": ["a", "z"]}], "y", multi)


def test_losses_match_the_heads():
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=1,
        )
    ).eval()
    batch = Batch(
        {"input_ids": torch.randint(0, 50, (4, 5))},
        torch.ones(4, 5, dtype=torch.bool),
        torch.tensor([0.0, 1.0, 2.0, 3.0]),
    )
    with torch.no_grad():
        out = model(**batch.inputs).logits.squeeze(-1)
        loss = TASK.loss(model, batch)
    assert float(loss) == pytest.approx(float(((out - batch.labels) ** 2).sum()), rel=1e-5)
    assert float(TASK.distill(out[:, None], out[:, None], batch, 2.0)) == 0.0


def test_headline_takes_the_first_metric_the_model_has_and_refuses_one_it_has_not():
    regression = {"pearson": 0.9, "spearman": 0.8}
    assert TASK.headline() == "accuracy"
    assert TASK.headline(None, regression) == "pearson"
    assert TASK.headline("spearman", regression) == "spearman"
    with pytest.raises(FwsvdError, match="'mcc' does not apply to this model.*pearson, spearman"):
        TASK.headline("mcc", regression)
    with pytest.raises(SpecError):
        TASK.headline("bleu")


@pytest.mark.parametrize("kind", [SINGLE, REGRESSION, MULTI])
def test_each_heads_default_is_its_first_metric(kind):
    assert TASK.headline(None, dict.fromkeys(reversed(METRICS[kind]), 0.5)) == METRICS[kind][0]


# --- end to end: tiny regression and multi-label BERTs, labelled with their own outputs ----------------


def _tiny(tokenizer, folder, **head) -> BertForSequenceClassification:
    """A tiny BERT whose encoder weights are rank 4 plus noise (as conftest's classifier), so that its
    outputs hang on the factorized layers and a 0.5-ratio factorization keeps them close."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(tokenizer, **head)).eval()
    low_rank_encoder_(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def _run(tmp_path, model_dir, rows, **validation) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"path": str(data), "text_column": "sentence", "label_column": "label"}
    recipe = {
        "model": {"path": str(model_dir), "task": "text-classification"},
        "data": {"calibration": source, "evaluation": source, "max_length": 32, "batch_size": 8},
        "compression": {"method": "fwsvd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(**validation),
    }
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, recipe)), "--output", str(out), "--quiet"])
    code = result.exit_code
    report = json.loads((out / "report.json").read_text())
    assert code == 0, [c for c in report["validation"]["checks"] if not c["passed"]]
    return report


def _cli(args):
    return CliRunner().invoke(main, args)


def _outputs(model, tokenizer, texts) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


@pytest.mark.slow
def test_a_regression_head_runs_end_to_end_with_pearson_and_spearman(tmp_path, tokenizer):
    model = _tiny(tokenizer, tmp_path / "model", num_labels=1)
    texts = sentences(40, 5)
    scores = _outputs(model, tokenizer, texts)[:, 0].tolist()  # the labels: its own outputs, so both are 1 dense
    report = _run(
        tmp_path,
        tmp_path / "model",
        [{"sentence": t, "label": s} for t, s in zip(texts, scores)],
        max_metric_loss=0.2,
        metric="spearman",
    )
    val = report["validation"]
    assert report["model"]["head"] == "regression" and val["metric"] == "spearman"
    assert val["scores"]["original_torch"] == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    assert set(val["scores"]["compressed_torch"]) == set(val["providers"]["cpu"]["scores"]) == {"pearson", "spearman"}
    assert val["compressed_torch"] == val["scores"]["compressed_torch"]["spearman"]


@pytest.mark.slow
def test_a_multi_label_head_runs_end_to_end_with_micro_and_macro_f1(tmp_path, tokenizer):
    names = {0: "news", 1: "sport", 2: "music"}
    model = _tiny(
        tokenizer,
        tmp_path / "model",
        num_labels=3,
        problem_type="multi_label_classification",
        id2label=names,
        label2id={v: k for k, v in names.items()},
    )
    texts = sentences(40, 6)
    logits = _outputs(model, tokenizer, texts)
    on = logits > logits.median(0).values  # about half of each label on: a meaningful F1
    rows = [{"sentence": t, "label": [names[j] for j in range(3) if row[j]]} for t, row in zip(texts, on.tolist())]
    model.classifier.bias.data -= logits.median(0).values  # its own decisions are the labels: F1 1.0 dense
    model.save_pretrained(tmp_path / "model")
    report = _run(tmp_path, tmp_path / "model", rows, max_metric_loss=0.3)
    val = report["validation"]
    assert report["model"]["head"] == MULTI and val["metric"] == "micro_f1"
    assert val["scores"]["original_torch"] == pytest.approx({"micro_f1": 1.0, "macro_f1": 1.0})
    assert set(val["providers"]["cpu"]["scores"]) == {"micro_f1", "macro_f1"}


@pytest.mark.slow
def test_validation_metric_mcc_is_what_the_checks_read(tmp_path, classifier_recipe):
    classifier_recipe["validation"]["metric"] = "mcc"
    out = tmp_path / "out"
    assert _cli(["run", str(write_recipe(tmp_path, classifier_recipe)), "--output", str(out), "--quiet"]).exit_code == 0
    val = json.loads((out / "report.json").read_text())["validation"]
    assert val["metric"] == "mcc" and val["original_torch"] == val["scores"]["original_torch"]["mcc"] == 1.0
    assert set(val["scores"]["original_torch"]) == {"accuracy", "macro_f1", "mcc"}  # 3 classes: no binary F1
    assert any(c["name"] == "metric loss (compressed torch)" and c["detail"].startswith("mcc ") for c in val["checks"])


@pytest.mark.slow
def test_a_metric_the_head_has_not_is_refused_before_compressing(tmp_path, classifier_recipe):
    classifier_recipe["validation"]["metric"] = "pearson"
    out = tmp_path / "out"
    result = _cli(["run", str(write_recipe(tmp_path, classifier_recipe)), "--output", str(out), "--quiet"])
    assert result.exit_code != 0 and "'pearson' does not apply" in result.output, result.output
    assert not (out / "compressed").exists()

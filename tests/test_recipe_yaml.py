"""How recipe YAML is read: a key given twice is an error (plain PyYAML keeps the last one silently), at any
depth, in the file and in a --set value, named with its dotted path and line; loading stays safe."""

import textwrap

import pytest
import yaml

from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import DuplicateKeyError, RecipeLoader, apply_override, load_recipe

from conftest import write_recipe
from test_recipe import MINIMAL

BASE = """\
model:
  path: model
  task: text-classification
data:
  calibration:
    path: train.jsonl
    label_column: label
  evaluation:
    path: test.csv
    label_column: label
"""


def refused(tmp_path, text, overrides=()) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(FwsvdError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_the_base_recipe_loads(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)
    assert load_recipe(path).data.calibration.path == "train.jsonl"


def test_a_top_level_key_given_twice_names_the_key_the_line_and_the_file(tmp_path):
    message = refused(tmp_path, BASE + "model:\n  path: other\n  task: text-classification\n")
    assert "key 'model' appears twice" in message
    assert "line 11" in message and "first on line 1" in message
    assert str(tmp_path / "recipe.yaml") in message


def test_a_nested_key_given_twice_is_named_by_its_dotted_path(tmp_path):
    text = BASE.replace("    path: test.csv\n", "    path: test.csv\n    path: other.csv\n")
    message = refused(tmp_path, text)
    assert "key 'data.evaluation.path' appears twice" in message
    assert "line 10" in message and "first on line 9" in message


def test_a_key_given_twice_inside_a_list_item(tmp_path):
    text = BASE + "validation:\n  providers:\n    - name: cpu\n    - name: cuda\n      name: cpu\n"
    message = refused(tmp_path, text)
    assert "key 'validation.providers[1].name' appears twice" in message and "line 15" in message


def test_a_key_given_twice_in_a_flow_mapping(tmp_path):
    message = refused(tmp_path, BASE + "compression: {method: kfac, ratio: 0.5, ratio: 0.3}\n")
    assert "key 'compression.ratio' appears twice" in message and "line 11" in message


def test_keys_that_load_as_the_same_value_collide(tmp_path):
    """1, 1.0 and true are one dict key in Python; YAML would keep only the last."""
    text = BASE + "compression:\n  overrides:\n    1: {rank: 2}\n    1.0: {rank: 3}\n"
    assert "key 'compression.overrides.1.0' appears twice" in refused(tmp_path, text)
    text = BASE.replace("  path: model\n", "  path: model\n  device_map: auto\n  max_memory: {'0': 1GiB, 0: 2GiB}\n", 1)
    assert "'model.max_memory' has the key '0' twice" in refused(tmp_path, text)


def test_a_duplicate_written_with_an_alias_is_found_at_the_alias(tmp_path):
    text = BASE + "finetune:\n  &k epochs: 1\n  learning_rate: 0.001\n  *k : 2\n"
    message = refused(tmp_path, text)
    assert "key 'finetune.epochs' appears twice" in message and "line 14" in message and "first on line 12" in message


def test_a_merge_may_still_be_overridden(tmp_path):
    text = BASE.replace(
        "  evaluation:\n    path: test.csv\n    label_column: label\n",
        "  evaluation:\n    <<: *cal\n    path: test.csv\n",
    ).replace("  calibration:\n", "  calibration: &cal\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.data.evaluation.path == "test.csv" and recipe.data.evaluation.label_column == "label"


def test_a_set_value_with_a_key_given_twice(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    with pytest.raises(FwsvdError) as info:
        load_recipe(path, ["compression.overrides={q: {rank: 2}, q: {rank: 3}}"])
    message = str(info.value)
    assert message.startswith("--set:") and "key 'compression.overrides.q' appears twice" in message
    assert "line 1" in message
    with pytest.raises(FwsvdError, match=r"key 'compression\.overrides\.q\.rank' appears twice .*line 2"):
        load_recipe(path, ["compression.overrides={q: {rank: 2,\n rank: 3}}"])


def test_apply_override_uses_the_same_loader():
    data = {}
    apply_override(data, "compression.target=[a, b]")
    assert data == {"compression": {"target": ["a", "b"]}}
    with pytest.raises(FwsvdError, match="key 'model.x' appears twice"):
        apply_override({}, "model={x: 1, x: 2}")


def test_the_loader_alone_raises_a_yaml_error_with_a_mark():
    with pytest.raises(DuplicateKeyError) as info:
        yaml.load("a:\n  b: 1\n  b: 2\n", Loader=RecipeLoader)
    assert isinstance(info.value, yaml.YAMLError)
    assert (info.value.path, info.value.line, info.value.first_line) == ("a.b", 3, 2)
    assert info.value.problem_mark.line == 2
    assert yaml.load("a: {b: 1, c: [1, {b: 2}]}", Loader=RecipeLoader) == {"a": {"b": 1, "c": [1, {"b": 2}]}}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model: !!python/object/apply:os.system [echo pwned]\n", "could not determine a constructor"),
        ("model: !!python/name:os.system\n", "could not determine a constructor"),
        ("model: !!int abc\n", "cannot read 'abc' as tag:yaml.org,2002:int"),
        ("model: !!bool maybe\n", "cannot read 'maybe' as tag:yaml.org,2002:bool"),
        ("model: !!int\n", "cannot read"),
        ("model: 2021-13-45\n", "month must be in 1..12"),
        ("model: !!timestamp x\n", "cannot read 'x' as tag:yaml.org,2002:timestamp"),
        ("model: 1" + "0" * 5000 + "\n", "cannot read"),
        ("[" * 800, "nested too deeply"),
    ],
)
def test_yaml_that_cannot_be_read_is_named_not_a_crash(tmp_path, text, fragment):
    message = refused(tmp_path, text)
    assert "not valid YAML" in message and fragment in message and str(tmp_path / "recipe.yaml") in message
    if "line" in message:
        assert "line 1" in message


def test_set_values_that_cannot_be_read_are_named(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    for value in ("!!int abc", "!!bool maybe", "2021-13-45", "[" * 800, "!!python/name:os.system"):
        with pytest.raises(FwsvdError, match=r"^--set: the value of 'data.seed' is not valid YAML"):
            load_recipe(path, [f"data.seed={value}"])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "missing required key 'model'"),
        ("# only a comment\n", "missing required key 'model'"),
        ("- model\n- data\n", "must be a YAML mapping"),
        ("0\n", "must be a YAML mapping"),
        ("''\n", "must be a YAML mapping"),
    ],
)
def test_empty_and_non_mapping_files(tmp_path, text, fragment):
    assert fragment in refused(tmp_path, text)


def test_huge_numbers_are_named(tmp_path):
    message = refused(tmp_path, BASE + "finetune:\n  learning_rate: 0x" + "f" * 400 + "\n")
    assert "'finetune.learning_rate' must be a finite number" in message and "-bit integer>" in message
    message = refused(tmp_path, BASE.replace("data:\n", "data:\n  seed: 0x" + "f" * 2000 + "\n"))
    assert "'data.seed' is out of range" in message and len(message) < 500


def test_a_regular_expression_python_cannot_compile_is_named(tmp_path):
    message = refused(tmp_path, BASE + "compression:\n  target: ['a{99999999999}']\n")
    assert "'compression.target[0]' is not a valid regular expression" in message
    message = refused(tmp_path, BASE + "compression:\n  exclude: ['" + "(" * 3000 + ")" * 3000 + "']\n")
    assert "'compression.exclude[0]' is not a valid regular expression: nested too deeply" in message


def test_unreadable_bytes_are_named(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(BASE.encode() + b"\xff\xfe")
    with pytest.raises(FwsvdError, match="not UTF-8 text"):
        load_recipe(path)

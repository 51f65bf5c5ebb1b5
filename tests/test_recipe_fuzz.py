"""Whatever a recipe file or a --set holds, loading it either gives a checked Recipe or a FwsvdError that
names the file: never another exception (which the CLI would report as a crash, exit code 3)."""
import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwsvd_export.errors import FwsvdError
from fwsvd_export.recipe import Recipe, load_recipe

VALID = {
    "model": {"path": "model", "task": "text-classification"},
    "data": {"calibration": {"path": "c.jsonl", "label_column": "label"},
             "evaluation": {"path": "e.jsonl", "label_column": "label"}, "max_length": 32, "batch_size": 8},
    "compression": {"method": "kfac", "ratio": 0.5, "target": ["encoder"], "overrides": {"q": {"rank": 4}}},
    "finetune": {"epochs": 1},
    "export": {"precisions": ["fp32", "int8"]},
    "validation": {"providers": [{"name": "cpu", "required": True}], "latency": {"shapes": ["1x16"]}},
}
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["(", "[unclosed", "1x0", "fp16", "kfac", "cuda", "-1", ".nan"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
FUZZ = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _paths(node, prefix=()):
    """Every key path of a nested mapping."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


PATHS = list(_paths(VALID))


def _loads_or_refuses(path, overrides=()) -> None:
    try:
        assert isinstance(load_recipe(path, overrides), Recipe)
    except FwsvdError as exc:
        assert str(exc).strip()


@FUZZ
@given(where=st.sampled_from(PATHS), value=VALUES, action=st.sampled_from(["replace", "delete", "add"]))
def test_a_mutated_recipe_loads_or_is_refused_clearly(tmp_path_factory, where, value, action):
    data = copy.deepcopy(VALID)
    node = data
    for key in where[:-1]:
        node = node[key]
    if action == "delete":
        del node[where[-1]]
    elif action == "add" and isinstance(node[where[-1]], dict):
        node[where[-1]]["unexpected"] = value
    else:
        node[where[-1]] = value
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    _loads_or_refuses(path)


@FUZZ
@given(key=st.one_of(st.sampled_from([".".join(p) for p in PATHS]), st.text(max_size=15)), value=st.text(max_size=20))
def test_any_set_override_loads_or_is_refused_clearly(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(VALID))
    _loads_or_refuses(path, [f"{key}={value}"])


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_file_content_loads_or_is_refused_clearly(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_bytes(yaml.safe_dump(VALID).encode()[:50] + raw)
    _loads_or_refuses(path)


def test_the_fuzzed_recipe_is_valid_to_begin_with(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_recipe(path).export.precisions == ["fp32", "int8"]


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(VALID, sort_keys=False).replace("  ratio: 0.5\n", "  ratio: 0.5\n  ratio: 0.3\n"))
    try:
        load_recipe(path)
    except FwsvdError as exc:
        assert "key 'ratio' appears twice" in str(exc) and "line" in str(exc) and str(path) in str(exc)
    else:
        raise AssertionError("a duplicated key was accepted")
    path.write_text(yaml.safe_dump(VALID))
    try:
        load_recipe(path, ["compression.overrides={q: {rank: 2}, q: {rank: 3}}"])
    except FwsvdError as exc:
        assert "key 'q' appears twice" in str(exc)
    else:
        raise AssertionError("a duplicated key in --set was accepted")

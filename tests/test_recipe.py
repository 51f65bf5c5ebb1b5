"""Recipe parsing: defaults, relative paths, overrides from the command line."""

import pytest

from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import load_recipe

from conftest import write_recipe

MINIMAL = {
    "model": {"path": "model", "task": "text-classification"},
    "data": {
        "calibration": {"path": "train.jsonl", "label_column": "label"},
        "evaluation": {"path": "test.csv", "label_column": "label"},
    },
}


def test_minimal_recipe_gets_sensible_defaults(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL))
    assert recipe.compression.method == "kfac" and recipe.compression.ratio == 0.5
    assert [p.name for p in recipe.validation.providers] == ["cpu", "cuda"]
    assert recipe.validation.providers[0].required and not recipe.validation.providers[1].required
    assert recipe.validation.latency.one_at_a_time == "auto"  # graphs timed side by side while they fit


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = load_recipe(write_recipe(sub, MINIMAL))
    assert recipe.resolve(recipe.data.calibration.path) == sub.resolve() / "train.jsonl"
    assert recipe.resolve("/abs/file.txt").as_posix() == "/abs/file.txt"


def test_set_overrides_single_keys(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["compression.ratio=0.4", "compression.method=kfac", "validation.latency.runs=7"])
    assert recipe.compression.ratio == 0.4 and recipe.compression.method == "kfac"
    assert recipe.validation.latency.runs == 7


def test_a_rank_override_replaces_the_ratio(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL), ["compression.rank=16"])
    assert recipe.compression.rank == 16 and recipe.compression.ratio is None


@pytest.mark.parametrize(
    "assignment, fragment",
    [
        ("compression.ratio=1.5", "compression.ratio' must be in (0, 1]"),
        ("compression.bogus=1", "unknown key 'compression.bogus'"),
        ("validation.latency.shapes=[big]", "BATCHxSEQUENCE"),
        ("model.hub_id=org/name", "exactly one of path, hub_id, package"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_are_named(tmp_path, assignment, fragment):
    with pytest.raises(FwsvdError) as info:
        load_recipe(write_recipe(tmp_path, MINIMAL), [assignment])
    assert fragment in str(info.value)


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(FwsvdError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(FwsvdError, match="not valid YAML"):
        load_recipe(bad)


def test_a_budget_replaces_the_uniform_ratio(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL), ["compression.budget=0.4", "compression.rank_multiple=8"])
    assert (
        recipe.compression.budget == 0.4 and recipe.compression.ratio is None and recipe.compression.rank_multiple == 8
    )
    both = dict(MINIMAL, compression={"ratio": 0.5, "budget": 0.4})
    with pytest.raises(FwsvdError, match="budget' cannot be set together with ratio or rank"):
        load_recipe(write_recipe(tmp_path, both))


def test_clearing_the_cut_on_the_command_line_is_an_error_not_a_silent_default(tmp_path):
    with pytest.raises(FwsvdError, match="needs a ratio or a rank"):
        load_recipe(write_recipe(tmp_path, MINIMAL), ["compression.rank=null"])


@pytest.mark.parametrize(
    "assignment, fragment",
    [
        ("data.evaluation.stride=0", "'data.evaluation.stride' must be >= 1 (tokens), got 0"),
        ("data.evaluation.stride=999", "'data.evaluation.stride' must be between 1 and max_length (128), got 999"),
        ("validation.latency.runs=0", "must be >= 1"),
        ("compression.target=[unclosed", "not valid YAML"),
        ("validation.prompts=['']", "empty prompt"),
        (
            "validation.latency.one_at_a_time=1",
            "'validation.latency.one_at_a_time' must be false | true | 'auto', got 1",
        ),
        ("validation.latency.one_at_a_time=always", "must be false | true | 'auto', got 'always'"),
    ],
)
def test_more_bad_values_are_named(tmp_path, assignment, fragment):
    with pytest.raises(FwsvdError) as info:
        load_recipe(write_recipe(tmp_path, MINIMAL), [assignment])
    assert fragment in str(info.value)

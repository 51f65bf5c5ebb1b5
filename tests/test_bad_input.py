"""Bad input gets a clear error naming what was wrong and where, and leaves no output behind."""

import json

import pytest

from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run

from conftest import write_recipe


def fails(tmp_path, recipe, *fragments):
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(FwsvdError) as info:
        run(load_recipe(path), tmp_path / "out", progress=False)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    return str(info.value)


def test_unknown_recipe_key_names_the_key_and_the_file(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["ratoi"] = 0.3
    message = fails(tmp_path, classifier_recipe, "compression.ratoi", "recipe.yaml")
    assert "allowed here" in message


def test_wrong_type_names_the_key(tmp_path, classifier_recipe):
    classifier_recipe["data"]["batch_size"] = "eight"
    fails(tmp_path, classifier_recipe, "data.batch_size", "int")


def test_missing_model_folder(tmp_path, classifier_recipe):
    classifier_recipe["model"]["path"] = "no/such/model"
    fails(tmp_path, classifier_recipe, "model.path", "no/such/model", "does not exist")


def test_data_file_without_the_named_column(tmp_path, classifier_recipe):
    classifier_recipe["data"]["calibration"]["label_column"] = "category"
    fails(tmp_path, classifier_recipe, "no column 'category'", "labelled.jsonl", "data.calibration", "sentence")


@pytest.mark.slow
def test_regex_that_matches_no_layer(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["target"] = [r"decoder\.block"]
    fails(tmp_path, classifier_recipe, "matches no Linear layer", "bert.encoder.layer.0")


@pytest.mark.slow
def test_rank_larger_than_the_layer(tmp_path, classifier_recipe):
    classifier_recipe["compression"].update(ratio=None, rank=500)
    fails(tmp_path, classifier_recipe, "rank 500", "larger than layer", "at most 48")


def test_invalid_regex(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["exclude"] = ["(unclosed"]
    fails(tmp_path, classifier_recipe, "compression.exclude[0]", "regular expression")


def test_unknown_method_lists_the_known_ones(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["method"] = "magic"
    fails(tmp_path, classifier_recipe, "compression.method", "'magic'", "fwsvd", "kfac")


def test_unknown_label_value(tmp_path, classifier_recipe, data_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": "hello there", "label": "purple"}) + "\n")
    classifier_recipe["data"]["calibration"]["path"] = str(bad)
    fails(tmp_path, classifier_recipe, "label 'purple'", "red")


def test_an_existing_foreign_output_folder_is_never_replaced(tmp_path, classifier_recipe):
    precious = tmp_path / "out"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(FwsvdError, match="not an earlier fwsvd-export output"):
        run(load_recipe(write_recipe(tmp_path, classifier_recipe)), precious, progress=False)
    assert (precious / "thesis.tex").read_text() == "do not delete"


def test_a_folder_with_someone_elses_report_json_is_not_replaced(tmp_path, classifier_recipe):
    precious = tmp_path / "out"
    precious.mkdir()
    (precious / "report.json").write_text('{"quarter": "Q3"}')
    with pytest.raises(FwsvdError, match="not an earlier fwsvd-export output"):
        run(load_recipe(write_recipe(tmp_path, classifier_recipe)), precious, progress=False)
    assert (precious / "report.json").read_text() == '{"quarter": "Q3"}'


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("damping", 0.0, "compression.damping' must be > 0"),
        ("budget", 0.0001, "too few"),
    ],
)
def test_bad_compression_values(tmp_path, classifier_recipe, key, value, fragment):
    classifier_recipe["compression"][key] = value
    if key == "budget":
        classifier_recipe["compression"].pop("ratio")
    fails(tmp_path, classifier_recipe, fragment)


def test_max_length_beyond_the_model_positions(tmp_path, classifier_recipe):
    classifier_recipe["data"]["max_length"] = 4096
    fails(tmp_path, classifier_recipe, "data.max_length' 4096 exceeds the model's 128 positions")


def test_no_provider_to_validate_on_is_refused(tmp_path, classifier_recipe):
    """A run that would check nothing in ONNX Runtime must not pass."""
    classifier_recipe["validation"]["providers"] = []
    fails(tmp_path, classifier_recipe, "validation.providers", "at least one provider")


def test_a_negative_max_length_of_a_decoder_names_max_length(tmp_path, lm_recipe):
    lm_recipe["data"]["max_length"] = -1
    message = fails(tmp_path, lm_recipe, "data.max_length")
    assert "stride" not in message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_number_in_the_recipe_names_its_key(tmp_path, classifier_recipe, value):
    classifier_recipe["compression"]["damping"] = value
    fails(tmp_path, classifier_recipe, "compression.damping", "finite")


@pytest.mark.parametrize("key", ["atol", "rtol", "max_metric_loss", "max_quantization_loss"])
def test_a_negative_tolerance_names_its_key(tmp_path, classifier_recipe, key):
    classifier_recipe["validation"][key] = -0.1
    fails(tmp_path, classifier_recipe, f"validation.{key}", ">= 0")

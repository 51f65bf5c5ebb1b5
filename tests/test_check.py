"""`fwsvd-export check` finds what `run` refuses without running it (no weight loaded, nothing written) and
prints the plan; `schema` prints the recipe's JSON Schema; `init` writes a starter recipe that check accepts."""

import json
import shutil
import struct
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from fwsvd_export.cli import main

from conftest import RECIPES, write_recipe


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def model_copy(source: Path, folder: Path, **config) -> Path:
    """A copy of the model folder at `source` whose config.json has `config`'s keys changed."""
    folder = Path(shutil.copytree(source, folder))
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def poison_weights(folder: Path) -> None:
    """Keep model.safetensors' header (every name, shape and offset) and overwrite every weight's bytes with
    NaN: the file reads as a valid safetensors file, but a model loaded from it is refused."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(bytes(data))


# --- check on a good recipe ---------------------------------------------------------------------------------


def test_check_prints_the_plan_and_writes_nothing(tmp_path, classifier_recipe):
    path = write_recipe(tmp_path, classifier_recipe)
    before = listing(tmp_path)
    result = invoke("check", path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "recipe: " in out and "valid" in out and f"output: {tmp_path / 'out'} (new: run creates it)" in out
    assert "bert as BertForSequenceClassification" in out and "num_hidden_layers 2" in out
    assert "no weight read" in out
    # the data, read and tokenized: rows, labels, lengths
    assert "data.calibration: " in out and "32 records, 4 batches, 32 sequences" in out
    assert "data.evaluation: " in out and "48 records, 6 batches" in out
    assert "0 truncated at max_length" in out and "labels red " in out and "green " in out
    # the layer plan: 12 encoder layers at ratio 0.5, their ranks and parameters
    assert "compression: fwsvd, ratio 0.5: 12 layers targeted" in out
    row = next(line for line in out.splitlines() if "bert.encoder.layer.0.intermediate.dense" in line)
    assert row.split()[1:] == ["48", "96", "16", "4,608", "2,304"]
    assert "targeted parameters: 36,864 -> 18,432 (50.0% kept)" in out
    assert "model parameters: " in out and "fp32 size" in out
    assert "statistics pass: " in out and "time estimate: 6 x " in out
    assert listing(tmp_path) == before  # nothing written, not even the output's parents


def test_check_reads_no_weight_and_run_refuses_them(tmp_path, classifier_dir, classifier_recipe):
    """The weights' bytes are NaN behind a valid header: check passes (it read the header only), while run,
    which loads them, refuses them."""
    folder = model_copy(classifier_dir, tmp_path / "model")
    poison_weights(folder)
    classifier_recipe["model"]["path"] = str(folder)
    path = write_recipe(tmp_path, classifier_recipe)
    result = invoke("check", path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "12 layers targeted" in result.output
    refused = invoke("run", path, "-o", tmp_path / "out", "--quiet")
    assert refused.exit_code == 2, refused.output
    assert "NaN" in error_line(refused.output) and "finite weights" in refused.output
    assert not (tmp_path / "out").exists()


def test_check_json_and_a_budget(tmp_path, classifier_recipe):
    path = write_recipe(tmp_path, classifier_recipe)
    result = invoke(
        "check",
        path,
        "-o",
        tmp_path / "out",
        "--json",
        "--set",
        "compression.budget=0.5",
        "--set",
        "compression.method=kfac",
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["method"] == "kfac" and plan["cut"] == "budget 0.5 of targeted parameters"
    assert len(plan["layers"]) == 12 and all(r["allocated"] and r["params_after"] is None for r in plan["layers"])
    assert plan["targeted_params_after"] == plan["targeted_params_before"] // 2
    assert plan["statistics_needs"] and plan["statistics_bytes"] > 0 and plan["statistics_passes"] == 1
    assert plan["data"][0]["labels"] and plan["data"][0]["lengths"]["truncated"] == 0
    text = invoke("check", path, "-o", tmp_path / "out", "--set", "compression.budget=0.5").output
    assert "  budget  " in text and "allocated by the budget" in text


def test_check_counts_rows_cut_at_max_length(tmp_path, classifier_recipe):
    result = invoke(
        "check",
        write_recipe(tmp_path, classifier_recipe),
        "-o",
        tmp_path / "out",
        "--json",
        "--set",
        "data.max_length=8",
    )
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.output)["data"][0]
    assert calibration["lengths"]["max"] == 8 and calibration["lengths"]["truncated"] > 0


def test_check_the_demo_recipe(tmp_path):
    """The shipped MiniLM recipe (a package's model folder, text pairs): checked whole."""
    result = invoke("check", RECIPES / "minilm-demo.yaml", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "bert as BertModel" in result.output and "data.calibration: " in result.output
    assert "compression: kfac, ratio 0.6: 12 layers targeted" in result.output
    assert "not checked" not in result.output


def test_a_hub_recipe_says_what_it_could_not_check(tmp_path, monkeypatch):
    """A hub id whose config is not cached and hub datasets: nothing is fetched, and check says what it left."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    recipe = yaml.safe_load((RECIPES / "qwen2.5-0.5b-wikitext2.yaml").read_text())
    recipe["model"]["hub_id"] = "nobody-here/no-such-model"
    result = invoke("check", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "not checked: model 'nobody-here/no-such-model' is a hub id" in result.output
    assert "not checked: data.calibration: hub dataset 'wikitext'" in result.output
    assert "not checked: the layer plan" in result.output


# --- every bad input run refuses, found by check ------------------------------------------------------------


def _bad_key(tmp, recipe):
    recipe["compression"]["ratoi"] = 0.3
    return []


def _bad_set(tmp, recipe):
    return ["--set", "data.batch_size=eight"]


def _missing_data_file(tmp, recipe):
    recipe["data"]["calibration"]["path"] = str(tmp / "nowhere.jsonl")
    return []


def _unknown_label(tmp, recipe):
    (tmp / "bad.jsonl").write_text(json.dumps({"sentence": "hello there", "label": "purple"}) + "\n")
    recipe["data"]["evaluation"]["path"] = str(tmp / "bad.jsonl")
    return []


def _missing_column(tmp, recipe):
    recipe["data"]["calibration"]["label_column"] = "category"
    return []


def _model_with(**config):
    def change(tmp, recipe):
        recipe["model"]["path"] = str(model_copy(Path(recipe["model"]["path"]), tmp / "model", **config))
        return []

    return change


def _custom_code(tmp, recipe):
    folder = model_copy(
        Path(recipe["model"]["path"]),
        tmp / "custom",
        model_type="fwsvd-test-custom",
        auto_map={"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"},
    )
    (folder / "custom.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').write('ran')\n")
    recipe["model"]["path"] = str(folder)
    return []


def _pickled_weights(tmp, recipe):
    folder = model_copy(Path(recipe["model"]["path"]), tmp / "model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    recipe["model"]["path"] = str(folder)
    return []


def _foreign_output(tmp, recipe):
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("do not delete")
    return []


def _output_is_a_file(tmp, recipe):
    (tmp / "out").write_text("a file")
    return []


def _set(key, value):
    def change(tmp, recipe):
        section, name = key.split(".")
        recipe[section][name] = value
        if name in ("rank", "budget"):
            recipe[section]["ratio"] = None
        return []

    return change


def _missing_model(tmp, recipe):
    recipe["model"]["path"] = str(tmp / "no" / "such" / "model")
    return []


# (case, change, a fragment of the error both give, whether run's message is the same line)
BAD = [
    ("unknown key", _bad_key, "unknown key 'compression.ratoi'", True),
    ("bad value by --set", _bad_set, "--set 'data.batch_size=eight': 'data.batch_size' must be int", True),
    ("missing data file", _missing_data_file, "'data.calibration.path' points to a missing file", True),
    ("unknown label", _unknown_label, "label 'purple' in column 'label' is not one of the model's labels", True),
    ("missing column", _missing_column, "no column 'category' (from 'data.calibration')", True),
    (
        "config sizes",
        _model_with(intermediate_size=64),
        "config.json's intermediate_size 64 disagrees with the weights",
        True,
    ),
    (
        "config vocabulary",
        _model_with(vocab_size=1000),
        "config.json's vocab_size 1000 disagrees with the weights",
        True,
    ),
    (
        "more layers than the weights",
        _model_with(num_hidden_layers=3),
        "config.json's num_hidden_layers 3 disagrees with the weights",
        True,
    ),
    ("fewer layers than the weights", _model_with(num_hidden_layers=1), "are not used by the model", True),
    ("auto_map folder", _custom_code, "has an auto_map to the folder's own Python (custom.py)", True),
    ("pickled weights", _pickled_weights, "could not load model", False),
    ("missing model folder", _missing_model, "'model.path' folder", True),
    ("foreign output folder", _foreign_output, "is not an earlier fwsvd-export output", True),
    ("output is a file", _output_is_a_file, "exists and is not a folder", True),
    (
        "max_length beyond positions",
        _set("data.max_length", 4096),
        "'data.max_length' 4096 exceeds the model's 128",
        True,
    ),
    ("target matching nothing", _set("compression.target", ["decoder\\.block"]), "matches no Linear layer", True),
    ("rank beyond the layer", _set("compression.rank", 500), "is larger than layer", True),
    ("budget too small", _set("compression.budget", 0.0001), "too few for rank 1 each", True),
]


@pytest.mark.parametrize("change, fragment, same", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_check_refuses_what_run_refuses_with_the_same_message(tmp_path, classifier_recipe, change, fragment, same):
    classifier_recipe["export"] = {"output": str(tmp_path / "out")}  # the recipe's own output, not -o
    extra = change(tmp_path, classifier_recipe)
    path = write_recipe(tmp_path, classifier_recipe)
    before = listing(tmp_path)
    checked = invoke("check", path, *extra)
    assert checked.exit_code == 2, checked.output
    assert fragment in error_line(checked.output) and "Traceback" not in checked.output
    assert listing(tmp_path) == before
    assert not (tmp_path / "custom" / "RAN").exists()
    ran = invoke("run", path, "--quiet", *extra)
    assert ran.exit_code == 2, ran.output
    assert fragment in error_line(ran.output)
    if same:
        assert error_line(checked.output) == error_line(ran.output)
    assert listing(tmp_path) == before


def test_a_bad_recipe_file(tmp_path):
    assert "recipe file not found" in error_line(invoke("check", tmp_path / "none.yaml").output)
    (tmp_path / "twice.yaml").write_text("model: {task: a}\nmodel: {task: b}\n")
    result = invoke("check", tmp_path / "twice.yaml")
    assert result.exit_code == 2 and "appears twice" in result.output


# --- schema -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict:
    result = invoke("schema")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(found)
    return found


def errors(schema: dict, recipe: dict) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(recipe)]


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_the_schema_accepts_the_shipped_recipes(schema, name):
    assert errors(schema, yaml.safe_load((RECIPES / name).read_text())) == []


def test_the_schema_refuses_an_unknown_key_and_a_bad_choice(schema):
    recipe = yaml.safe_load((RECIPES / "minilm-demo.yaml").read_text())
    recipe["compression"]["ratoi"] = 0.3
    assert any("'ratoi' was unexpected" in e for e in errors(schema, recipe))
    del recipe["compression"]["ratoi"]
    for section, key, value in (
        ("model", "task", "translation"),
        ("model", "dtype", "float8"),
        ("compression", "method", "magic"),
        ("export", "precisions", ["fp32", "int3"]),
    ):
        bad = json.loads(json.dumps(recipe))
        bad[section][key] = value
        assert errors(schema, bad), (section, key, value)
    bad = json.loads(json.dumps(recipe))
    bad["validation"]["providers"][0]["name"] = "tpu"
    assert errors(schema, bad)
    assert errors(schema, {"model": {"task": "text-generation"}})  # data is required


def test_the_schema_describes_the_keys(schema):
    compression = schema["$defs"]["CompressionSpec"]
    assert compression["additionalProperties"] is False
    assert "kept fraction" in compression["properties"]["ratio"]["description"]
    assert compression["properties"]["ratio"]["anyOf"][1] == {"type": "null"}
    assert schema["$defs"]["LatencySpec"]["properties"]["one_at_a_time"]["enum"] == [False, True, "auto"]
    assert "text-generation" in schema["$defs"]["ModelSpec"]["properties"]["task"]["enum"]
    assert schema["required"] == ["model", "data"] and "source" not in schema["properties"]


# --- init ---------------------------------------------------------------------------------------------------


def test_init_writes_a_starter_that_check_accepts(tmp_path, classifier_dir, data_dir, schema):
    target = tmp_path / "recipes" / "starter.yaml"
    target.parent.mkdir()
    result = invoke(
        "init",
        "--model",
        classifier_dir,
        "--task",
        "text-classification",
        "--data",
        data_dir / "labelled.jsonl",
        "-o",
        target,
    )
    assert result.exit_code == 0, result.output
    text = target.read_text()
    assert text.startswith("# yaml-language-server: $schema=")
    recipe = yaml.safe_load(text)
    assert recipe["data"]["calibration"]["text_column"] == "sentence"
    assert recipe["data"]["calibration"]["label_column"] == "label"
    assert not Path(recipe["model"]["path"]).is_absolute()  # relative to the recipe's folder
    assert errors(schema, recipe) == []
    checked = invoke("check", target, "-o", tmp_path / "out")
    assert checked.exit_code == 0, checked.output
    assert "12 layers targeted" in checked.output and "labels red" in checked.output
    again = invoke("init", "--model", classifier_dir, "--task", "text-classification", "-o", target)
    assert again.exit_code == 2 and "exists" in error_line(again.output)
    assert target.read_text() == text


def test_init_guesses_csv_columns_and_says_what_it_could_not(tmp_path, classifier_dir, data_dir):
    target = tmp_path / "pairs.yaml"
    result = invoke(
        "init",
        "--model",
        classifier_dir,
        "--task",
        "feature-extraction",
        "--data",
        data_dir / "labelled.csv",
        "-o",
        target,
    )
    assert result.exit_code == 0, result.output
    assert "text_pair_column" in result.output  # the note: no pair column in sentence,label
    recipe = yaml.safe_load(target.read_text())
    assert recipe["data"]["calibration"]["text_column"] == "sentence"
    assert recipe["data"]["calibration"]["text_pair_column"] == "text_pair"
    assert "TODO" in target.read_text()
    checked = invoke("check", target, "-o", tmp_path / "out")
    assert checked.exit_code == 2 and "no column 'text_pair'" in error_line(checked.output)


def test_init_without_data_and_with_a_hub_id(tmp_path):
    target = tmp_path / "hub.yaml"
    result = invoke("init", "--model", "org/some-model", "--task", "text-generation", "-o", target)
    assert result.exit_code == 0, result.output
    assert "placeholders" in result.output
    recipe = yaml.safe_load(target.read_text())
    assert recipe["model"] == {
        "hub_id": "org/some-model",
        "task": "text-generation",
        "dtype": "float32",
        "trust_remote_code": False,
    }
    checked = invoke("check", target, "-o", tmp_path / "out")
    assert checked.exit_code == 2 and "'data.calibration.path' points to a missing file" in checked.output


def test_init_refuses_a_missing_model_folder_and_an_unknown_task(tmp_path):
    result = invoke(
        "init", "--model", tmp_path / "no" / "model", "--task", "text-classification", "-o", tmp_path / "r.yaml"
    )
    assert result.exit_code == 2 and "no such model folder" in error_line(result.output)
    assert invoke("init", "--model", "x/y", "--task", "translation").exit_code == 2  # click's usage error
    assert not (tmp_path / "r.yaml").exists()
